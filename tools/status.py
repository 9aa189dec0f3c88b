#!/usr/bin/env python
"""`ebmscale status` from a checkout: python tools/status.py --help (the code: ebmscale/commands/status.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebmscale.commands.status import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
