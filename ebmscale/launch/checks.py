"""Pre-flight checks on the login node: everything that would otherwise fail after a queue wait.

Each check raises ConfigError (one clear message naming the key and the fix) or returns notes to print.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import DictConfig

from ebmscale import models  # models.build_model looked up at call time: tests replace it
from ebmscale.config import ConfigError, run_dir
from ebmscale.data import check_shards
from ebmscale.distributed import FINAL_STATES, slurm_state, usable_cpus  # noqa: F401 (re-exported)
from ebmscale.precision import resolve_here
from ebmscale.train import runlock

def tasks_per_node(lc) -> int:
    """One task per GPU; on CPU-only nodes launcher.tasks_per_node."""
    return lc.gpus_per_node if lc.gpus_per_node > 0 else lc.tasks_per_node


def check_launcher(cfg: DictConfig, mode: str, nproc: int) -> List[str]:
    lc, notes = cfg.launcher, []
    if lc.signal_delay_s < 10:
        raise ConfigError(f"launcher.signal_delay_s: {lc.signal_delay_s} s is too short to write a checkpoint "
                          f"before the time limit; use >= 60")
    if lc.signal_delay_s >= lc.time_min * 60:
        raise ConfigError(f"launcher.signal_delay_s: the stop signal comes {lc.signal_delay_s} s before the time "
                          f"limit but launcher.time_min={lc.time_min} min is not longer than that; raise "
                          f"launcher.time_min or lower launcher.signal_delay_s")
    if lc.max_requeues > 0 and lc.signal_delay_s < 60:
        notes.append(f"note: launcher.signal_delay_s={lc.signal_delay_s} s leaves little time to checkpoint "
                     f"before the time limit")
    if mode == "local":
        if lc.nodes > 1:
            raise ConfigError(f"launcher.nodes={lc.nodes}: --local runs on this machine only; drop --nodes "
                              f"or launch on SLURM")
        cpus = usable_cpus()
        if nproc > cpus:
            notes.append(f"note: {nproc} processes on {cpus} CPU cores (oversubscribed; slow but works)")
    else:
        if lc.gpus_per_node > 0 and lc.tasks_per_node not in (1, lc.gpus_per_node):
            raise ConfigError(f"launcher.tasks_per_node={lc.tasks_per_node} with launcher.gpus_per_node="
                              f"{lc.gpus_per_node}: ebmscale runs one task per GPU; drop --nproc / "
                              f"launcher.tasks_per_node on GPU nodes")
        if cfg.data.workers + 1 > lc.cpus_per_task:
            notes.append(f"note: data.workers={cfg.data.workers} loader processes + the trainer on "
                         f"launcher.cpus_per_task={lc.cpus_per_task} CPUs per task")
    return notes


def check_precision(cfg: DictConfig, mode: str, ngpu: int) -> str:
    """What train.precision will be. --local: resolved here, as the job will (it runs on this machine); SLURM: the
    nodes' hardware decides, so say how."""
    requested = cfg.train.precision
    if mode == "local":
        res = resolve_here(requested, "cuda" if ngpu else "cpu")
        text = f"precision: {res.precision} (train.precision={requested}: {res.reason})"
        return text + (f"\n  WARNING: {res.warning}" if res.warning else "")
    if requested == "auto":
        return ("precision: auto, resolved on the job's rank 0: bf16 on GPUs with compute capability >= 8.0, fp16 "
                "on older ones, bf16 on CPUs with native bf16, else fp32 (the job log and tools/status.py say which)")
    return f"precision: {requested} (set explicitly)"


def check_sizes(cfg: DictConfig, world: int) -> List[str]:
    d, b, m, t, lc = cfg.data, cfg.buffer, cfg.model, cfg.train, cfg.launcher
    if b.capacity < d.batch_size:  # also in config.validate; repeated for the message with the world size
        raise ConfigError(f"buffer.capacity: the replay buffer ({b.capacity} per rank) must hold at least one "
                          f"batch (data.batch_size={d.batch_size} per rank)")
    per_sample = m.in_channels * m.resolution * m.resolution * (1 if b.dtype == "uint8" else 2)
    buf_gb = b.capacity * per_sample / 2 ** 30
    if lc.mem_gb and buf_gb * tasks_per_node(lc) > lc.mem_gb:
        raise ConfigError(f"buffer.capacity: {tasks_per_node(lc)} ranks x {b.capacity} samples x {per_sample} B "
                          f"= {buf_gb * tasks_per_node(lc):.1f} GB of replay buffer per node does not fit "
                          f"launcher.mem_gb={lc.mem_gb}; lower buffer.capacity or use buffer.dtype=uint8")
    notes = [f"batch: {d.batch_size} per rank x {world} ranks = {d.batch_size * world} per step; replay "
             f"buffer {b.capacity} per rank ({buf_gb * 1024:.0f} MB, {b.dtype})"]
    if cfg.checkpoint.every > t.steps:
        notes.append(f"note: checkpoint.every={cfg.checkpoint.every} > train.steps={t.steps}: only the final "
                     f"(and any preemption) checkpoint is written")
    return notes


def check_model(cfg: DictConfig) -> str:
    try:
        with torch.device("meta"):
            model = models.build_model(cfg.model)
    except ConfigError:
        raise
    except Exception:
        try:  # some layers cannot initialise on the meta device; a small CPU build tells the truth
            model = models.build_model(cfg.model)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"model: cannot build {cfg.model.arch} with model.filters={cfg.model.filters}, "
                              f"model.resolution={cfg.model.resolution}: {type(e).__name__}: {e}") from None
    n = sum(p.numel() for p in model.parameters())
    return f"model: {cfg.model.arch}, {n / 1e6:.2f} M parameters"


