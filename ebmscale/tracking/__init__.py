"""Experiment tracking: one MLflow run per training run across requeues (mlflow_run), its offline spool (spool),
and the pictures it logs (pictures)."""
from ebmscale.tracking.mlflow_run import MlflowTracker, NullTracker, build_tracker, default_uri
from ebmscale.tracking.pictures import chain_gif, energy_histogram, image_grid, upscale

__all__ = ["MlflowTracker", "NullTracker", "build_tracker", "default_uri", "chain_gif", "energy_histogram",
           "image_grid", "upscale"]
