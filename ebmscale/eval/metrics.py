"""The numbers of the paper's tables, on arrays: AUROC/ROC with energy as the score, PSNR, Gaussian feature
statistics, and the Fréchet distance and Inception Score (computed by torchmetrics' implementations)."""
from __future__ import annotations

import warnings

import numpy as np
import torch


def _scores(s) -> np.ndarray:
    s = np.asarray(s, np.float64).ravel()
    return np.where(np.isnan(s), np.inf, s)  # a diverged (NaN) energy counts as "very high": out-of-distribution


def auroc(score_in, score_out) -> float:
    """Area under the ROC curve of "high score = out-of-distribution": P(s_out > s_in) + P(s_out == s_in) / 2
    (Mann-Whitney U with average ranks, so ties count one half). 1 = separable, 0.5 = chance."""
    a, b = _scores(score_in), _scores(score_out)
    x = np.concatenate([a, b])
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based average rank of each tie group
    return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def roc_curve(score_in, score_out) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, positives = out-of-distribution;
    its trapezoid area equals `auroc`."""
    a, b = _scores(score_in), _scores(score_out)
    s, y = np.concatenate([b, a]), np.r_[np.ones(len(b)), np.zeros(len(a))]
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last position of each distinct score
    return np.r_[0, np.cumsum(1 - y)[last] / len(a)], np.r_[0, np.cumsum(y)[last] / len(b)]


def psnr(x, ref, peak: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB of x against ref ([N, ...] in [0, peak]); inf where identical."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    mse = ((x - ref) ** 2).reshape(len(x), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak ** 2 / mse)


class _Given(torch.nn.Module):
    """The "feature extractor" handed to torchmetrics: the features are computed already."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def _fid_metric(dim: int):
    from torchmetrics.image.fid import FrechetInceptionDistance
    return FrechetInceptionDistance(feature=_Given(dim), reset_real_features=False)  # float64 sums


def gaussian_stats(features) -> dict:
    """{"mu", "sigma" (with N - 1), "n"} of [N, D] features, accumulated in float64 by torchmetrics' FID metric;
    the keys of pytorch-fid's statistics files."""
    f = torch.as_tensor(np.asarray(features)).double()
    m = _fid_metric(f.shape[1])
    for chunk in f.split(4096):
        m.update(chunk, real=True)
    n = int(m.real_features_num_samples)
    mu = m.real_features_sum / n
    sigma = (m.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    return {"mu": mu.numpy(), "sigma": sigma.numpy(), "n": n}


def frechet_distance(reference: dict, features) -> float:
    """FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2) between `reference` ({"mu", "sigma", "n"}) and the
    statistics of `features` [N, D], computed by torchmetrics' FrechetInceptionDistance."""
    f = torch.as_tensor(np.asarray(features)).double()
    m = _fid_metric(f.shape[1])
    n, mu = int(reference["n"]), torch.as_tensor(np.asarray(reference["mu"], np.float64))
    sigma = torch.as_tensor(np.asarray(reference["sigma"], np.float64))
    m.real_features_sum, m.real_features_num_samples = mu * n, torch.tensor(n)  # its state: sums, not moments
    m.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    for chunk in f.split(4096):
        m.update(chunk, real=False)
    return float(m.compute())


def inception_score(logits, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std over `splits`) of exp(E_x KL(p(y|x) || p(y))) from classifier logits [N, K], by torchmetrics'
    InceptionScore (it shuffles before splitting; `seed` makes that repeatable)."""
    from torchmetrics.image.inception import InceptionScore
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer": that is what we want
        m = InceptionScore(feature=_Given(0), splits=splits)
        m.update(torch.as_tensor(np.asarray(logits)).double())
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            mean, std = m.compute()
    return float(mean), float(std) if splits > 1 else 0.0
