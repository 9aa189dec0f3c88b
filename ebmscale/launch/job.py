"""The picklable job that submitit runs on every task (local processes or SLURM srun tasks).

Stop / requeue protocol (why it is not submitit's default):
  submitit's own handler (job_environment.SignalHandler) reacts to the preemption signal only on
  global rank 0: it calls `checkpoint()`, runs `scontrol requeue` and `sys.exit`s from inside the
  signal handler, wherever the training loop happens to be. SLURM then kills every task within
  KillWait, so no committed checkpoint can be written and ranks > 0 never learn of the signal.
  Instead, `__call__` replaces submitit's handlers on EVERY rank (SLURM's `--signal=USR2@delay`
  reaches every task of the step; so does the SIGTERM of scancel, preemption and requeue) with
  `ebmscale.train.stop.request_stop`. The trainer sees the flag at its next step boundary, agrees
  on it across ranks, writes a committed checkpoint and returns Outcome.PREEMPTED. Only then does
  rank 0 requeue, through submitit's machinery: `checkpoint()` (pure: returns the resubmission),
  the dump of the submitted pickle, `JobEnvironment._requeue` (`scontrol requeue` on SLURM; exit
  code 144 that makes the local controller restart the tasks). The restarted job unpickles the same
  config (absolute run.dir), and the trainer resumes from the latest committed checkpoint.

  * SIGUSR2 (time limit in `launcher.signal_delay_s`, or a site's preemption notice): save, then
    rank 0 requeues, up to `launcher.max_requeues` (counted by SLURM_RESTART_COUNT / our own counter).
    At the limit the job fails with RequeueLimitReached (exit 1, a STOPPED line in launcher.log).
  * SIGTERM (scancel, `scontrol requeue`, preemption in REQUEUE/CANCEL mode, node shutdown) and SIGUSR1 (a
    user's "checkpoint and stop", e.g. `scancel --signal=USR1`): save and exit without requeueing: SLURM
    requeues by itself where that is what is happening.
Every attempt appends one line when it starts and one when it ends to RUN_DIR/launcher.log.
"""
from __future__ import annotations

import datetime
import importlib
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from ebmscale import distributed
from ebmscale.config import Config, validate
from ebmscale.log import get_logger, setup as setup_logging
from ebmscale.train import stop
from ebmscale.train.entry import SHIELDED, shield_helper_processes  # noqa: F401 (SHIELDED: its old home)

log = get_logger(__name__)
LOG_NAME = "launcher.log"


class RequeueLimitReached(RuntimeError):
    """The job was stopped for the time limit / preemption more than launcher.max_requeues times."""


def log_line(run_dir: Path, msg: str) -> None:
    """Append one timestamped line to RUN_DIR/launcher.log (and echo it to the task's log)."""
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    line = f"{stamp} {msg}"
    log.info(f"launch: {msg}")  # the logger stamps the time
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / LOG_NAME, "a") as f:
            f.write(line + "\n")
    except OSError as e:  # never let bookkeeping kill a job
        log.warning(f"launch: cannot write {run_dir / LOG_NAME}: {e}")


def load_entry(spec: str) -> Callable[[DictConfig], Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "main")


def adjust_for_attempt(cfg: DictConfig, attempt: int) -> DictConfig:
    """A requeued attempt must continue its own run folder, never start over or reload an older
    checkpoint: resume=auto once the run folder holds a committed checkpoint, and no overwrite."""
    if attempt <= 0:
        return cfg
    cfg = cfg.copy()
    cfg.run.overwrite = False
    root = Path(cfg.run.dir) / "checkpoints"
    has_ckpt = root.is_dir() and any(root.glob("step_*/COMMITTED"))
    if has_ckpt and cfg.checkpoint.resume != "auto":
        cfg.checkpoint.resume = "auto"
    return cfg


