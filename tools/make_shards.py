#!/usr/bin/env python
"""`ebmscale make-shards` from a checkout: python tools/make_shards.py --help (the code: ebmscale/commands/make_shards.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebmscale.commands.make_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
