"""One writer per run folder: RUN/writer.lock names the process that writes it (rank 0 of the job).

Taken with O_CREAT|O_EXCL (atomic, also on NFS) before anything in the folder is written or deleted, whatever
started the job (launcher, torchrun, sbatch, plain python); released on every exit Python sees (the file is
removed only if it is still ours). A SIGKILLed holder leaves the file behind: it is *stale* when its process is
gone (same host: the pid is dead or now belongs to another process) or its SLURM job has ended (another host),
or when it names this very SLURM job from an earlier start or another node (a requeue; two launches inside one
allocation on the same node are still told apart by pid). A stale lock is taken over with a note naming the old holder;
a live one refuses with its job id, host and pid. The launcher runs `check` on the login node before submitting.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from ebmscale import distributed

LOCK = "writer.lock"


class RunFolderInUse(RuntimeError):
    pass


def _proc_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (tells a reused pid apart); None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return "?"
        except ProcessLookupError:
            return None
        except OSError:
            return "?"


def me() -> dict:
    return {"job_id": os.environ.get("SLURM_JOB_ID", ""), "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "host": socket.gethostname(), "pid": os.getpid(),
            "proc_start": _proc_start(os.getpid()), "start": time.strftime("%Y-%m-%d %H:%M:%S"),
            "time": time.time()}


def describe(info: dict) -> str:
    job = f"SLURM job {info['job_id']}" if info.get("job_id") else "a job outside SLURM"
    return f"{job} on host {info.get('host')}, pid {info.get('pid')}, since {info.get('start')}"


def stale(info: dict) -> Optional[str]:
    """Why the holder in `info` no longer writes, or None while it may."""
    if info.get("job_id") and info["job_id"] == os.environ.get("SLURM_JOB_ID") and (
            int(os.environ.get("SLURM_RESTART_COUNT", 0)) > int(info.get("restart", 0))
            or info.get("host") != socket.gethostname()):
        return f"it is this SLURM job {info['job_id']}, requeued"
    if info.get("host") == socket.gethostname():
        started = _proc_start(int(info.get("pid", 0)))
        if started is None or started not in ("?", info.get("proc_start")):
            return f"process {info.get('pid')} on {info.get('host')} is gone"
        return None
    if info.get("job_id"):
        state = distributed.slurm_state(str(info["job_id"]))
        if state.startswith(distributed.FINAL_STATES):
            return f"SLURM job {info['job_id']} is {state}"
    return None


def _read(path: Path) -> dict:
    for _ in range(20):  # a holder may be between creating the file and writing it
        try:
            info = json.loads(path.read_text())
            if info:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return {"host": "?", "pid": "?", "start": f"(unreadable {path})"}


def check(run_dir: Path) -> Optional[dict]:
    """The live holder of `run_dir`, or None (free or stale)."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return None
    info = _read(path)
    return None if stale(info) else info


def acquire(run_dir: Path, log=print) -> dict:
    """Take the run folder's lock for this process; RunFolderInUse naming the holder if another one has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path, mine = run_dir / LOCK, me()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read(path)
            why = stale(info)
            if why is None:
                raise RunFolderInUse(f"run.dir: {run_dir} is being written by {describe(info)} ({path}); two jobs "
                                     f"must not write one run folder. Wait for it, stop it, or pick another run.dir; "
                                     f"if that holder is really gone, delete {path}") from None
            log(f"run folder lock {path}: taking over from {describe(info)}: {why}")
            try:
                os.replace(path, path.with_name(f"{LOCK}.stale-{mine['pid']}"))
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine))
            f.flush()
            os.fsync(f.fileno())
        atexit.register(release, run_dir, mine)
        return mine
    raise RunFolderInUse(f"run.dir: {run_dir}: could not take {path}; another job keeps taking it")


def release(run_dir: Path, mine: dict) -> None:
    path = Path(run_dir) / LOCK
    try:
        info = json.loads(path.read_text())
        if (info.get("host"), info.get("pid"), info.get("time")) == (mine["host"], mine["pid"], mine["time"]):
            path.unlink()
    except (OSError, ValueError):
        pass
