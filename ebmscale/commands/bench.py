#!/usr/bin/env python
"""python tools/bench.py NAME [options]: runs ebmscale/bench/NAME.py (its add_args(parser), then run(args))."""
import argparse
import importlib
import pkgutil
import sys

import ebmscale.bench
from ebmscale.config import ConfigError
from ebmscale.program import prog


SUMMARY = {
    "buffer": "replay-buffer push / init_chains cost against its capacity (must be flat)",
    "checkpoint": "save stall, background write and load of an ImageNet128-sized buffer shard",
    "data": "data-loader images/s per worker against what a training step consumes",
    "langevin": "sampler image-steps/s and FLOP/s vs the plain PyTorch loop; share of the GEMM peak (MFU on GPU)",
    "scaling": "1 -> 2 ranks weak-scaling efficiency of the real training step (DeepSpeed over gloo)",
    "train-step": "seconds per full training step, ebmscale vs the plain PyTorch loop, per architecture",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(ebmscale.bench.__path__)  # train-step
                   if not m.name.startswith("_"))  # _trainer: shared code, not a benchmark
    asked = argv[:1] in (["-h"], ["--help"])
    if asked or not argv or argv[0].replace("_", "-") not in names:
        listing = "\n".join(f"  {n:<11} {SUMMARY.get(n, '')}" for n in names)
        print(f"usage: {prog()} NAME [options]   ({prog()} NAME --help for its options)\n\n"
              f"benchmarks:\n{listing}\n\nEach prints a table and writes JSON under runs/bench/; see "
              f"ebmscale/bench/README.md for the figures measured so far.", file=sys.stdout if asked else sys.stderr)
        if asked:
            return 0
        sys.exit(f"unknown benchmark '{argv[0]}'" if argv else 2)
    module = importlib.import_module(f"ebmscale.bench.{argv[0].replace('-', '_')}")
    parser = argparse.ArgumentParser(prog=prog(argv[0]), description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if hasattr(module, "add_args"):
        module.add_args(parser)
    try:
        module.run(parser.parse_args(argv[1:]))
        return 0
    except ConfigError as e:
        sys.exit(f"config error: {e}")


if __name__ == "__main__":
    sys.exit(main())
