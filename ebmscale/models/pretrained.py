"""An exported model folder (`ebmscale export`) read back: model.safetensors + config.json -> the net, in eval mode.

Needs torch, safetensors and omegaconf only: no DeepSpeed, no run folder, no pickle. It sits with the nets (not in
export.py) so that `EnergyModel.from_pretrained` and eval/loading.py can read an export without importing the
exporter, which itself reads run folders through eval/loading.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import safe_open
from safetensors.torch import load_file

from ebmscale.config import Config, ConfigError, resolve_recipe, validate
from ebmscale.models.multiscale import build_model
from ebmscale.models.resnet import EnergyModel, set_dropout
from ebmscale.trust import Untrusted, exported_config

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"


def is_exported(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def read_config(folder: str | Path) -> dict:
    """config.json as data (trust.exported_config: size-capped; model, sampler, recipe and ebmscale only)."""
    return exported_config(folder)


def model_config(folder: Path, meta: dict):
    """config.json's model section as a validated ModelConfig (Untrusted naming the file if it is not one)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), {"model": meta["model"], "data": {"shards": "-"},
                                                            **({"recipe": meta["recipe"]} if "recipe" in meta else {})})
        resolve_recipe(cfg)
        validate(cfg)
    except (OmegaConfBaseException, ConfigError) as e:
        raise Untrusted(f"{folder / CONFIG}: model section is not a valid ebmscale model: {str(e).splitlines()[0]}") from None
    return cfg.model


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The model of an exported folder, in eval mode, built from config.json's model section."""
    folder = Path(folder)
    if not is_exported(folder):
        raise FileNotFoundError(f"{folder} is not an exported model (needs {WEIGHTS} and {CONFIG}; make one with "
                                f"`ebmscale export RUN {folder}`)")
    mcfg = model_config(folder, read_config(folder))
    with torch.device("meta"):  # the shapes config.json asks for, before any memory is spent on them
        shapes = {k: tuple(v.shape) for k, v in build_model(mcfg).state_dict().items()}
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if stored != shapes:
        diff = sorted(set(stored.items()) ^ set(shapes.items()))[:4]
        raise RuntimeError(f"{folder / WEIGHTS} does not fit the model of {folder / CONFIG}: e.g. {diff}")
    model = build_model(mcfg)
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{folder / WEIGHTS} does not fit the model of {folder / CONFIG}: missing {missing}, "
                           f"unexpected {unexpected}")
    # the release's always-on dropout (ResNet32Large under `paper`) is off for sampling: .eval() does not reach it
    return set_dropout(model, False).to(device=device, dtype=dtype).eval()


def _from_pretrained(cls, folder, device="cpu", dtype: torch.dtype = torch.float32) -> EnergyModel:
    """A model written by `ebmscale export` (torch and safetensors only, no pickle; ebmscale/models/pretrained.py)."""
    return load_pretrained(folder, device, dtype)


# attached here, not defined in resnet.py: the loader needs build_model (multiscale.py), which imports resnet.py
EnergyModel.from_pretrained = classmethod(_from_pretrained)
