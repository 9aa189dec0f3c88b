"""main(cfg): build the components, resume if there is something to resume, train.

Runs the same under the launcher (submitit, local or SLURM), torchrun, srun or plain python:
    python -m ebmscale.train.main configs/digits.yaml train.steps=100
"""
from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ebmscale import distributed, precision
from ebmscale.buffer import build_buffer
from ebmscale.config import ConfigError, flatten, run_dir, to_yaml
from ebmscale.trust import Untrusted, run_config
from ebmscale.data import build_stream
from ebmscale.log import get_logger, setup as setup_logging
from ebmscale.models import build_model
from ebmscale.tracking import build_tracker, pictures
from ebmscale.train import runlock, stop
from ebmscale.train.checkpoint import (UNIVERSAL, Checkpointer, CheckpointWriteError, bookkeeping, broadcast,  # noqa: F401
                                       commit_key, fingerprint, read_json, restore, trust_pickles,  # (fingerprint: tests)
                                       write_if_changed)
from ebmscale.precision import compute_dtype
from ebmscale.train.ds_config import build_ds_config
from ebmscale.train.entry import train_main
from ebmscale.train.guard import GuardFailure, check_discard_supported
from ebmscale.train.optim import build_optimizer
from ebmscale.train.trainer import Trainer

_log = get_logger("ebmscale.train.main")  # not __name__: `python -m` runs this module as __main__

# keys that must not change when a run folder is resumed: they change what the checkpoint means
FROZEN_KEYS = ("model", "buffer.dtype")


def log(msg: str) -> None:
    _log.info(msg)


