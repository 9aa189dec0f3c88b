"""python -m ebmscale COMMAND ... (the `ebmscale` console script)."""
import sys

from ebmscale.cli import main

sys.exit(main())
