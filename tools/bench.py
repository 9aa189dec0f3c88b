#!/usr/bin/env python
"""python tools/bench.py NAME [options]: runs ebmscale/bench/NAME.py (its add_args(parser), then run(args))."""
import argparse
import importlib
import pkgutil
import sys

import ebmscale.bench


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(ebmscale.bench.__path__))  # train-step
    if not argv or argv[0].replace("_", "-") not in names:
        sys.exit(f"usage: tools/bench.py {{{','.join(names)}}} [options]")
    module = importlib.import_module(f"ebmscale.bench.{argv[0].replace('-', '_')}")
    parser = argparse.ArgumentParser(prog=f"bench.py {argv[0]}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if hasattr(module, "add_args"):
        module.add_args(parser)
    return module.run(parser.parse_args(argv[1:]))


if __name__ == "__main__":
    main()
