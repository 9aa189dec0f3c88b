#!/usr/bin/env python
"""`ebmscale bench` from a checkout: python tools/bench.py --help (the code: ebmscale/commands/bench.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebmscale.commands.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
