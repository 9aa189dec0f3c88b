"""Evaluation: every metric against a hand computation, the FID path with a stand-in feature network, and the tools
end to end on a tiny digits run trained by the real trainer."""
import json
import sqlite3
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import roc_auc_score

from conftest import train
from ebmscale.config import from_yaml_file
from ebmscale.eval.data import read_images
from ebmscale.eval.fid import feature_net, fid_and_is, reference_stats
from ebmscale.eval.metrics import auroc, frechet_distance, gaussian_stats, inception_score, psnr, roc_curve
from ebmscale.eval.sample import sample_rounds

from ebmscale.commands import evaluate  # tools/evaluate.py and tools/sample.py wrap these
from ebmscale.commands import sample as sample_tool


# ---- metrics against hand computations --------------------------------------------------------------------------

def test_auroc_separable_identical_and_ties():
    assert auroc([0, 1, 2], [3, 4]) == 1.0  # OOD scores (energies) all higher
    assert auroc([3, 4], [0, 1, 2]) == 0.0
    assert auroc([1, 1, 1], [1, 1]) == 0.5  # all tied
    assert auroc([0, 1], [1, 2]) == pytest.approx(3.5 / 4)  # (0<1) (0<2) (1=1: one half) (1<2)
    rng = np.random.default_rng(0)
    assert abs(auroc(rng.normal(size=4000), rng.normal(size=4000)) - 0.5) < 0.02
    a, b = rng.integers(0, 5, 300), rng.integers(1, 7, 200)  # many ties
    assert auroc(a, b) == pytest.approx(roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[a, b]))
    fpr, tpr = roc_curve(a, b)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(a, b)) and fpr[-1] == tpr[-1] == 1.0
    assert auroc([0.0, 1.0], [np.nan, 2.0]) == 1.0  # a diverged energy counts as out-of-distribution


def test_psnr_known():
    x = np.zeros((2, 1, 4, 4))
    assert psnr(x + 0.1, x) == pytest.approx([20.0, 20.0])  # mse 0.01 -> 10 log10(1 / 0.01)
    assert psnr(x + 0.5, x, peak=255.0)[0] == pytest.approx(10 * np.log10(255 ** 2 / 0.25))
    assert np.isinf(psnr(x, x)).all()


def _direct_fid(a, b):
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_statistics_and_frechet_distance_match_scipy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(600, 6)) @ rng.normal(size=(6, 6))
    b = rng.gamma(2.0, size=(500, 6)) @ rng.normal(size=(6, 6)) + 1
    st = gaussian_stats(a)
    assert st["n"] == 600 and np.allclose(st["mu"], a.mean(0)) and np.allclose(st["sigma"], np.cov(a, rowvar=False))
    assert frechet_distance(st, b) == pytest.approx(_direct_fid(a, b), rel=1e-6)
    assert abs(frechet_distance(st, a)) < 1e-6  # identical sets


def _exact(mu, var, n, rng):
    """n samples whose empirical mean is mu and covariance diag(var), exactly."""
    z = rng.normal(size=(n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z * np.sqrt(var) + mu


def test_fid_of_two_gaussians_is_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2, v1, v2 = np.array([0.0, 1, 2]), np.array([1.0, 1, 0]), np.array([1.0, 4, 0.25]), np.array([4.0, 1, 1])
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()  # commuting covariances
    assert frechet_distance(gaussian_stats(_exact(mu1, v1, 400, rng)), _exact(mu2, v2, 300, rng)) \
        == pytest.approx(closed, rel=1e-6)
    ref = {"mu": mu1, "sigma": np.diag(v1), "n": 10 ** 6}  # a statistics file (pytorch-fid's keys)
    assert frechet_distance(ref, _exact(mu2, v2, 300, rng)) == pytest.approx(closed, rel=1e-6)


def test_inception_score_known():
    assert inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0)  # uniform predictions
    one_hot = 50.0 * np.eye(7)[np.arange(700) % 7]  # confident and balanced over 7 classes
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(7.0, rel=1e-6)
    logits = np.random.default_rng(3).normal(size=(300, 5))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    direct = np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean())
    assert inception_score(logits, splits=1)[0] == pytest.approx(direct, rel=1e-6)
    mean, std = inception_score(one_hot, splits=10)
    assert 6 < mean <= 7 and std >= 0


