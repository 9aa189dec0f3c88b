#!/usr/bin/env python
"""Launch a training run on SLURM (submitit) or, with --local, on this machine. See --help and slurm/README.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebmscale.launch.cli import launch_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(launch_main())
