"""A Trainer over a real DeepSpeed engine for the benchmarks (bench/train_step.py, bench/scaling.py), built as
ebmscale/train/main.py builds it. DeepSpeed is chosen for the CPU when there is no CUDA by ebmscale/__init__.py."""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from ebmscale import distributed
from ebmscale.bench import device
from ebmscale.buffer import build_buffer
from ebmscale.config import load_config
from ebmscale.precision import resolve_everywhere
from ebmscale.train.ds_config import build_ds_config
from ebmscale.train.main import build_engine
from ebmscale.train.trainer import Trainer


def build_trainer(config: str, overrides: List[str], run_dir: str | Path):
    """A Trainer over a real DeepSpeed engine (this process's rank: 1 process, or one torchrun rank), built as
    ebmscale/train/main.py builds it; no data stream, tracker or checkpointer (the benchmark feeds batches)."""
    d = distributed.init()
    cfg = load_config(config, ["tracking.enabled=false", *overrides])
    cfg.train.precision = resolve_everywhere(cfg.train.precision, device().type).precision
    engine = build_engine(cfg, d.rank, build_ds_config(cfg, d.world_size))
    return Trainer(cfg, engine, build_buffer(cfg, engine.device), None, None, None, d.rank, d.world_size,
                   Path(run_dir))


def trainer_step(trainer, x_pos: torch.Tensor, y_pos: torch.Tensor) -> dict:
    """One training step as Trainer.fit runs it: sampling + forward/backward, then the optimizer step (the guard's
    verdict in between, one all-reduce of a few scalars, is left out)."""
    out = trainer.train_step(x_pos, y_pos)
    trainer.update(out, skip=False)
    return out
