"""`ebmscale SUBCOMMAND ...`: one console script for every tool (tools/*.py are wrappers of the same code).

    ebmscale launch --local digits            train (a config by name from the shipped configs/, or a path)
    ebmscale status runs/digits               step, checkpoints, MLflow run
    ebmscale sample runs/digits --out s.npz   Langevin samples from a run, a checkpoint or an exported model
    ebmscale evaluate fid s.npz ...           FID / IS / accuracy / OOD / restoration
    ebmscale export runs/digits out/          model.safetensors + config.json + model card
    ebmscale make-shards digits data/digits   images -> WebDataset shards
    ebmscale configs digits train.steps=9     the shipped configs; one of them resolved as launch would run it
    ebmscale compare-recipes --minutes 10     paper vs ebmscale vs icd on the digits demo (tools/compare_recipes.py)
    ebmscale bench langevin                   the benchmarks of ebmscale/bench
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from ebmscale import __version__, program

COMMANDS = {  # name: (module, function, summary)
    "launch": ("ebmscale.launch.cli", "launch_main", "train on SLURM, or --local on this machine"),
    "status": ("ebmscale.commands.status", "main", "the state of a run folder"),
    "sample": ("ebmscale.commands.sample", "main", "Langevin samples from a run or an exported model"),
    "evaluate": ("ebmscale.commands.evaluate", "main", "FID, IS, accuracy, OOD, restoration"),
    "export": ("ebmscale.export", "main", "a run's model as model.safetensors + config.json + model card"),
    "make-shards": ("ebmscale.commands.make_shards", "main", "images -> WebDataset shards + manifest.json"),
    "configs": ("ebmscale.commands.configs", "main", "the shipped configs; one resolved with overrides"),
    "compare-recipes": ("ebmscale.commands.compare_recipes", "main", "paper vs ebmscale vs icd on the digits demo"),
    "bench": ("ebmscale.commands.bench", "main", "benchmarks (ebmscale/bench/README.md)"),
}


def usage() -> str:
    listing = "\n".join(f"  {name:<15} {summary}" for name, (_, _, summary) in COMMANDS.items())
    me = program.invoked_as()
    return f"usage: {me} COMMAND [options]   ({me} COMMAND --help)\n\ncommands:\n{listing}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"ebmscale {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"ebmscale: unknown command '{argv[0]}'\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    program.enter(argv[0])  # what --help shows: `ebmscale launch`, `python -m ebmscale launch`
    code = getattr(importlib.import_module(module), function)(argv[1:])
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
