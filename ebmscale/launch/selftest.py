"""A stand-in trainer with the real trainer's contract, for checking the launch plumbing alone.

    python tools/launch.py --nodes 2 configs/digits.yaml launcher.entry=ebmscale.launch.selftest:main

It initialises torch.distributed through `ebmscale.distributed.init()`, checks an all-reduce every
step, honours `ebmscale.train.stop` at step boundaries (all-reduced), "checkpoints" its step to
RUN_DIR/selftest.json (rank 0, after a barrier), resumes from it, and returns an Outcome. Step time:
$EBMSCALE_SELFTEST_STEP_S (default 0.2 s). No data, no model: seconds to run, on any cluster.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ebmscale import distributed
from ebmscale.train import stop


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def main(cfg) -> stop.Outcome:
    d = distributed.init(timeout_s=cfg.train.collective_timeout_s)
    dev = distributed.collective_device(d.backend)  # NCCL all-reduces GPU tensors only
    out = Path(cfg.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "selftest.json"
    state = json.loads(path.read_text()) if path.exists() else {"step": 0, "attempts": []}
    state["attempts"].append({"job": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
                              "start_step": state["step"], "world_size": d.world_size})
    delay = float(os.environ.get("EBMSCALE_SELFTEST_STEP_S", "0.2"))
    step = state["step"]

    def save(step: int, outcome: str) -> None:
        dist.barrier()
        if d.rank == 0:
            _save(path, {**state, "step": step, "outcome": outcome})
        dist.barrier()

    while step < cfg.train.steps:
        flag = torch.tensor([1.0 if stop.stop_requested() else 0.0], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            save(step, "preempted")
            if d.rank == 0:
                print(f"[selftest] stop requested ({stop.stop_reason() or 'by a peer'}) at step {step}", flush=True)
            return stop.Outcome.PREEMPTED
        x = torch.ones(1, device=dev)
        dist.all_reduce(x)
        assert int(x.item()) == d.world_size, f"all-reduce gave {x.item()}, world size {d.world_size}"
        step += 1
        time.sleep(delay)
        if step % cfg.checkpoint.every == 0:
            save(step, "running")
        if d.rank == 0 and step % cfg.train.log_every == 0:
            print(f"[selftest] step {step}/{cfg.train.steps}", flush=True)
    save(step, "completed")
    return stop.Outcome.COMPLETED
