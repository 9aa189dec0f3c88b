"""A non-editable `pip install .` into a fresh venv, then from an empty directory: `ebmscale make-shards digits`,
the demo config by name (`ebmscale launch --local digits`, a few steps), `ebmscale export` and
`EnergyModel.from_pretrained` giving the run's energies. The venv reuses this interpreter's site-packages through a
.pth file (torch, DeepSpeed, ... are not installed again), so the test costs the build plus a tiny run."""
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def run(cmd, cwd, env, timeout=600):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-4000:]}"
    return res


def test_pip_install_then_demo_by_name_from_an_empty_folder(tmp_path):
    t0 = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "reuse_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PATH=f"{venv / 'bin'}:{Path(sys.executable).parent}:{env['PATH']}")  # this env's ninja
    # DeepSpeed's compiled CPU ops: a copy of the machine's cache, so that a rebuild for the new interpreter (and a
    # lock left by a killed build) stays in this test
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    if cache.is_dir():
        shutil.copytree(cache, tmp_path / "torch_extensions", ignore=shutil.ignore_patterns("lock"))
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
         "--no-build-isolation", str(ROOT)], tmp_path, env)
    installed = time.monotonic() - t0
    work = tmp_path / "empty"
    work.mkdir()
    py = str(venv / "bin" / "python")
    where = run([py, "-c", "import ebmscale, ebmscale.config as c; print(ebmscale.__file__, c.CONFIG_DIR)"], work, env)
    assert str(ROOT) not in where.stdout and str(venv) in where.stdout  # the installed copy, configs inside it
    check = subprocess.run([sys.executable, "-m", "pip", "--python", py, "check"], capture_output=True, text=True)
    assert "ebmscale" not in check.stdout, check.stdout  # ebmscale's requirements are met

    ebm = str(venv / "bin" / "ebmscale")
    run([ebm, "make-shards", "digits", "data/digits"], work, env)
    t1 = time.monotonic()
    res = run([ebm, "launch", "--local", "--nproc", "1", "digits", "train.steps=2", "checkpoint.every=2",
               "tracking.enabled=false", *TINY], work, env)
    trained = time.monotonic() - t1
    assert (work / "runs" / "digits" / "checkpoints" / "step_000000002" / "COMMITTED").exists(), res.stdout[-2000:]
    run([ebm, "export", "runs/digits", "exported"], work, env)
    code = """
import torch
from ebmscale.eval.loading import load_energy_model
from ebmscale.models import EnergyModel
x, y = torch.rand(64, 1, 16, 16), torch.arange(64) % 10
with torch.no_grad():
    a, b = load_energy_model("runs/digits")[0](x, y), EnergyModel.from_pretrained("exported")(x, y)
torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
print("same energies")
"""
    assert "same energies" in run([py, "-c", code], work, env).stdout
    print(f"install {installed:.0f}s, demo (2 steps) {trained:.0f}s, total {time.monotonic() - t0:.0f}s")
