#!/usr/bin/env python
"""`ebmscale export` from a checkout: python tools/export.py RUN_OR_CHECKPOINT OUT_DIR [--dtype fp32|bf16]."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebmscale.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
