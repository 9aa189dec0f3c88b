"""The release's evaluation protocol (ebmscale/eval/paper.py) and `tools/evaluate.py paper` on a tiny digits run."""
import json
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, train
from ebmscale.config import from_yaml_file
from ebmscale.eval.paper import PAPER, markdown_table, quantise, release_denoise, release_inpaint, release_samples

sys.path.insert(0, str(ROOT / "tools"))
import evaluate  # noqa: E402


class Counting(torch.nn.Module):
    """E(x) = 100 |x - t|^2, counting its forward calls."""

    def __init__(self, target: float):
        super().__init__()
        self.t, self.calls = torch.nn.Parameter(torch.tensor(target)), 0

    def forward(self, x, y=None):
        self.calls += 1
        return ((x - self.t) ** 2).flatten(1).sum(1) * 100


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_release_sampling_cycles_the_ensemble_and_quantises_like_the_release():
    a, b = Counting(0.2), Counting(0.8)
    x, y = release_samples([a, b], n=15, num_classes=10, shape=(1, 4, 4), buffer_size=10, batch=8, iterations=6,
                           steps=3, step_size=0.004, noise=0.0, grad_clip=None, nomix=2)
    assert x.dtype == np.uint8 and x.shape == (15, 1, 4, 4) and y.shape == (15,) and 0 <= y.min() and y.max() < 10
    # 2 buffers x 6 iterations, each ONE model for 3 steps, in turn; summed energies would call both every step
    assert a.calls == b.calls == 2 * 3 * 3
    near = lambda t: np.abs(x.astype(int) - int(t * 256)) <= 1
    assert (near(0.2) | near(0.8)).mean() > 0.9  # each chain settles at the target of the model that ran last
    assert quantise(torch.tensor([0.0, 0.5, 0.99999, 1.0])).tolist() == [0, 128, 255, 255]  # floor(256 x)


def test_release_restoration_moves_only_the_bottom_half_and_scores_mse():
    model = Counting(0.5)
    x = np.full((3, 1, 8, 8), 0.5, np.float32)
    res, out = release_inpaint(model, x, None, step_size=0.001, steps=50)
    assert np.array_equal(out[..., :4, :], x[..., :4, :])  # the top half is never touched
    assert res["inpaint/mse"] < res["inpaint/mse_input"] and res["inpaint/psnr"] > res["inpaint/psnr_input"]
    res, out = release_denoise(model, x, None, step_size=0.001, steps=50)
    start_err = res["denoise/mse_input"]
    assert 0.05 * 0.16 * 0.5 < start_err < 0.2 * 0.16  # ~10% of pixels off by 0.4
    assert res["denoise/mse"] < start_err


def test_markdown_table_sets_the_paper_beside_ours():
    md = markdown_table({"is": 7.5, "fid": 40.0, "inpaint_test/mse": 0.01}, PAPER["cifar10"], "t")
    assert "| fid | 40 | 37.9 |" in md and "| is | 7.5 | 8.3 |" in md and "| inpaint_test/mse | 0.01 |  |" in md


@pytest.mark.slow
def test_paper_command_end_to_end_on_a_tiny_digits_run(tmp_path, digits_shards):
    run = tmp_path / "run"
    train(run, digits_shards, "train.steps=20", "sampler.steps=5", "checkpoint.every=10", "train.log_every=10",
          "train.sample_every=20", "checkpoint.keep_last=2", nproc=1)
    clf = tmp_path / "clf.pt"
    evaluate.main(["digits-classifier", str(clf), "--epochs", "1"])
    spec = from_yaml_file(run / "config.yaml").data.shards
    assert evaluate.main(["paper", str(run), "--test-shards", spec, "--classifier", str(clf), "--ensemble", "2",
                          "--n", "20", "--iterations", "3", "--batch", "8", "--buffer-size", "10", "--ood-n", "40",
                          "--restore-n", "4", "--source", f"again={spec}", "--paper", "cifar10"]) == 0
    out = json.loads((run / "eval" / "paper_step000000020.json").read_text())
    m = out["metrics"]
    assert out["ensemble"] == 2 and m["fid_classifier"] > 0 and 1 <= m["is_classifier"] <= 10
    assert m["ood/auroc_again"] == pytest.approx(0.5) and 0 <= m["ood/auroc_uniform"] <= 1
    for split in ("train", "test"):
        assert m[f"inpaint_{split}/mse"] >= 0 and np.isfinite(m[f"denoise_{split}/psnr"])
    assert np.load(out["samples"])["images"].shape == (20, 1, 16, 16)
    md = (run / "eval" / "paper_step000000020.md").read_text()
    assert "| metric | ours | paper |" in md and "ood/auroc_again" in md