# ---- the FID path with a stand-in feature network ---------------------------------------------------------------

class StandIn(torch.nn.Module):
    """A fixed random projection as the "Inception": 12 features, 5 logits."""
    key, in_channels, resolution = "standin", 1, 16

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(256, 12)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x):
        f = torch.tanh(self.lin(x.flatten(1)))
        return f, self.head(f)


def test_reference_statistics_cached_beside_shards_and_fid_path(digits_shards, monkeypatch):
    torch.manual_seed(0)
    net = StandIn()
    spec = f"{digits_shards}/digits-{{000000..000003}}.tar"
    ref = reference_stats(net, spec, 16, 1, limit=500)
    cached = list(digits_shards.glob("fid_stats-standin-*.npz"))
    assert len(cached) == 1
    x, _ = read_images(spec, 16, 1, limit=500)
    with torch.no_grad():
        f = net(torch.as_tensor(x))[0].double().numpy()
    assert ref["n"] == 500 and np.allclose(ref["mu"], f.mean(0)) and np.allclose(ref["sigma"], np.cov(f, rowvar=False))
    monkeypatch.setattr("ebmscale.eval.fid.iter_images", lambda *a, **k: pytest.fail("not read from the cache"))
    again = reference_stats(net, spec, 16, 1, limit=500)
    assert np.array_equal(again["sigma"], ref["sigma"])
    res = fid_and_is(net, x, ref)
    assert abs(res["fid"]) < 1e-6 and 1 <= res["is"] <= 5  # the reference images themselves
    noise = np.random.default_rng(0).random(x.shape, dtype=np.float32)
    with torch.no_grad():
        g = net(torch.as_tensor(noise))[0].double().numpy()
    fid = fid_and_is(net, noise, ref)["fid"]
    assert fid > 0.1 and fid == pytest.approx(_direct_fid(f, g), rel=1e-5)


def test_missing_inception_weights_name_the_flag(tmp_path, capsys):
    with pytest.raises(ValueError, match="--inception"):
        feature_net()
    with pytest.raises(FileNotFoundError, match="--inception .*nope.pth"):
        feature_net(inception=str(tmp_path / "nope.pth"))
    np.savez(tmp_path / "s.npz", images=np.zeros((2, 1, 16, 16), np.float32), labels=np.zeros(2, int), step=0)
    with pytest.raises(SystemExit, match="--inception"):
        evaluate.main(["fid", str(tmp_path / "s.npz"), "--inception", str(tmp_path / "nope.pth"), "--shards", "x"])


# ---- evaluation sampling ------------------------------------------------------------------------------------------

class Quadratic(torch.nn.Module):
    def __init__(self, target: float):
        super().__init__()
        self.t = torch.nn.Parameter(torch.tensor(target))

    def forward(self, x, y=None):
        return ((x - self.t) ** 2).flatten(1).sum(1) * 100