def prepare_run_dir(cfg, out: Path) -> None:
    """Rank 0: refuse a silent restart over someone's checkpoints (config.yaml is written once, with the resolved
    precision, by settle_precision: written here too, with `auto`, it was rewritten twice at every start)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    ckpts = out / "checkpoints"
    has_ckpt = ckpts.exists() and any(ckpts.glob("step_*/COMMITTED"))
    if has_ckpt and cfg.checkpoint.resume == "never":
        if not cfg.run.overwrite:
            raise ConfigError(f"run.dir={out} already holds checkpoints and checkpoint.resume=never; resume "
                              f"(checkpoint.resume=auto), pick another run.dir, or set run.overwrite=true "
                              f"to start fresh (old checkpoints are moved aside, not deleted)")
        aside = out / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for name in ("checkpoints", "tracking.json", "samples"):
            if (out / name).exists():
                shutil.move(str(out / name), str(aside / name))
        log(f"run.overwrite: previous checkpoints moved to {aside}")
    if (out / "config.yaml").exists() and has_ckpt and cfg.checkpoint.resume != "never":
        check_frozen(cfg, out)


def check_frozen(cfg, run: Path) -> None:
    """The keys that change what a checkpoint means must match the run folder being resumed (or forked)."""
    if not (run / "config.yaml").exists():
        return
    try:  # a fork's parent may be a received run folder: read through the one door (no ${oc.env:...} etc.)
        old = run_config(run)
    except Untrusted as e:
        raise ConfigError(str(e)) from None
    for key in FROZEN_KEYS:
        a, b = OmegaConf.select(old, key), OmegaConf.select(cfg, key)
        if a != b:
            raise ConfigError(f"{key} differs from the run being resumed in {run} ({a} -> {b}); "
                              f"use a new run.dir for a different model")


def fork_parent(resume, out: Path):
    """The run folder `resume` belongs to when that is another run (a fork), else None."""
    if resume is None:
        return None
    parent = Path(resume).resolve().parent.parent
    return None if parent == out.resolve() else parent


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def all_hosts() -> str:
    host = socket.gethostname()
    if not dist.is_initialized():
        return host
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, host)
    return ",".join(sorted(set(hosts)))


def _marker(path: Path) -> dict:
    try:
        m = read_json(path)  # a FIFO or /dev/zero here is refused, never waited on
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def to_universal(folder: Path, rank: int, timeout_s: float = 3600.0, into: Optional[Path] = None) -> Path:
    """ZeRO optimizer shards -> DeepSpeed's universal checkpoint (world-size independent) in step_N_universal/.

    Its markers (COMPLETE, FAILED) name the commit they were made from (`commit_key`) and the attempt: a folder
    converted from another commit (another branch's step N, an older save) or left FAILED by an earlier attempt is
    stale, ignored and replaced by rank 0. The other ranks wait on the markers, not in a collective (a large
    conversion outlasts the collective timeout), for at most `timeout_s`, then fail naming rank 0. `into`: the
    folder to write it in (a fork's own checkpoints folder: another run's folder is only read), default beside it."""
    out = Path(into or folder.parent) / (folder.name + UNIVERSAL)
    done, failed = out / "COMPLETE", out / "FAILED"
    key = commit_key(folder)
    attempt = None
    if rank == 0 and _marker(done).get("source") != key:
        attempt = uuid.uuid4().hex
        if out.exists():
            log(f"{out.name}: made from another commit or unfinished; converting again")
            shutil.rmtree(out)
    if dist.is_initialized():
        attempt = broadcast(attempt)  # after rank 0 cleared stale markers: the others wait for this attempt's
    if rank == 0 and attempt:
        log(f"converting {folder.name} to a universal checkpoint for a new world size")
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
               "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
        mark = json.dumps({"source": key, "attempt": attempt})
        try:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        except BaseException:
            out.mkdir(parents=True, exist_ok=True)
            bookkeeping(failed, mark)
            raise
        write_if_changed(done, mark)
    t0, since = time.monotonic(), time.time() - 1
    while True:
        if _marker(done).get("source") == key:
            break
        bad = _marker(failed)
        if bad.get("source") == key and (bad.get("attempt") == attempt if attempt else failed.stat().st_mtime >= since):
            raise RuntimeError(f"rank 0 could not convert {folder} to a universal checkpoint (see its log)")
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"rank {rank}: rank 0 did not finish converting {folder} to a universal checkpoint "
                               f"within {timeout_s:.0f} s (no COMPLETE or FAILED marker for this commit in {out}); "
                               f"see rank 0's log; if the conversion is only slow, raise "
                               f"checkpoint.universal_timeout_s")
        time.sleep(min(2.0, max(0.05, timeout_s / 20)))
    if dist.is_initialized():
        dist.barrier()
    return out


def settle_precision(cfg, d: distributed.Dist, out: Path, checkpoint_precision) -> precision.Resolution:
    """train.precision auto -> what this hardware runs natively, the same on every rank; recorded in the run's
    config.yaml and precision.json (tools/status.py) and logged with the reason."""
    res = precision.resolve_everywhere(cfg.train.precision, "cuda" if d.backend == "nccl" else "cpu",
                                       checkpoint_precision)
    cfg.train.precision = res.precision
    if d.rank != 0:
        return res
    try:
        write_if_changed(out / "config.yaml", to_yaml(cfg))
    except OSError as e:
        raise SystemExit(f"ebmscale: cannot write {out / 'config.yaml'}: {e.strerror or e}; the one there is "
                         f"unchanged. Free space in {out} and launch again") from None
    bookkeeping(out / "precision.json", json.dumps(dataclasses.asdict(res), indent=1))
    log(f"precision {res.precision} (train.precision={res.requested}): {res.reason}")
    if res.warning:
        log(f"WARNING: {res.warning}")
    return res


def build_engine(cfg, rank: int, ds_cfg: dict):
    """The energy model under DeepSpeed; afterwards the global RNG is this rank's own (chains, noise)."""
    # the same seed on every rank: DeepSpeed broadcasts parameters but not buffers, and the spectral-norm
    # vectors (u, v) must agree across ranks or each rank normalises its weights differently
    torch.manual_seed(cfg.run.seed)
    # cast before DeepSpeed: it casts parameters but not the spectral-norm buffers
    model = build_model(cfg.model).to(compute_dtype(cfg.train.precision))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        # train.tf32 (false under recipe: paper): fp32 convolutions and matmuls in TF32 on Ampere and later
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(cfg.train.tf32)
    if cfg.train.deterministic:
        set_deterministic()  # TF32 off too
    torch.manual_seed(cfg.run.seed + 7919 * rank)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim), config=ds_cfg)
    distributed.time_out_every_group(cfg.train.collective_timeout_s)
    if cfg.guard.enabled:
        check_discard_supported(engine)
    return engine


def set_deterministic() -> None:
    """train.deterministic: the same numbers on the same GPU and software, run after run (and so a resume that is
    bit-exact on CUDA, as it is on CPU without this): deterministic cuDNN kernels, no TF32, torch's deterministic
    algorithms (cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its first call). Slower."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns, by name


def take_run_folder(out: Path, rank: int):
    """Rank 0 takes the run folder's writer lock before anything is written; every rank hears a refusal."""
    held, refused = None, None
    if rank == 0:
        try:
            held = runlock.acquire(out, log)
        except runlock.RunFolderInUse as e:
            refused = str(e)
    refused = broadcast(refused)
    if refused:
        raise runlock.RunFolderInUse(refused)
    return held


