"""Send what a run left in its spool (it finished during an outage): python -m ebmscale.tracking RUN_DIR [TIMEOUT_S]"""
import json
import sys
from pathlib import Path

from ebmscale.config import TrackingConfig
from ebmscale.tracking.mlflow_run import MlflowTracker

run_dir = Path(sys.argv[1])
saved = json.loads((run_dir / "tracking.json").read_text())
tracker = MlflowTracker(TrackingConfig(uri=saved["tracking_uri"], experiment=saved["experiment"], retry_s=5),
                        run_dir, saved["run_id"], run_dir.name)
sys.exit(0 if tracker.flush(timeout_s=float(sys.argv[2]) if len(sys.argv) > 2 else 600) else 1)