def test_bf16_models_keep_fp32_chains_within_bf16_rounding_of_fp32():
    import copy
    from ebmscale.config import ModelConfig
    from ebmscale.eval.loading import cast_for_sampling
    from ebmscale.eval.ood import energy_scores
    from ebmscale.models import build_model
    torch.manual_seed(0)
    fp32 = build_model(ModelConfig(arch="resnet32", filters=8, in_channels=1, resolution=16, num_classes=10)).eval()
    bf16 = copy.deepcopy(fp32)
    assert cast_for_sampling([bf16], "bf16") == torch.bfloat16 and next(bf16.parameters()).dtype == torch.bfloat16
    kw = dict(shape=(1, 16, 16), steps=5, step_size=10.0, noise=0.005, grad_clip=0.01, seed=3)
    labels = torch.arange(8) % 10
    x32, _ = sample_rounds([fp32], labels, **kw)
    x16, _ = sample_rounds([bf16], labels, **kw)
    assert x16.dtype == torch.float32 and not torch.equal(x16, x32)  # really computed in bf16
    assert (x16 - x32).abs().max() < 0.03  # 5 steps of at most 0.1 each, gradients within bf16 rounding
    x = x32.numpy()
    e32, e16 = energy_scores([fp32], x, 10), energy_scores([bf16], x, 10)
    assert np.abs(e16 - e32).max() < 0.02 * np.abs(e32).max() + 0.05


def test_sample_rounds_relabel_nomix():
    labels = torch.arange(40) % 10
    kw = dict(shape=(1, 4, 4), steps=5, step_size=1e-3, noise=0.005, grad_clip=None, seed=3)
    x1, same = sample_rounds([Quadratic(0.3)], labels, **kw)
    assert torch.equal(x1, sample_rounds([Quadratic(0.3)], labels, **kw)[0])  # seeded
    assert torch.equal(same, labels) and x1.shape == (40, 1, 4, 4)
    _, kept = sample_rounds([Quadratic(0.3)], labels, **kw, rounds=3, relabel=1.0, nomix=3, num_classes=10)
    _, moved = sample_rounds([Quadratic(0.3)], labels, **kw, rounds=3, relabel=1.0, num_classes=10)
    assert torch.equal(kept, labels) and not torch.equal(moved, labels)
    x, _ = sample_rounds([Quadratic(0.3), Quadratic(0.7)], labels, **{**kw, "steps": 300, "noise": 0.0}, rounds=2)
    assert abs(x.mean().item() - 0.5) < 0.01  # summed energies: the product of experts peaks in between


# ---- end to end on a tiny digits run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digits_shards):
    run = tmp_path_factory.mktemp("eval") / "run"
    train(run, digits_shards, "train.steps=30", "sampler.steps=5", "checkpoint.every=10", "train.log_every=10",
          "train.sample_every=30", nproc=1)
    return run


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine run a tiny net 50x slower
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_tools_end_to_end_on_a_tiny_digits_run(tiny_run, tmp_path, monkeypatch, capsys):
    clf = tmp_path / "clf.pt"
    evaluate.main(["digits-classifier", str(clf), "--epochs", "2"])
    out = tmp_path / "samples.npz"
    for rank in (1, 0):  # two ranks: rank 1 writes its part, rank 0 writes its own and merges
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setattr(sys, "argv", ["sample.py", str(tiny_run), "--n", "30", "--init", "noise", "--steps", "3",
                                          "--rounds", "2", "--reinit", "0.1", "--ensemble", "2", "--out", str(out)])
        assert sample_tool.main() == 0
    d = np.load(out)
    assert d["images"].shape == (30, 1, 16, 16) and list(d["labels"]) == [i % 10 for i in range(30)]
    assert str(d["run"]) == str(tiny_run.resolve()) and not list(tmp_path.glob("samples.part*"))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    evaluate.main(["accuracy", str(out), "--classifier", str(clf)])
    evaluate.main(["fid", str(out), "--classifier", str(clf)])
    spec = from_yaml_file(tiny_run / "config.yaml").data.shards  # the same images again as an "OOD" source
    evaluate.main(["ood", str(tiny_run), "--n", "100", "--source", f"again={spec}"])
    evaluate.main(["restore", str(tiny_run), "--n", "8", "--steps", "5"])
    results = {p.name.split("_step")[0]: json.loads(p.read_text()) for p in (tiny_run / "eval").glob("*.json")}
    assert set(results) == {"accuracy", "fid", "ood", "restore"}
    m = {k: v for r in results.values() for k, v in r["metrics"].items()}
    assert 0 <= m["accuracy"] <= 1 and m["fid_classifier"] > 0 and 1 <= m["is_classifier"] <= 10
    assert all(0 <= m[f"ood/auroc_{k}"] <= 1 for k in ("uniform", "constant", "interpolation"))
    assert m["ood/auroc_again"] == pytest.approx(0.5)
    assert {"inpaint/psnr_input", "inpaint/psnr_restored", "denoise/psnr_input", "denoise/psnr_restored"} <= set(m)
    assert all(r["step"] == 30 for r in results.values())
    assert (tiny_run / "eval" / "ood_step000000030_ood_roc.png").exists()

    run_id = json.loads((tiny_run / "tracking.json").read_text())["run_id"]
    db = sqlite3.connect(tiny_run.parent / "mlflow.db")
    logged = dict(db.execute("select key, value from metrics where run_uuid=? and key like 'eval/%'", (run_id,)))
    assert logged["eval/accuracy"] == pytest.approx(m["accuracy"]) and "eval/ood/auroc_uniform" in logged


