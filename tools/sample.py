#!/usr/bin/env python
"""`ebmscale sample` from a checkout: python tools/sample.py --help (the code: ebmscale/commands/sample.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebmscale.commands.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
