"""Step timings that are right on a GPU: points of a step's timeline recorded as CUDA events (in the stream, no
host sync; read at log steps only, when the step's results are waited for anyway), as perf_counter on CPU.

A perf_counter around GPU work times the enqueue: the wait lands in whatever syncs next (the guard's `.tolist()`),
and a GPU run's charts would say the guard dominates. Events time the stream itself.
"""
from __future__ import annotations

import time

import torch


class Marks:
    """Named points of one step. `seconds(a, b)` waits for point b (a sync on CUDA: call it at log steps)."""

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.points: dict = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.points[name] = ev
        else:
            self.points[name] = time.perf_counter()

    def seconds(self, a: str, b: str) -> float:
        if self.cuda:
            self.points[b].synchronize()
            return self.points[a].elapsed_time(self.points[b]) / 1e3
        return self.points[b] - self.points[a]


def step_times(marks: Marks) -> dict:
    """sample (Langevin chains and the buffer), update (forward/backward on positives and negatives, and the optimizer
    step), step (from the chains' start to the optimizer step's end: the guard and the commit between are in it, the
    data wait is not) and the sampler's share of the step."""
    sample = marks.seconds("start", "sampled")
    update = marks.seconds("sampled", "backward") + (marks.seconds("update", "updated") if "updated" in marks.points
                                                     else 0.0)
    step = marks.seconds("start", "updated") if "updated" in marks.points else sample + update
    return {"time/sample_s": sample, "time/update_s": update, "time/step_s": step,
            "time/langevin_share": sample / step if step > 0 else float("nan")}
