"""An exported model folder (`ebmscale export`) read back: model.safetensors + config.json -> the net, in eval mode.

Needs torch, safetensors and omegaconf only: no DeepSpeed, no run folder, no pickle. It sits with the nets (not in
export.py) so that `EnergyModel.from_pretrained` and eval/loading.py can read an export without importing the
exporter, which itself reads run folders through eval/loading.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ebmscale.config import ModelConfig
from ebmscale.models.multiscale import build_model
from ebmscale.models.resnet import EnergyModel

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"


def is_exported(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def read_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / CONFIG).read_text())


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The model of an exported folder, in eval mode, built from config.json's model section."""
    folder = Path(folder)
    if not is_exported(folder):
        raise FileNotFoundError(f"{folder} is not an exported model (needs {WEIGHTS} and {CONFIG}; make one with "
                                f"`ebmscale export RUN {folder}`)")
    model = build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), read_config(folder)["model"]))
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{folder / WEIGHTS} does not fit the model of {folder / CONFIG}: missing {missing}, "
                           f"unexpected {unexpected}")
    return model.to(device=device, dtype=dtype).eval()


def _from_pretrained(cls, folder, device="cpu", dtype: torch.dtype = torch.float32) -> EnergyModel:
    """A model written by `ebmscale export` (torch and safetensors only, no pickle; ebmscale/models/pretrained.py)."""
    return load_pretrained(folder, device, dtype)


# attached here, not defined in resnet.py: the loader needs build_model (multiscale.py), which imports resnet.py
EnergyModel.from_pretrained = classmethod(_from_pretrained)
