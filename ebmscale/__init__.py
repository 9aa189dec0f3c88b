"""ebmscale: IGEBM-style energy-based image models trained at cluster scale."""
import os

if "DS_ACCELERATOR" not in os.environ:  # DeepSpeed reads it at import; CPU-only machines want "cpu"
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"

__version__ = "0.1.0"
