"""ebmscale: IGEBM-style energy-based image models trained at cluster scale."""
import os

# DeepSpeed picks its accelerator when it is imported; on a machine without CUDA it must be told "cpu". The choice is
# this process's own: a value that ebmscale set (marked by EBMSCALE_SET_DS_ACCELERATOR) is decided again here, so a
# login node's "cpu" reaching a GPU node (sbatch exports the submitting environment) is not obeyed there, and the
# launcher scrubs both from what it submits (launch/submit.py). A DS_ACCELERATOR the user set is always kept.
if os.environ.get("EBMSCALE_SET_DS_ACCELERATOR") and os.environ.get("DS_ACCELERATOR") == \
        os.environ["EBMSCALE_SET_DS_ACCELERATOR"]:
    del os.environ["DS_ACCELERATOR"], os.environ["EBMSCALE_SET_DS_ACCELERATOR"]
if "DS_ACCELERATOR" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = os.environ["EBMSCALE_SET_DS_ACCELERATOR"] = "cpu"

__version__ = "0.1.0"

# load_model(path, device="cpu"): an energy model in eval mode from an `ebmscale export` folder (torch + safetensors
# only), a run folder or a checkpoint folder. Imported after the accelerator choice above.
from ebmscale.eval.loading import load_model  # noqa: E402,F401