def test_evaluation_skips_checkpoints_the_guard_marked_unhealthy(tmp_path, capsys):
    from ebmscale.eval.loading import resolve_checkpoint
    root = tmp_path / "run" / "checkpoints"
    for step, ok in ((10, True), (20, False)):
        (root / f"step_{step:09d}").mkdir(parents=True)
        (root / f"step_{step:09d}" / "COMMITTED").write_text(json.dumps({"step": step, "healthy": ok}))
        (root / f"step_{step:09d}" / "trainer.json").write_text(json.dumps({"step": step, "world_size": 1}))
        (root / f"step_{step:09d}" / "rank_00000.pt").write_bytes(b"buffer")  # what commit() checks is there
    assert resolve_checkpoint(tmp_path / "run") == (tmp_path / "run", root / "step_000000010")
    assert "step_000000020 was marked unhealthy" in capsys.readouterr().err
    assert resolve_checkpoint(root / "step_000000020")[1] == root / "step_000000020"  # named: used as asked
    (root / "step_000000010" / "COMMITTED").write_text(json.dumps({"step": 10, "healthy": False}))
    with pytest.raises(FileNotFoundError, match="no healthy committed checkpoint"):
        resolve_checkpoint(tmp_path / "run")


def test_sample_merge_waits_for_this_launchs_parts_not_stale_ones(tmp_path):
    out = tmp_path / "s.npz"
    part = lambda r: out.with_name(f"s.part{r:05d}of00002.npz")  # noqa: E731
    meta = {"checkpoint": "/run/checkpoints/step_000000020", "settings": '{"seed": 1}'}
    sample_tool.save(part(0), images=np.zeros((2, 1, 4, 4)), labels=np.array([0, 1]), **meta)
    sample_tool.save(part(1), images=np.ones((2, 1, 4, 4)), labels=np.array([5, 5]),  # a crashed launch's
                     **{**meta, "settings": '{"seed": 0}'})
    with pytest.raises(TimeoutError, match="left by an earlier launch"):
        sample_tool.merge(out, 2, 0.0, meta)
    sample_tool.save(part(1), images=np.ones((2, 1, 4, 4)), labels=np.array([2, 3]), **meta)
    merged = sample_tool.merge(out, 2, 0.0, meta)
    assert list(merged["labels"]) == [0, 1, 2, 3] and not part(0).exists() and not part(1).exists()


def test_evaluation_reads_pipe_shards_only_when_allowed(digits_shards):
    from ebmscale.config import ConfigError
    spec = f"pipe:cat {sorted(digits_shards.glob('*.tar'))[0]}"
    with pytest.raises(ConfigError, match="allow_pipe"):
        read_images(spec, 16, 1, 5)
    x, y = read_images(spec, 16, 1, 5, allow_pipe=True)  # a run with data.allow_pipe, or --shards as typed
    assert x.shape == (5, 1, 16, 16) and y.shape == (5,)
