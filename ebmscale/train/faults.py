"""Fault injection for tests and drills: EBMSCALE_FAULT="point:step:rank[,point:step:rank]".

Points: `kill_at_step` (SIGKILL this rank after the step), `kill_in_save` (SIGKILL after DeepSpeed's files
of the checkpoint at that step are written, before this rank's state file and the commit),
`nan_loss` (this rank's loss becomes NaN at that step), `collapse` (this rank's negatives become one flat
grey image at that step: a collapsed sampler), `nan_weight` (a NaN in this rank's share of the first weight, just
before the finite-weights check of the commit at that step: under ZeRO-3 its partition). rank `*` matches every rank. Each fault fires once per
process, so a step that a guard rollback replays runs clean.
"""
import os
import signal

from ebmscale.log import get_logger

log = get_logger(__name__)

_fired: set = set()


def active(point: str, step: int, rank: int) -> bool:
    for item in filter(None, os.environ.get("EBMSCALE_FAULT", "").split(",")):
        p, s, r = item.split(":")
        if p == point and int(s) == step and (r == "*" or int(r) == rank) and item not in _fired:
            _fired.add(item)
            return True
    return False


def maybe_kill(point: str, step: int, rank: int) -> None:
    if active(point, step, rank):
        log.warning(f"fault injection: {point} at step {step} on rank {rank}")
        os.kill(os.getpid(), signal.SIGKILL)
