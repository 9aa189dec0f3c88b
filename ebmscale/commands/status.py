"""The state of a run: python tools/status.py RUN_DIR [--json]"""
import argparse
import json
import sys

from ebmscale.run_status import format_status, run_status
from ebmscale.program import prog


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__)
    p.add_argument("run", help="run folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--lines", type=int, default=10, help="log lines to show")
    a = p.parse_args(argv)
    try:
        s = run_status(a.run, a.lines)
    except FileNotFoundError as e:
        print(f"status: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=1) if a.json else format_status(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
