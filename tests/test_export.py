"""`ebmscale export`: a tiny real 2-rank run -> model.safetensors + config.json + model card, loaded back with torch and
safetensors alone (no DeepSpeed, no pickle) with the run's energies."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, train
from test_model_card import front_matter, no_paths

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits_shards):
    tmp = tmp_path_factory.mktemp("export")
    run = tmp / "run"
    train(run, digits_shards, "train.steps=2", "checkpoint.every=2", "train.zero_stage=2", "train.precision=bf16",
          "tracking.enabled=false")
    (run / "eval").mkdir()
    (run / "eval" / "fid_step000000002.json").write_text(json.dumps({"task": "fid", "step": 2,
                                                                    "metrics": {"fid_classifier": 12.5}}))
    from ebmscale.export import main
    assert main([str(run), str(tmp / "out")]) == 0
    return run, tmp / "out"


def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 1, 16, 16, generator=g), torch.arange(64) % 10


def test_export_reproduces_the_runs_energies(exported):
    from ebmscale.models import EnergyModel
    from ebmscale.eval.loading import load_energy_model
    run, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png"]
    x, y = images()
    with torch.no_grad():
        want = load_energy_model(run)[0](x, y)
        got = EnergyModel.from_pretrained(out)(x, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["filters"] == 8 and meta["ebmscale"]["step"] == 2 and meta["sampler"]["steps"] == 4
    card = (out / "README.md").read_text()
    assert "resnet32, 8 filters" in card and "2 steps" in card and "fid_classifier | 12.5" in card
    assert "![samples](samples.png)" in card


def test_exported_model_loads_without_deepspeed_or_pickle(exported):
    """A subprocess where `import deepspeed` fails and torch.load / pickle loading raise."""
    _, out = exported
    code = f"""
import pickle, sys, torch
sys.modules["deepspeed"] = None  # any `import deepspeed` now raises ImportError
def refuse(*a, **k): raise AssertionError("pickle used")
torch.load = pickle.load = pickle.loads = refuse
import ebmscale
g = torch.Generator().manual_seed(0)
x, y = torch.rand(64, 1, 16, 16, generator=g), torch.arange(64) % 10
with torch.no_grad():
    print(ebmscale.load_model({str(out)!r})(x, y).tolist())
assert not any(m.startswith("deepspeed") for m in sys.modules if sys.modules[m] is not None)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    from ebmscale.models import EnergyModel
    x, y = images()
    with torch.no_grad():
        want = EnergyModel.from_pretrained(out)(x, y)
    assert np.allclose(json.loads(res.stdout.strip().splitlines()[-1]), want.numpy(), rtol=1e-6, atol=1e-6)


def test_bf16_export_and_sampling_from_an_exported_folder(exported, tmp_path):
    from ebmscale.models import EnergyModel
    run, out = exported
    from ebmscale.export import export
    export(run, tmp_path / "bf16", dtype="bf16")
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size
    x, y = images()
    with torch.no_grad():
        a, b = EnergyModel.from_pretrained(out)(x, y), EnergyModel.from_pretrained(tmp_path / "bf16")(x, y)
    # bf16 keeps 8 bits of mantissa; rounding the weights shifts all energies by about the same constant (which
    # Langevin dynamics and energy comparisons ignore), so compare the energies' differences
    a, b = a - a.mean(), b - b.mean()
    assert (a - b).abs().max() < 0.1 * (a.max() - a.min()), (a[:8], b[:8])
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "sample.py"), str(out), "--init", "noise",
                          "--per-class", "1", "--steps", "2", "--out", str(tmp_path / "s.npz")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    d = np.load(tmp_path / "s.npz")
    assert d["images"].shape == (10, 1, 16, 16) and int(d["step"]) == 2


def test_model_card_front_matter_and_no_paths(exported):
    card = (exported[1] / "README.md").read_text()
    fm = front_matter(card)
    assert fm["library_name"] == "ebmscale" and fm["license"] == "mit" and "energy-based-model" in fm["tags"]
    assert "- data: " in card and str(exported[0]) not in card
    no_paths(card)
