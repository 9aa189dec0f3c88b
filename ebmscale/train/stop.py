"""A stop request that a signal handler may set: no I/O, no collectives, just a flag.

The trainer reads it at step boundaries, agrees on it across ranks (one all-reduce), writes a
committed checkpoint and returns `Outcome.PREEMPTED`, so the launcher can requeue the job.
"""
import enum
import os
import signal
import threading
import time

# tests only: a stop waits before its checkpoint until a KeyboardInterrupt (the second Ctrl-C) ends it, so a test of
# "Ctrl-C twice" does not depend on whether the first stop's checkpoint beats the second signal on a busy machine
HOLD_ENV = "EBMSCALE_TEST_HOLD_STOP"

_reason: list = []
_lock = threading.Lock()


class Outcome(str, enum.Enum):
    COMPLETED = "completed"
    PREEMPTED = "preempted"  # checkpoint committed; resume by relaunching with the same run folder


def request_stop(reason: str = "requested") -> None:
    with _lock:
        if not _reason:
            _reason.append(reason)


def stop_requested() -> bool:
    return bool(_reason)


def stop_reason() -> str:
    return _reason[0] if _reason else ""


def clear() -> None:
    _reason.clear()


def install_handlers(signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Turn these signals into a stop request (call from the main thread)."""
    for sig in signals:
        signal.signal(sig, lambda signum, _frame: request_stop(signal.Signals(signum).name))


def install_interrupt_handler() -> None:
    """Ctrl-C twice: the first SIGINT is a stop request (a committed checkpoint at the next step boundary), the
    second raises KeyboardInterrupt (stop now)."""
    def on_sigint(signum, frame):
        if stop_reason() == "SIGINT":
            raise KeyboardInterrupt
        request_stop("SIGINT")
    signal.signal(signal.SIGINT, on_sigint)


def hold_for_test() -> None:
    """With HOLD_ENV set (tests only), wait here for the second Ctrl-C: its KeyboardInterrupt ends the wait."""
    if os.environ.get(HOLD_ENV):
        print(f"[ebmscale] stop held ({HOLD_ENV}): waiting for the second Ctrl-C", flush=True)
    while os.environ.get(HOLD_ENV):
        time.sleep(0.05)
