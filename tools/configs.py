#!/usr/bin/env python
"""`ebmscale configs` from a checkout: python tools/configs.py [NAME [key=value ...]] (the code: ebmscale/commands/configs.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebmscale.commands.configs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
