"""Where evaluation results go: a JSON file, and the training run's MLflow run (found through RUN/tracking.json)
as `eval/...` metrics at the checkpoint's step, pictures and the JSON as artifacts. The MLflow part never
fails the evaluation: if the store is unreachable it warns, and the JSON still has everything.
The store is the one the user names (--tracking-uri / MLFLOW_TRACKING_URI) or the run's own local SQLite store;
a tracking.json naming another is not followed (trust.tracking_target): a run folder does not decide where
MLflow credentials go."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ebmscale.log import get_logger
from ebmscale.trust import Untrusted, read_json, tracking_target

log = get_logger(__name__)


def _warn(msg: str) -> None:
    log.warning(f"[eval] {msg}")


class Report:
    def __init__(self, name: str, run_dir: Optional[Path], step: int, json_path: Optional[Path] = None):
        self.name, self.run_dir, self.step = name, Path(run_dir) if run_dir else None, int(step)
        default = (self.run_dir / "eval" / f"{name}_step{self.step:09d}.json") if self.run_dir else Path(f"{name}.json")
        self.json_path = Path(json_path) if json_path else default
        self.metrics: dict = {}
        self.info: dict = {}
        self.images: dict = {}

    def add(self, metrics: dict, **info) -> None:
        self.metrics.update({k: float(v) for k, v in metrics.items()})
        self.info.update(info)

    def image(self, key: str, image: np.ndarray) -> None:
        k = max(1, 256 // image.shape[0])  # small-image grids scaled up (nearest) so they can be seen
        self.images[key] = image.repeat(k, 0).repeat(k, 1)

    def finish(self) -> dict:
        """Write the JSON and the pictures beside it, then log to MLflow; returns what was written."""
        out = {"task": self.name, "step": self.step, "run": str(self.run_dir) if self.run_dir else None,
               "metrics": self.metrics, **self.info}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(out, indent=1, default=str) + "\n")
        for key, im in self.images.items():
            Image.fromarray(im).save(self.json_path.with_name(f"{self.json_path.stem}_{key.replace('/', '_')}.png"))
        out["json"], out["mlflow_run_id"] = str(self.json_path), self._log_mlflow()
        return out

    def _log_mlflow(self) -> Optional[str]:
        saved = self.run_dir / "tracking.json" if self.run_dir else None
        if saved is None or not saved.exists():
            _warn(f"no {saved or 'RUN/tracking.json'}: results only in {self.json_path}")
            return None
        try:
            t = read_json(saved, root=self.run_dir)
            t["tracking_uri"] = tracking_target(self.run_dir, t, os.environ.get("MLFLOW_TRACKING_URI"))
        except (Untrusted, OSError) as e:
            _warn(f"not logged to MLflow: {e}; results in {self.json_path}")
            return None
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
            client = MlflowClient(t["tracking_uri"])
            ts = int(time.time() * 1000)
            ms = [Metric(f"eval/{k}", v, ts, self.step) for k, v in self.metrics.items() if np.isfinite(v)]
            for i in range(0, len(ms), 1000):
                client.log_batch(t["run_id"], metrics=ms[i:i + 1000])
            for key, im in self.images.items():
                client.log_image(t["run_id"], im, key=f"eval/{key}", step=self.step)
            client.log_artifact(t["run_id"], str(self.json_path), "eval")
            return t["run_id"]
        except Exception as e:  # an evaluation is never lost to a tracking problem
            _warn(f"could not log to MLflow run {t.get('run_id')} at {t.get('tracking_uri')} ({e!r}); "
                  f"results in {self.json_path}")
            return None
