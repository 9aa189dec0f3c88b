"""One writer per run folder: RUN/writer.lock is a lease held by the process that writes it (rank 0 of the job).

Taking it: the holder's record (a fresh random `token`, job id, SLURM restart count, host, pid and its kernel start
time) is written to a private file and hard-linked to writer.lock: atomic and exclusive, also on NFS, and never
seen half-written. Holding it: a daemon thread touches the file every `lease_s / 4` seconds (its mtime is the
heartbeat) and checks that the token there is still its own; a holder that finds it is not has *lost* the lease and
`lost()` says why: the checkpointer refuses to commit then (a fence). Releasing it: removed on every exit Python
sees, only if the token is still ours.

A lock left behind (a SIGKILL, a dead node) is taken over only when it is known to be stale:
  same host          the pid is gone or belongs to another process now (start time differs); a live pid never is
  same SLURM job     an earlier instance (a lower SLURM_RESTART_COUNT, a requeue) or another node: stale once its
                     heartbeat stops; one still beating is a zombie of this job and is refused
  another SLURM job  sacct/squeue says it ended; a scheduler that cannot be asked (an error, no answer) means
                     "unknown": not taken over, the message says so
  another host, no SLURM   its heartbeat stopped: the mtime did not move while we watched for a lease
Takeover is rename-then-verify: the lock is renamed to a name of our own, and only if the renamed file still holds
the token judged stale is it discarded; a live lock moved by a slow judge is put back at once (link, which never
overwrites), and the judge starts over. Of two processes racing for one lock exactly one holds it afterwards
(tests/test_trust_ckpt.py races them). The launcher runs `check` on the login node before submitting.
"""
from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from ebmscale.distributed import FINAL_STATES, slurm_state

LOCK = "writer.lock"
LEASE_S = 60.0  # a holder beats every LEASE_S / 4; one silent for a whole lease is gone


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


def me(lease_s: float = LEASE_S) -> dict:
    return {"token": secrets.token_hex(8), "job_id": os.environ.get("SLURM_JOB_ID", ""),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0), "host": socket.gethostname(),
            "pid": os.getpid(), "proc_start": _proc_start(os.getpid()), "start": time.strftime("%Y-%m-%d %H:%M:%S"),
            "time": time.time(), "lease_s": lease_s}


def describe(info: dict) -> str:
    job = f"SLURM job {info['job_id']}" if info.get("job_id") else "a job outside SLURM"
    if info.get("job_id") and info.get("restart"):
        job += f" (restart {info['restart']})"
    return f"{job} on host {info.get('host')}, pid {info.get('pid')}, since {info.get('start')}"


def _beating(path: Path, info: dict, watch_s: float) -> bool:
    """Whether the holder's heartbeat (the lock's mtime) moves within `watch_s` (or it changed hands)."""
    def seen():
        try:
            return path.stat().st_mtime_ns, json.loads(path.read_text()).get("token")
        except (OSError, ValueError):
            return None, None
    first, deadline = seen(), time.monotonic() + watch_s
    while time.monotonic() < deadline:
        time.sleep(min(0.5, watch_s / 10))
        now = seen()
        if now != first:
            return now[1] is not None  # it beat, or the lock changed hands: not for us to take
    return False


def stale(info: dict, path: Optional[Path] = None, watch: bool = True) -> Optional[str]:
    """Why the holder in `info` no longer writes, or None while it may (or while that is unknown)."""
    host, here = info.get("host"), socket.gethostname()
    lease = float(info.get("lease_s") or LEASE_S)
    job, my_job = str(info.get("job_id") or ""), os.environ.get("SLURM_JOB_ID", "")
    my_restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
    if host == here:
        try:
            started = _proc_start(int(info.get("pid", 0)))
        except (TypeError, ValueError):
            started = None
        if started is None or started not in ("?", info.get("proc_start")):
            return f"process {info.get('pid')} on {host} is gone"
        return None  # alive (also a live earlier instance of this job: a zombie), never taken over
    if job and job == my_job and (int(info.get("restart", 0)) < my_restart or host != here):
        if path is None or not watch:
            return None
        if _beating(path, info, lease):
            return None  # still beating: a zombie of this job, or a second launch inside the allocation
        return f"it is an earlier instance of this SLURM job {job} (restart {info.get('restart', 0)}), silent for {lease:.0f} s"
    if job:
        state = slurm_state(job)
        if state is None:
            return None
        return f"SLURM job {job} is {state}" if state.startswith(FINAL_STATES + ("GONE",)) else None
    if path is not None and watch and not _beating(path, info, lease):
        return f"no heartbeat from {host} for {lease:.0f} s"
    return None