class TrainJob:
    """`executor.submit(TrainJob(cfg))`; picklable (holds a plain, fully resolved config dict)."""

    def __init__(self, cfg: Any, requeues: int = 0) -> None:
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        self.cfg: Dict[str, Any] = cfg
        self.requeues = requeues  # how many times this job object was resubmitted

    # ---- submitit protocol ----------------------------------------------------------------------
    def checkpoint(self, *args: Any, **kwargs: Any):
        """Runs on global rank 0 only: inside submitit's signal handler (if a signal arrives before
        our handlers are installed) or after the trainer returned PREEMPTED. No I/O, no collectives:
        it only describes the resubmission; the trainer has already saved (or will resume)."""
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(type(self)(self.cfg, self.requeues + 1))

    def __call__(self) -> Dict[str, Any]:
        import submitit

        env = submitit.JobEnvironment()
        d = distributed.setup_env()
        setup_logging(d.rank)
        preempt_sig = env._usr_sig()
        stop.clear()
        # SIGUSR1 too (docs/clusters.md's stop signals are USR1, USR2 and TERM): without a handler its default action
        # killed the rank outright under the launcher; now it is a checkpoint-and-stop like SIGTERM
        stop.install_handlers(tuple(dict.fromkeys((preempt_sig, signal.SIGUSR1, signal.SIGTERM))))
        stop.install_interrupt_handler()  # a terminal's Ctrl-C reaches every task of a --local job
        shield_helper_processes(forkserver=self.cfg.get("data", {}).get("workers", 0) > 0)

        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        attempt = max(self.requeues, restarts)
        cfg = OmegaConf.merge(OmegaConf.structured(Config), self.cfg)
        validate(cfg)
        cfg = adjust_for_attempt(cfg, attempt)
        out = Path(cfg.run.dir)
        lc = cfg.launcher
        job = f"job {env.job_id}"
        rank0 = d.rank == 0
        if rank0:
            log_line(out, f"{job} attempt {attempt + 1} started: {d.world_size} tasks "
                          f"({d.local_world_size}/node) on {','.join(env.hostnames)}, master "
                          f"{d.master_addr}:{d.master_port}, backend {d.backend}, host {socket.gethostname()}")
        try:
            outcome = load_entry(lc.entry)(cfg)
        except BaseException as e:
            if rank0:
                kind = "INTERRUPTED" if isinstance(e, KeyboardInterrupt) else "FAILED"
                last = traceback.format_exception_only(type(e), e)[-1].strip()
                log_line(out, f"{job} {kind} on rank 0: {last}; fix and relaunch the same command "
                              f"to resume from the last committed checkpoint")
            raise
        outcome = stop.Outcome(getattr(outcome, "value", outcome))
        result = {"outcome": outcome.value, "run_dir": str(out), "rank": d.rank, "attempt": attempt + 1,
                  "job_id": env.job_id, "reason": stop.stop_reason()}
        if outcome == stop.Outcome.COMPLETED:
            if rank0:
                log_line(out, f"{job} COMPLETED: train.steps={cfg.train.steps} done after {attempt + 1} "
                              f"attempt(s)")
            return result
        if not rank0:
            return result

        reason = stop.stop_reason() or "a stop request from another rank"
        if reason != signal.Signals(preempt_sig).name:
            log_line(out, f"{job} STOPPED by {reason} (scancel, preemption or `scontrol requeue`): checkpoint "
                          f"committed, not requeued by ebmscale. If SLURM requeues the job it resumes by "
                          f"itself; otherwise relaunch the same command to resume.")
            result["outcome"] = "stopped"
            return result
        if attempt >= lc.max_requeues:
            msg = (f"{job} STOPPED: {reason} (time limit or preemption) after {attempt} requeue(s) = "
                   f"launcher.max_requeues={lc.max_requeues}; checkpoint committed, not requeued. Relaunch the "
                   f"same command (or raise launcher.max_requeues / launcher.time_min) to continue.")
            log_line(out, msg)
            raise RequeueLimitReached(msg)
        self._resubmit(env)
        log_line(out, f"{job} PREEMPTED by {reason} (time limit or preemption): checkpoint committed; "
                      f"requeued ({attempt + 1}/{lc.max_requeues}), resumes in the same run folder")
        try:
            env._requeue(lc.max_requeues - attempt - 1)  # SLURM: scontrol requeue; local: exits 144
        except Exception as e:
            log_line(out, f"{job} STOPPED: the requeue failed ({type(e).__name__}: {e}); checkpoint committed. "
                          f"Relaunch the same command to resume.")
            raise
        # like submitit after a requeue: leave without a result file; SLURM restarts the job
        sys.exit(0)

    def _resubmit(self, env) -> None:
        """What submitit's checkpoint_and_try_requeue does before requeueing: dump `checkpoint()`."""
        from submitit.core import utils as su
        path = env.paths.submitted_pickle
        current = su.DelayedSubmission.load(path)
        new = self.checkpoint()
        new.set_timeout(current._timeout_min, current._timeout_countdown)
        with su.temporary_save_path(path) as tmp:
            new.dump(tmp)

    def __repr__(self) -> str:
        run = self.cfg.get("run", {})
        return f"TrainJob(run.dir={run.get('dir')!r}, requeues={self.requeues})"


def result_summary(value: Optional[Dict[str, Any]]) -> str:
    if not value:
        return "no result"
    return f"{value.get('outcome')} (attempt {value.get('attempt')}, job {value.get('job_id')})"
