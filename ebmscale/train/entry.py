"""What starts training in a process, below both the launcher and train/main.py: the command line of
`python -m ebmscale.train.main CONFIG [key=value ...]` (train_main) and the helper processes shielded from SLURM's
stop signals (shield_helper_processes), which the launcher's job callable (launch/job.py) uses too.

train_main takes the function to run (train.main.main) as `entry`, so this module does not import the trainer.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
import sys
from multiprocessing import forkserver as fs
from multiprocessing import resource_tracker
from typing import Any, Callable, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from ebmscale.config import ConfigError, load_config
from ebmscale.data.stream import FORKSERVER_PRELOAD
from ebmscale.log import get_logger
from ebmscale.train import stop

log = get_logger(__name__)
EXIT_CONFIG = 2
EXIT_STOPPED = 3
SHIELDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)  # SIGINT: a terminal's Ctrl-C


def shield_helper_processes(forkserver: bool = True) -> None:
    """Keep helper processes alive through the stop signals.

    SLURM sends `--signal` (and `scancel --signal`, and the SIGTERM of a requeue) to EVERY process of
    the step, not just the task: data-loader workers started from a forkserver and multiprocessing's
    resource tracker are fresh interpreters with default handlers, so SIGUSR2 kills them, and the
    DataLoader then raises "worker exited unexpectedly" in the middle of a step instead of letting the
    trainer checkpoint. Start the resource tracker and the forkserver now with those signals blocked:
    the mask survives fork and exec, so they and every worker forked from the forkserver ignore them
    (workers still exit through the DataLoader's own shutdown, or when their parent dies)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(SHIELDED))
    try:
        resource_tracker.ensure_running()  # note: it unblocks SIGINT/SIGTERM again on its way out
        signal.pthread_sigmask(signal.SIG_BLOCK, set(SHIELDED))
        if forkserver:
            mp.get_context("forkserver").set_forkserver_preload(list(FORKSERVER_PRELOAD))
            fs.ensure_running()
    except Exception as e:  # pragma: no cover - never fatal
        log.warning(f"launch: could not pre-start helper processes: {e}")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def parse_train_args(argv: Sequence[str]) -> Tuple[str, List[str]]:
    p = argparse.ArgumentParser(prog="python -m ebmscale.train.main",
                                description="Train in this process (under srun, torchrun or alone); "
                                            "exit 0 completed, 3 stopped with a checkpoint, 2 config error.")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", metavar="key=value", nargs="*")
    a = p.parse_args(list(argv))
    return a.config, list(a.overrides)


def train_main(argv: Optional[Sequence[str]], entry: Callable[[DictConfig], Any]) -> int:
    """What `python -m ebmscale.train.main` can delegate to: parse, validate, stop handlers on
    SIGUSR1, SIGUSR2 and SIGTERM (sbatch --signal / scancel / preemption), train, exit code."""
    config, overrides = parse_train_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    stop.install_handlers((signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))
    shield_helper_processes(forkserver=cfg.data.workers > 0)
    outcome = entry(cfg)
    return 0 if stop.Outcome(getattr(outcome, "value", outcome)) == stop.Outcome.COMPLETED else EXIT_STOPPED
