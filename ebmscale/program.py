"""The program name every --help shows: what the user typed to run it.

    ebmscale launch ...               -> "ebmscale launch"     (the console script; cli.main calls enter("launch"))
    python -m ebmscale launch ...     -> "python -m ebmscale launch"
    python tools/launch.py ...        -> "tools/launch.py"     (sys.argv[0] as given)
    python -m ebmscale.train.main     -> "python -m ebmscale.train.main"

Every ArgumentParser of a command takes prog=prog() (a benchmark: prog(name)); argparse's own default, the base name
of sys.argv[0], would say "launch.py" or "__main__.py".
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

_command: Optional[str] = None  # "ebmscale launch" once cli.main has picked the subcommand


def invoked_as() -> str:
    """How this process was started: `python -m PKG`, a console script on PATH by its name, else argv[0] as typed."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return "python -m " + spec.name.removesuffix(".__main__")
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "ebmscale"
    found = shutil.which(os.path.basename(argv0))
    if found and os.path.exists(argv0) and os.path.samefile(found, argv0):
        return os.path.basename(argv0)
    return argv0


def enter(command: str) -> None:
    """cli.main: the user ran `ebmscale COMMAND` (or `python -m ebmscale COMMAND`)."""
    global _command
    _command = f"{invoked_as()} {command}"


def prog(*more: str) -> str:
    """The argparse prog: the command as typed, then `more` (e.g. a benchmark's name)."""
    return " ".join([_command or invoked_as(), *more])
