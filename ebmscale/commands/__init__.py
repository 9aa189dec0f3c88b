"""The command-line tools behind `ebmscale SUBCOMMAND` (ebmscale/cli.py) and the tools/*.py wrappers: each module has
main(argv=None) -> exit code."""
