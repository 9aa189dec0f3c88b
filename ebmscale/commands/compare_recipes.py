"""`ebmscale compare-recipes`: runs tools/compare_recipes.py (paper vs ebmscale vs icd on the digits demo at equal
wall time; its --help says more). The tool trains configs/digits.yaml and calls tools/*.py in its checkout, so it is
loaded from the checkout by its path; an installed copy without one says so."""
import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "compare_recipes.py"


def main(argv=None) -> int:
    if not TOOL.exists():
        print(f"compare-recipes: {TOOL} is not here; it runs from a checkout of ebmscale (git clone, then "
              f"python tools/compare_recipes.py --help)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("compare_recipes", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    saved = sys.argv[:]
    sys.argv[1:] = sys.argv[1:] if argv is None else list(argv)  # the tool's main() parses sys.argv
    try:
        code = tool.main()
    finally:
        sys.argv[:] = saved
    return 0 if code is None else int(code)
