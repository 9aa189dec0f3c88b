import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# a tiny but real digits configuration: every trainer test uses it, on 1-2 DeepSpeed ranks; the plain one-scale
# ebmscale recipe (the demo itself is ICD on two scales; tests that want ICD say so)
TINY = ["recipe=ebmscale", "model.scales=1", "model.filters=8", "sampler.steps=4", "data.batch_size=8", "buffer.capacity=64", "data.workers=0",
        "data.shuffle_buffer=50", "train.log_every=1", "train.sample_every=5",
        "tracking.chain_gif_every=5", "train.threads=1"]


def make_digits_shards(out: Path) -> Path:
    """The 4 digits shards of configs/digits.yaml in `out` (kept if already complete)."""
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "digits", str(out)], check=True,
                       cwd=ROOT, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    return make_digits_shards(tmp_path_factory.mktemp("digits"))


def train(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2, env: dict | None = None,
          check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real trainer under torchrun: `nproc` DeepSpeed processes over gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ebmscale.train.main", str(ROOT / "configs" / "digits.yaml"), f"run.dir={run_dir}",
           f"data.shards={shards}/digits-{{000000..000003}}.tar", *TINY, *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "EBMSCALE_LOG_RANKS": "all",
                **(env or {})}  # tests read every rank's messages
    res = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"trainer failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def pytest_collection_modifyitems(config, items):
    """The scale drill (marker `scale`) runs only when asked for by marker (`-m scale`, tools/scale_drill.sh): it is
    CPU-heavy and grows the shared test cluster, so the default and CI runs skip it."""
    if "scale" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="the scale drill runs with -m scale (tools/scale_drill.sh)")
    for item in items:
        if "scale" in item.keywords:
            item.add_marker(skip)