def _refusal(run_dir: Path, path: Path, info: dict) -> str:
    job, why = str(info.get("job_id") or ""), ""
    if job and info.get("host") != socket.gethostname() and job != os.environ.get("SLURM_JOB_ID", ""):
        state = slurm_state(job)
        why = (f"; SLURM could not be asked about job {job} (sacct/squeue failed), so whether it still runs is "
               f"unknown and it is not taken over" if state is None else f"; SLURM says it is {state}")
    elif job and job == os.environ.get("SLURM_JOB_ID", ""):
        why = "; it is an earlier instance of this very job that still beats (a zombie): stop it first"
    return (f"run.dir: {run_dir} is being written by {describe(info)} ({path}){why}. Two jobs must not write one "
            f"run folder. Wait for it, stop it, or pick another run.dir; if that holder is really gone, delete {path}")


def _read(path: Path) -> Optional[dict]:
    try:
        if not path.is_file() or path.stat().st_size > 1 << 16:  # a FIFO, a device, a huge file: not a lock
            return {} if os.path.lexists(path) else None
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def check(run_dir: Path, watch: bool = False) -> Optional[dict]:
    """The live (or possibly live) holder of `run_dir`, or None (free or known stale)."""
    path = Path(run_dir) / LOCK
    info = _read(path)
    if info is None:
        return None
    return None if stale(info, path, watch) else info


class Lease:
    """What `acquire` returns: the holder's record (a dict, for `release`) plus the heartbeat thread."""

    def __init__(self, run_dir: Path, info: dict):
        self.run_dir, self.info, self.path = Path(run_dir), info, Path(run_dir) / LOCK
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="writer-lease")
        self._thread.start()

    def __getitem__(self, key):
        return self.info[key]

    def mine(self) -> bool:
        for _ in range(5):  # a judge may hold the file renamed for an instant before putting it back
            info = _read(self.path)
            if info and info.get("token") == self.info["token"]:
                return True
            time.sleep(0.05)
        return False

    def _beat(self) -> None:
        while not self._stop.wait(float(self.info["lease_s"]) / 4):
            if not self.mine():
                self._lost = f"the run folder lock {self.path} is no longer this process's (now: {_read(self.path)})"
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def lost(self) -> Optional[str]:
        """Why this process may no longer write the run folder, or None."""
        if self._lost is None and not self.mine():
            self._lost = f"the run folder lock {self.path} is no longer this process's"
        return self._lost

    def stop(self) -> None:
        self._stop.set()


def acquire(run_dir: Path, log=print, lease_s: float = LEASE_S) -> Lease:
    """Take the run folder's lease for this process; RunFolderInUse naming the holder if another one has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path, mine = run_dir / LOCK, me(lease_s)
    mine_file = run_dir / f".{LOCK}.{mine['token']}"
    mine_file.write_text(json.dumps(mine))
    try:
        for _ in range(20):
            try:
                os.link(mine_file, path)  # exclusive and complete in one step
            except FileExistsError:
                info = _read(path)
                if info is None:
                    continue  # released in between
                why = stale(info, path) if info else None
                if why is None:
                    if not info:  # unreadable: maybe being written by an older ebmscale; look once more
                        time.sleep(0.2)
                        if _read(path):
                            continue
                    raise RunFolderInUse(_refusal(run_dir, path, info) if info else (
                        f"run.dir: {run_dir}: its lock {path} is not a lock file ebmscale can read (not JSON, not a "
                        f"regular file, or over 64 KiB), so whether another job writes this folder is unknown. If "
                        f"none does, delete {path}")) from None
                aside = run_dir / f"{LOCK}.stale-{mine['token']}"
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                moved = _read(aside) or {}
                if moved.get("token") != info.get("token") or moved.get("pid") != info.get("pid"):
                    try:  # a fresh lock, not the one judged stale: put it back (never over a newer one)
                        os.link(aside, path)
                    except FileExistsError:
                        pass
                    aside.unlink(missing_ok=True)
                    continue
                log(f"run folder lock {path}: taking over from {describe(info)}: {why}")
                continue
            lease = Lease(run_dir, mine)
            atexit.register(release, run_dir, lease)
            return lease
        raise RunFolderInUse(f"run.dir: {run_dir}: could not take {path}; other processes keep taking it")
    finally:
        mine_file.unlink(missing_ok=True)


def release(run_dir: Path, mine) -> None:
    if isinstance(mine, Lease):
        mine.stop()
        mine = mine.info
    path = Path(run_dir) / LOCK
    info = _read(path)
    if info and info.get("token", None) == mine.get("token") and info.get("pid") == mine.get("pid"):
        path.unlink(missing_ok=True)
