"""Send what a run left in its spool (it finished during an outage):
  python -m ebmscale.tracking RUN_DIR [TIMEOUT_S] [--uri URI]

The store is the one YOU name (--uri, or MLFLOW_TRACKING_URI), and it must be the one RUN_DIR/tracking.json
records; with none named, only the run's own local SQLite store (runs/mlflow.db beside the folder) is used. A run
folder never decides where your MLflow credentials go (docs/security.md). Records that the spool could not have
written (a file outside tracking_spool/files, an unknown op) are refused by name and dropped."""
import argparse
import os
import sys
from pathlib import Path

from ebmscale.config import TrackingConfig
from ebmscale.tracking.mlflow_run import MlflowTracker
from ebmscale.trust import Untrusted, read_json, tracking_target

p = argparse.ArgumentParser(prog="python -m ebmscale.tracking", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("run_dir")
p.add_argument("timeout_s", nargs="?", type=float, default=600.0)
p.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
               help="the tracking store to send to (default: MLFLOW_TRACKING_URI); must match tracking.json's")
a = p.parse_args()
run_dir = Path(a.run_dir)
try:
    saved = read_json(run_dir / "tracking.json", root=run_dir)
    uri = tracking_target(run_dir, saved, a.uri)
    experiment = saved.get("experiment") if isinstance(saved.get("experiment"), str) else "ebmscale"
    run_id = saved.get("run_id") if isinstance(saved.get("run_id"), str) else None
except (Untrusted, OSError) as e:
    sys.exit(f"ebmscale.tracking: {e}")
tracker = MlflowTracker(TrackingConfig(uri=uri, experiment=experiment, retry_s=5), run_dir, run_id, run_dir.name)
sys.exit(0 if tracker.flush(timeout_s=a.timeout_s) else 1)
