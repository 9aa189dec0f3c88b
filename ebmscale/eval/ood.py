"""Out-of-distribution detection with the energy as the score (lower energy = in-distribution), as the paper's
OOD table: AUROC of in-distribution images against each source, with histograms and ROC curves."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ebmscale.eval.metrics import auroc, roc_curve
from ebmscale.eval.sample import composed_energy, frozen_all

SYNTHETIC = ("random", "interpolation", "uniform", "constant", "rot90", "quadrants")
RELEASE_SYNTHETIC = ("random", "interpolation")  # ebm_sandbox.py energyevalmix: randommix, and the default mix


def synthetic(kind: str, x_in: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """As many OOD images as `x_in`. The release's (ebm_sandbox.py energyevalmix): `random`, Gaussian noise
    N(0.5, 0.5^2), unclipped (randommix), and `interpolation`, the average of each image and the next one. Extras,
    not in the release's code: `uniform` noise, `constant` (one random colour per image; the paper's table has a
    "constant uniform" row), and the near-distribution `rot90` (each image a quarter turn off) and `quadrants`
    (its quadrants swapped)."""
    n, c = x_in.shape[:2]
    if kind == "random":
        return (0.5 + 0.5 * rng.standard_normal(x_in.shape)).astype(np.float32)
    if kind == "uniform":
        return rng.random(x_in.shape, dtype=np.float32)
    if kind == "constant":
        return np.broadcast_to(rng.random((n, c, 1, 1), dtype=np.float32), x_in.shape).copy()
    if kind == "interpolation":
        return (x_in + np.roll(x_in, 1, axis=0)) / 2
    if kind == "rot90":  # near the data: real strokes and statistics, a quarter turn off
        return np.rot90(x_in, 1, axes=(2, 3)).copy()
    if kind == "quadrants":  # near the data: each image's four quadrants cyclically swapped (same pixels, wrong shape)
        h, w = x_in.shape[2] // 2, x_in.shape[3] // 2
        return np.roll(np.roll(x_in, h, axis=2), w, axis=3).copy()
    raise ValueError(f"unknown synthetic source '{kind}'; allowed: {', '.join(SYNTHETIC)}")


@torch.no_grad()
def energy_scores(models: Sequence[torch.nn.Module], x, num_classes: int, how: str = "min",
                  batch: int = 256) -> np.ndarray:
    """The summed energy of `models`; a conditional model scores min_y E(x, y) (`min`, as the release) or the
    marginal -log sum_y exp(-E(x, y)) (`marginal`)."""
    dev = next(models[0].parameters()).device
    out = []
    with frozen_all(models):
        for xb in torch.as_tensor(np.asarray(x, np.float32)).split(batch):
            xb = xb.to(dev)
            if num_classes == 0:
                out.append(composed_energy(models, [None])(xb).cpu())
                continue
            e = torch.stack([composed_energy(models, [torch.full((len(xb),), c, device=dev)])(xb)
                             for c in range(num_classes)], 1)
            out.append((e.min(1).values if how == "min" else -torch.logsumexp(-e, 1)).cpu())
    return torch.cat(out).numpy()


def aurocs(score_in: np.ndarray, scores_out: dict) -> dict:
    """AUROC of the in-distribution scores against those of every source."""
    return {name: auroc(score_in, s) for name, s in scores_out.items()}


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no display
    fig = Figure(figsize=(5.5, 3.8), dpi=100)
    return fig, fig.add_subplot()


def _pixels(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig.tight_layout()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def histograms(score_in: np.ndarray, scores_out: dict, bins: int = 50) -> np.ndarray:
    """Energy histograms of the in-distribution images and of every OOD source -> HxWx3 uint8."""
    fig, ax = _figure()
    every = {"in-distribution": score_in, **scores_out}
    finite = np.concatenate([s[np.isfinite(s)] for s in every.values()])
    lo, hi = np.percentile(finite, [0.5, 99.5])
    edges = np.linspace(lo, hi, bins + 1)
    for name, s in every.items():
        ax.hist(np.clip(s, lo, hi), edges, alpha=0.5, label=name, histtype="stepfilled")
    ax.set_xlabel("energy (clipped to the 0.5-99.5th percentiles)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return _pixels(fig)


def roc_curves(score_in: np.ndarray, scores_out: dict) -> np.ndarray:
    """ROC curve of every source (OOD = positive), AUROC in the legend -> HxWx3 uint8."""
    fig, ax = _figure()
    for name, s in scores_out.items():
        fpr, tpr = roc_curve(score_in, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(score_in, s):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (in-distribution called OOD)")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=8, loc="lower right")
    return _pixels(fig)