def quiet_unactionable_warnings() -> None:
    """Warnings no user of ebmscale can act on: DeepSpeed's ZeRO calls torch's all_gather_into_tensor, which torch
    2.x marks deprecated (FutureWarning) on every process. Only that message and category: any other stays."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def main(cfg) -> stop.Outcome:
    # a rank aborted from C++ (NCCL's watchdog: SIGABRT, no Python exception) still leaves its Python stacks in its
    # log, where the launcher's report() reads that it was waiting in a collective, not the one that hung
    faulthandler.enable()
    d = distributed.init(timeout_s=cfg.train.collective_timeout_s)
    setup_logging(d.rank)
    quiet_unactionable_warnings()
    out = run_dir(cfg).resolve()
    held = take_run_folder(out, d.rank)
    try:
        return _main(cfg, d, out, held)
    finally:
        if held:
            runlock.release(out, held)


def _main(cfg, d, out: Path, held=None) -> stop.Outcome:
    torch.set_num_threads(cfg.train.threads or distributed.cpu_threads(d.local_world_size, cfg.data.workers))
    print(distributed.placement(d), flush=True)  # every rank, into its own log (a logger shows rank 0 only)
    if d.rank == 0:
        try:
            prepare_run_dir(cfg, out)
        except OSError as e:
            raise SystemExit(f"ebmscale: cannot write the run folder {out}: {e.strerror or e} ({e.filename}); nothing "
                             f"in it was changed. Free space there (or fix its permissions) and launch again") from None
    if dist.is_initialized():
        dist.barrier()
    trust_pickles(cfg.checkpoint.trust_pickles)
    ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint, d.rank, d.world_size)
    ckpt.fence = held.lost if held is not None else None
    resume = ckpt.resume_target()
    prev = Checkpointer.read_trainer_state(resume) if resume else None
    parent = fork_parent(resume, out)
    if parent:
        check_frozen(cfg, parent)
    resolved = settle_precision(cfg, d, out, (prev or {}).get("precision"))

    ds_cfg = build_ds_config(cfg, d.world_size)
    load_dir = resume
    if prev and prev["world_size"] != d.world_size and cfg.train.zero_stage > 0:
        load_dir = to_universal(resume, d.rank, cfg.checkpoint.universal_timeout_s, ckpt.root if parent else None)
        ds_cfg["checkpoint"] = {"load_universal": True}
    engine = build_engine(cfg, d.rank, ds_cfg)
    buffer = build_buffer(cfg, engine.device)
    stream = build_stream(cfg.data, cfg.model, d.rank, d.world_size, cfg.run.seed)
    # a fork starts its own MLflow run (and records its parent); a resume continues the run's own
    run_id = None if parent else (prev or {}).get("tracking", {}).get("run_id")
    tracker = build_tracker(cfg.tracking, out, d.rank, run_id, cfg.run.name)
    trainer = Trainer(cfg, engine, buffer, stream, tracker, ckpt, d.rank, d.world_size, out, pictures)
    tracker.heartbeat = trainer.heartbeat  # the KILLED watchdog judges by the trainer's own pace
    if resume:
        restore(trainer, resume, load_dir)
    hosts = all_hosts()
    tags = {"world_size": d.world_size, "hosts": hosts, "git_commit": git_commit(),
            "precision": resolved.precision, "precision_reason": resolved.reason,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "resumed_from_step": trainer.step}
    if parent:
        tags.update({"parent_run_id": (prev.get("tracking") or {}).get("run_id") or "", "parent_run_dir": str(parent),
                     "parent_checkpoint": str(resume)})
        log(f"fork of {parent} at step {trainer.step}: a new MLflow run")
    params = {**flatten(cfg), **{f"deepspeed.{k}": v for k, v in flatten(OmegaConf.create(ds_cfg)).items()},
              "precision.requested": resolved.requested, "precision.reason": resolved.reason}
    tracker.start(params, out / "config.yaml", tags)
    if d.rank == 0:
        log(f"run folder {out}; step {trainer.step}/{cfg.train.steps}; world size {d.world_size}; "
            f"{tracker.describe()}")
    try:
        outcome = trainer.fit()
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except GuardFailure as e:
        _log.error(f"rank {d.rank}: run FAILED: {e}")
        tracker.finish("FAILED", reason=str(e))
        raise
    except CheckpointWriteError as e:  # a full disk: said in words, no traceback
        _log.error(f"run FAILED: {e}")
        tracker.finish("FAILED", reason=str(e))
        raise SystemExit(f"ebmscale: run stopped: {e}") from None
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        stream.close()
    if outcome == stop.Outcome.COMPLETED:
        tracker.finish("FINISHED")
        if d.rank == 0:
            log(f"completed {trainer.step} steps; run folder {out}")
    else:  # KILLED until a relaunch on this run folder continues the run (and sets it RUNNING again)
        tracker.finish("KILLED", timeout_s=5.0, reason=f"stopped ({stop.stop_reason() or 'by a peer'}) at step "
                                                       f"{trainer.step}; relaunch on {out} to continue")
    return outcome


def cli(argv=None) -> int:
    """`python -m ebmscale.train.main CONFIG [key=value ...]` (torchrun, srun, plain python): the launcher's
    parsing, stop handlers on SIGUSR1/SIGUSR2/SIGTERM and signal-shielded loader workers, then main()."""
    return train_main(argv, entry=main)


if __name__ == "__main__":
    sys.exit(cli())
