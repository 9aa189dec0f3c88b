#!/usr/bin/env python
"""`ebmscale evaluate` from a checkout: python tools/evaluate.py --help (the code: ebmscale/commands/evaluate.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebmscale.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