def check_data(cfg: DictConfig) -> str:
    urls = check_shards(cfg.data)  # raises ConfigError naming data.shards and the fix
    return f"data: {len(urls)} shard(s) from {cfg.data.shards}"


def check_run_dir(out: Path, create: bool = True) -> str:
    """Writable run folder; with create=False (dry run) only the nearest existing parent is checked."""
    try:
        near = out
        if create:
            out.mkdir(parents=True, exist_ok=True)
        else:  # leave no trace: probe the nearest folder that exists
            while not near.exists() and near != near.parent:
                near = near.parent
        probe = near / f".ebmscale-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.dir: cannot write to {out} ({e.strerror or e}); pick a writable run.dir "
                          f"on a file system the compute nodes share") from None
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("step_*/COMMITTED")):
        return f"run folder: {out} (holds checkpoints: the run resumes from the latest)"
    return f"run folder: {out}"


def job_alive(info: dict) -> Optional[str]:
    """The state of the job a run folder's launch.json names, if it is still queued or running."""
    if info.get("executor") == "slurm" and info.get("job_id"):
        state = slurm_state(str(info["job_id"])) or "UNKNOWN"
        if not state.startswith(FINAL_STATES) and state not in ("UNKNOWN", "GONE"):
            return state
    if info.get("executor") == "local" and info.get("pid"):
        try:
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError):
            return None
        cmdline = Path(f"/proc/{info['pid']}/cmdline")
        if cmdline.exists() and b"submitit" not in cmdline.read_bytes():
            return None  # the pid was reused by something else
        return "RUNNING"
    return None


def check_not_in_use(out: Path) -> None:
    holder = runlock.check(out)
    if holder:
        raise ConfigError(f"run.dir: {out} is being written by {runlock.describe(holder)} ({out / runlock.LOCK}); "
                          f"two jobs must not write one run folder. Wait for it, stop it, or pick another "
                          f"run.dir / run.name")
    path = out / "launch.json"
    if not path.exists():
        return
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    state = job_alive(info)
    if state:
        stop = f"scancel {info['job_id']}" if info.get("executor") == "slurm" else f"kill {info.get('pid')}"
        raise ConfigError(f"run.dir: {out} is in use by {info.get('executor')} job {info.get('job_id')} "
                          f"({state}); two jobs must not write one run folder. Wait for it, stop it "
                          f"({stop}), or pick another run.dir / run.name")


def check_slurm_resources(cfg: DictConfig) -> List[str]:
    """Compare the request with what the partition's nodes have (sinfo); silent when sinfo cannot tell."""
    lc = cfg.launcher
    if not shutil.which("sinfo"):
        return []
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%c|%P|%G"]
    if lc.partition:
        cmd += ["-p", lc.partition]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if res.returncode != 0:
        return []
    nodes, gpus = {}, {}
    for line in res.stdout.split("\n"):
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[1].isdigit():
            if lc.partition or parts[2].endswith("*"):
                nodes[parts[0]] = int(parts[1])
                gpus[parts[0]] = gres_gpus(parts[3])
    if not nodes:
        if lc.partition:
            raise ConfigError(f"launcher.partition: SLURM has no partition '{lc.partition}' (sinfo lists none); "
                              f"see `sinfo -s`")
        return []
    where = f"partition {lc.partition}" if lc.partition else "the default partition"
    if lc.nodes > len(nodes):
        raise ConfigError(f"launcher.nodes={lc.nodes}: {where} has only {len(nodes)} node(s)")
    need = tasks_per_node(lc) * lc.cpus_per_task
    big = sorted(nodes.values(), reverse=True)[lc.nodes - 1]
    if need > big:
        raise ConfigError(f"launcher.cpus_per_task={lc.cpus_per_task} x {tasks_per_node(lc)} task(s) per node = "
                          f"{need} CPUs, but {where} has nodes with at most {big} CPUs (for {lc.nodes} node(s)); "
                          f"lower launcher.cpus_per_task")
    if lc.gpus_per_node > 0:
        most = sorted(gpus.values(), reverse=True)[lc.nodes - 1]
        if lc.gpus_per_node > most:
            raise ConfigError(f"launcher.gpus_per_node={lc.gpus_per_node}: {where} has nodes with at most {most} "
                              f"GPU(s) for {lc.nodes} node(s) (sinfo's GRES); pick a GPU partition (--partition) "
                              f"or lower --gpus-per-node")
    return []


def gres_gpus(gres: str) -> int:
    """GPUs in one node's sinfo %G: 'gpu:8', 'gpu:a100:4(S:0-1),gpu:v100:2' -> 8, 6; '(null)' -> 0."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def preflight(cfg: DictConfig, mode: str, nproc: int, world: int, skip=(), dry_run: bool = False,
              ngpu: int = 0) -> List[str]:
    """All login-node checks; returns notes to print, raises ConfigError on the first problem."""
    notes: List[str] = []
    notes += check_launcher(cfg, mode, nproc)
    notes.append(check_precision(cfg, mode, cfg.launcher.gpus_per_node if mode == "slurm" else ngpu))
    notes += check_sizes(cfg, world)
    if mode == "slurm" and "cluster" not in skip:
        notes += check_slurm_resources(cfg)
    out = run_dir(cfg)
    if "run_dir" not in skip:
        notes.append(check_run_dir(out, create=not dry_run))
        check_not_in_use(out)
    if "data" not in skip:
        notes.append(check_data(cfg))
    if "model" not in skip:
        notes.append(check_model(cfg))
    return notes
