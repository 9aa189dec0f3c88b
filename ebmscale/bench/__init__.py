"""Benchmarks run by tools/bench.py NAME: each module has add_args(parser) and run(args)."""
