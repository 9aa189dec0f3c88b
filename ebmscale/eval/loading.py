"""Load a trained energy model (and its replay buffer) from a run folder, a checkpoint folder or an exported folder,
without DeepSpeed's engine: the one loader that eval/, the commands and export.py share.

Every file is read through checkpoint.load / safe_torch_load: tensors and plain data only, unless the user passed
--trust-pickles (checkpoint.trust_pickles(True)): a colleague's or a downloaded run folder cannot run code. Its
config.yaml is read as data (trust.run_config): its allow_* / trust_* switches are off whatever it says."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ebmscale.config import PRECISIONS, Config
from ebmscale.log import get_logger
from ebmscale.models import build_model, set_dropout
from ebmscale.models.pretrained import CONFIG, is_exported, load_pretrained, read_config
from ebmscale.precision import compute_dtype, resolve_here
from ebmscale.train.checkpoint import (Checkpointer, committed, healthy_checkpoints, invalid, latest, load,
                                       safe_torch_load)
from ebmscale.trust import Untrusted, run_config

log = get_logger(__name__)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """RUN_DIR or a checkpoint folder -> (run folder, committed checkpoint folder)."""
    path = Path(path)
    if committed(path):
        why = invalid(path.resolve(), content=True)  # sizes and sha256 against COMMITTED (a link the user named: fine)
        if why:
            raise ValueError(f"{path} cannot be loaded: {why}")
        return path.parent.parent, path
    newest, ckpt = latest(path / "checkpoints"), next(iter(healthy_checkpoints(path / "checkpoints")[-1:]), None)
    if newest is None or ckpt is None:
        raise FileNotFoundError(f"{path} holds no {'healthy ' if newest else ''}committed checkpoint (looked in "
                                f"{path / 'checkpoints'}); train first, or pass a checkpoint folder")
    why = invalid(ckpt, content=True)
    if why:
        raise ValueError(f"{ckpt} cannot be loaded: {why}; pass an older checkpoint folder of {path}")
    if ckpt != newest:
        log.warning(f"{newest.name} was marked unhealthy by the stability guard; using {ckpt.name} (pass {newest} "
                    f"to use it anyway)")
    return path, ckpt


def fp32_state_dict(ckpt: Path, zero_stage: int) -> dict:
    if zero_stage >= 1:  # ZeRO keeps the fp32 master weights in its optimizer partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with safe_torch_load():
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    sd = load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    return {k: v.float() for k, v in sd.items()}


def load_exported(folder: str | Path, device: str | torch.device = "cpu"):
    """(model, a full config with the exported sections, step), the shape load_energy_model returns."""
    meta = read_config(folder)  # model, sampler, recipe, ebmscale: nothing else is taken from the file
    e = meta.get("ebmscale", {})
    precision, step = e.get("precision", "fp32"), e.get("step", 0)
    if precision not in PRECISIONS or not isinstance(step, int):
        raise Untrusted(f"{Path(folder) / CONFIG}: ebmscale.precision {precision!r} / step {step!r} not as written "
                        f"by `ebmscale export`")
    sections = {k: meta[k] for k in ("model", "sampler", "recipe") if k in meta}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), {**sections, "train": {"precision": precision}})
    except OmegaConfBaseException as err:
        raise Untrusted(f"{Path(folder) / CONFIG}: {str(err).splitlines()[0]}") from None
    return load_pretrained(folder, device), cfg, step


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An energy model in eval mode from an exported folder (torch + safetensors), or from a run folder or
    checkpoint folder (which may need DeepSpeed for ZeRO checkpoints)."""
    if is_exported(path):
        return load_pretrained(path, device)
    return load_energy_model(path, device)[0]


def load_energy_model(path: str | Path, device: str | torch.device = "cpu"):
    """Returns (model in eval mode, fp32, on device; config; checkpoint folder; step). `path` may also be a folder
    written by `ebmscale export` (its config has the exported sections, the rest schema defaults)."""
    if is_exported(path):
        model, cfg, step = load_exported(path, device)
        return model, cfg, Path(path), step
    run, ckpt = resolve_checkpoint(path)
    cfg = run_config(run)
    state = Checkpointer.read_trainer_state(ckpt)
    model = build_model(cfg.model)
    sd = fp32_state_dict(ckpt, int(state.get("zero_stage", cfg.train.zero_stage)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    buffers = {n for n, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise RuntimeError(f"{ckpt}: weights do not fit {cfg.model.arch}: missing {missing}, unexpected {unexpected}")
    if set(missing):  # spectral-norm power-iteration vectors live in the module states, not ZeRO's fp32 copy
        module_sd = load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
        model.load_state_dict({k: module_sd[k].float() for k in missing}, strict=False)
    set_dropout(model, False)  # the release samples ResNet32Large with train=False: no dropout in evaluation
    return model.to(device).eval(), cfg, ckpt, int(state["step"])


def load_ensemble(path: str | Path, k: int = 1, device: str | torch.device = "cpu"):
    """A historical ensemble: the model of `path` and the k - 1 committed checkpoints before it in its run.
    Returns (models, newest first; config; checkpoint folder; step) of the newest."""
    model, cfg, ckpt, step = load_energy_model(path, device)
    if k == 1:
        return [model], cfg, ckpt, step
    if is_exported(path):
        raise ValueError(f"--ensemble {k}: {path} is an exported model (one checkpoint); pass a run folder")
    run = resolve_checkpoint(path)[0]
    older = [p for p in healthy_checkpoints(run / "checkpoints") if int(p.name.split("_")[1]) < step][::-1][:k - 1]
    if len(older) < k - 1:
        raise ValueError(f"--ensemble {k}: {run} keeps {len(older) + 1} checkpoints up to step {step}; train with "
                         f"checkpoint.keep_last>={k} (or checkpoint.keep_every) to keep enough of them")
    return [model] + [load_energy_model(p, device)[0] for p in older], cfg, ckpt, step


def sampling_precision(requested: str, run_precision: str, device: str) -> str:
    """--precision: auto = what this hardware runs natively (ebmscale/precision.py), train = the run's own."""
    chosen = run_precision if requested == "train" else requested
    return resolve_here(chosen, torch.device(device).type).precision if chosen == "auto" else chosen


def cast_for_sampling(models: list, precision: str) -> torch.dtype:
    """Cast models in place for sampling and scoring: fp32, or bf16 / fp16 compute (chains stay fp32, as in
    training; `eval.sample.composed_energy` casts each model's input)."""
    dtype = compute_dtype(precision)
    for m in models:
        m.to(dtype)
    return dtype


def load_buffer(ckpt: Path) -> Optional[dict]:
    """All ranks' replay-buffer shards concatenated: images (uint8 or fp16), labels."""
    files = Checkpointer.rank_files(ckpt, Checkpointer.read_trainer_state(ckpt))
    if not all(f.is_file() for f in files):
        return None
    shards = [load(f, map_location="cpu", mmap=True)["buffer"] for f in files]
    return {"images": torch.cat([s["images"] for s in shards]), "labels": torch.cat([s["labels"] for s in shards]),
            "dtype": shards[0]["dtype"]}
