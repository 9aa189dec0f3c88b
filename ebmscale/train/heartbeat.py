"""Per-rank heartbeat: RUN/heartbeat/rank_NNNNN.json says what each rank last did (step, phase, host, pid, time)
and how long its steps take (`step_s`, a running mean). The trainer beats at every step boundary and around
checkpoint saves; the file is rewritten at most once a second. Readers judge liveness against the rank's own
pace, not a fixed time: the tracker's KILLED watchdog (rank 0, in process), `stale()` for another process
(a launcher, `tools/status.py`, a person) naming the ranks that stopped.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from ebmscale.log import get_logger

log = get_logger(__name__)

WRITE_EVERY_S = 1.0


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / "heartbeat" / f"rank_{rank:05d}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.host, self.pid = rank, socket.gethostname(), os.getpid()
        self.step: Optional[int] = None
        self.phase, self.step_s, self.last = "start", None, time.monotonic()
        self._step_t, self._written = self.last, 0.0

    def beat(self, step: int, phase: str = "train") -> None:
        now = time.monotonic()
        if self.step is not None and step != self.step:
            dt = (now - self._step_t) / max(1, abs(step - self.step))
            self.step_s = dt if self.step_s is None else 0.8 * self.step_s + 0.2 * dt
        if step != self.step:
            self._step_t = now
        changed = phase != self.phase
        self.step, self.phase, self.last = step, phase, now
        if changed or now - self._written >= WRITE_EVERY_S:
            self._written = now
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:  # bookkeeping: a full disk is the next save's error, not this one's
                tmp.write_text(json.dumps({"rank": self.rank, "host": self.host, "pid": self.pid, "step": step,
                                           "phase": phase, "step_s": self.step_s, "time": time.time()}))
                os.replace(tmp, self.path)
            except OSError as e:
                log.warning(f"could not write {self.path} ({e.strerror or e}); carrying on")

    def patience(self, floor_s: float) -> float:
        """How long this rank may stay silent before it counts as stuck: its own pace, at least floor_s."""
        return max(floor_s, 1.5 * (self.step_s or 0.0))


def _read(f: Path) -> Optional[dict]:
    """A heartbeat file of a folder that may be someone else's: a FIFO, a device, a huge or malformed file is None."""
    try:
        b = json.loads(f.read_text()) if f.is_file() and f.stat().st_size < 1 << 16 else None
        return b if isinstance(b, dict) and isinstance(b.get("time"), (int, float)) else None
    except (OSError, ValueError):
        return None


def stale(run_dir: Path, floor_s: float = 60.0) -> list[str]:
    """The ranks whose heartbeat file is older than their patience, described with host, pid, step and phase."""
    out, now = [], time.time()
    for f in sorted((Path(run_dir) / "heartbeat").glob("rank_*.json")):
        b = _read(f)
        if b is None:
            continue
        quiet = now - b["time"]
        if quiet > max(floor_s, 1.5 * (b.get("step_s") or 0.0)):
            out.append(f"rank {b.get('rank')} on {b.get('host')} (pid {b.get('pid')}): silent {quiet:.0f} s at step "
                       f"{b.get('step')} ({b.get('phase')})")
    return out


def read_beat(run_dir: Path, rank: int) -> Optional[dict]:
    """Rank `rank`'s heartbeat record (rank, host, pid, step, phase, step_s, time), None without one."""
    try:
        return json.loads((Path(run_dir) / "heartbeat" / f"rank_{rank:05d}.json").read_text())
    except (OSError, ValueError):
        return None


def last_beat(run_dir: Path, rank: int) -> Optional[str]:
    """What rank `rank` last reported: host, pid, step, phase and how long ago; None without a heartbeat file."""
    b = _read(Path(run_dir) / "heartbeat" / f"rank_{rank:05d}.json")
    if b is None:
        return None
    return (f"on {b.get('host')} (pid {b.get('pid')}), last heard at step {b.get('step')} ({b.get('phase')}) "
            f"{time.time() - b['time']:.0f} s ago")
