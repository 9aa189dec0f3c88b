"""Progress a person can read: one plain line per `train.log_every` steps from rank 0, and the launcher's view of it.

Rank 0 prints `[ebmscale] progress step 25/1500 (2%) loss 0.0123 E+ -0.012 E- 0.034 img/s 45.2 ETA 12m34s bf16`
(no carriage returns: its stdout is a log file under the launcher). Its tqdm bar is drawn only when stderr is a
terminal (torchrun by hand). The launcher follows the rank-0 log: in a log file or a pipe it copies the lines as they
are; in a terminal the progress lines drive one live bar and the other lines scroll above it.
"""
from __future__ import annotations

import re
import sys
from typing import Optional, TextIO

from tqdm import tqdm

PREFIX = "[ebmscale] progress"
LINE = re.compile(r"\[ebmscale\] progress step (\d+)/(\d+) \(\d+%\) (.*)")


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(step: int, total: int, metrics: dict, eta_s: Optional[float], precision: str) -> str:
    return (f"{PREFIX} step {step}/{total} ({100 * step // max(total, 1)}%) loss {metrics['batch/loss']:.4f} "
            f"E+ {metrics['batch/e_pos']:.4f} E- {metrics['batch/e_neg']:.4f} img/s {metrics['images_per_s']:.1f} "
            f"ETA {format_eta(eta_s)} {precision}")


class Console:
    """Where the launcher writes the lines of the rank-0 log."""

    def __init__(self, stream: TextIO = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.bar = None

    def line(self, text: str) -> None:
        text = text.rstrip("\n").split("\r")[-1]  # a carriage-return redraw keeps only its last state
        m = LINE.match(text) if self.tty else None
        if m is None:
            if self.bar is not None:
                self.bar.write(text, file=self.stream)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()
            return
        step, total, rest = int(m[1]), int(m[2]), m[3]
        if self.bar is None:
            self.bar = tqdm(total=total, file=self.stream, dynamic_ncols=True, desc="train",
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total} {postfix}")
        self.bar.n = step
        self.bar.set_postfix_str(rest)  # refreshes

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
