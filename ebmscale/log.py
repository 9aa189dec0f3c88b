"""Messages: one configuration point for every ebmscale process.

Modules take `log = logging.getLogger(__name__)` (children of the `ebmscale` logger). `setup(rank)` configures the
`ebmscale` logger once per process: lines `2026-12-01 21:50:14 r0@host [ebmscale] message`, information on stdout,
warnings and errors on stderr (both land in the rank's log file under the launcher). Ranks other than 0 show warnings and errors only, so that N ranks do not repeat every line;
EBMSCALE_LOG_RANKS=all shows every rank's messages. Without an explicit setup, the first `get_logger` sets up with the
rank from RANK / SLURM_PROCID. Command-line output meant for the user (the launcher's report, tool results) stays
plain print.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Optional

from ebmscale.trust import redact_text

ROOT = "ebmscale"


class _Std(logging.StreamHandler):
    """Writes to whatever sys.stdout / sys.stderr is now (pytest's capture, a redirected stream): information to
    stdout, warnings and errors to stderr."""

    def __init__(self, name: str) -> None:
        super().__init__(getattr(sys, name))
        self.name_ = name
        self.addFilter(lambda r: (r.levelno >= logging.WARNING) == (name == "stderr"))

    @property
    def stream(self):
        return getattr(sys, self.name_)

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Redacting(logging.Formatter):
    """Every console line with its secrets masked (trust.redact_text): a tracking URI's password, a presigned
    URL's signature, a token in a setup line never reach a log file."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def env_rank() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def setup(rank: Optional[int] = None, level: Optional[int] = None) -> logging.Logger:
    rank = env_rank() if rank is None else rank
    logger = logging.getLogger(ROOT)
    quiet = rank != 0 and os.environ.get("EBMSCALE_LOG_RANKS", "") != "all"
    logger.setLevel(level or (logging.WARNING if quiet else logging.INFO))
    handlers = [h for h in logger.handlers if isinstance(h, _Std)] or [_Std("stdout"), _Std("stderr")]
    fmt = _Redacting(f"%(asctime)s r{rank}@{socket.gethostname()} [{ROOT}] %(message)s", "%Y-%m-%d %H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
        if h not in logger.handlers:
            logger.addHandler(h)
    logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    if not any(isinstance(h, _Std) for h in logging.getLogger(ROOT).handlers):
        setup()
    return logging.getLogger(name)
