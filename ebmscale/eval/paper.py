"""The IGEBM release's evaluation protocol, step for step, and the paper's numbers to set ours beside.

Sampling for IS/FID (test_inception.py compute_inception): for every 1,000 images a fresh buffer; 200 iterations,
each takes 512 chains - new uniform-noise chains with random labels until the buffer holds 1,000 (two batches:
1,024, all of which are then drawn from), afterwards 512 drawn with replacement, 1% restarted from noise and 10%
relabelled except in the last 10 iterations - and runs 20 Langevin steps (step 10, noise 0.005, dE/dx clipped to
+-0.05) of ONE model of the ensemble, the models taken in turn (cycled, not summed). The first 1,000 chains of
the buffer are the images, quantised floor(256 x). IS uses len / 5000 splits; the FID reference is CIFAR-10
train + test (60,000) or the ImageNet test images.

Restoration (ebm_sandbox.py): inpainting (boxcorrupt) replaces the bottom half by uniform noise and runs 10 x 20
Langevin steps on it alone, no gradient clip, the true label given; the score is the mean squared error over the
whole image, on training and on held-out images. Denoising (anticorrupt) sets 5% of the pixel positions to 0.1
and 5% to 0.9 and runs 5 x 20 steps on every pixel; the release only saves the picture, so we score it the same
way. Both also as PSNR.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ebmscale.eval.metrics import psnr
from ebmscale.eval.restore import restore
from ebmscale.eval.sample import composed_energy, frozen_all
from ebmscale.sampling import langevin

# Du & Mordatch 2019: Table 1 (IS / FID), the OOD table (AUROC, unconditional CIFAR-10 model). Only numbers the
# paper prints; the release's inpainting MSE has no published value to compare with.
PAPER = {
    "cifar10": {"is": 8.30, "fid": 37.9},  # conditional ResNet32, 10-checkpoint ensemble
    "cifar10_uncond": {"is": 6.02, "fid": 40.58, "ood/auroc_svhn": 0.63, "ood/auroc_textures": 0.48,
                       "ood/auroc_constant": 0.30, "ood/auroc_uniform": 1.0, "ood/auroc_interpolation": 0.70},
    "imagenet128": {"is": 28.6, "fid": 43.7},
}

RELEASE_SAMPLING = dict(buffer_size=1000, batch=512, iterations=200, steps=20, step_size=10.0, noise=0.005,
                        grad_clip=0.05, reinit=0.01, relabel=0.1, nomix=10)


def quantise(x: torch.Tensor) -> np.ndarray:
    """test_inception.py rescale_im: floor(256 x) clipped to 0..255."""
    return (x * 256).clamp(0, 255).to(torch.uint8).numpy()


def release_samples(models: Sequence[torch.nn.Module], n: int, num_classes: int, shape: tuple, buffer_size=1000,
                    batch=512, iterations=200, steps=20, step_size=10.0, noise=0.005, grad_clip=0.05, reinit=0.01,
                    relabel=0.1, nomix=10, seed: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (n uint8 images [n, C, H, W], their labels), by test_inception.py's procedure (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dev = next(models[0].parameters()).device
    k = max(num_classes, 1)
    images, labels = [], []
    with frozen_all(models):
        for _ in tqdm(range(math.ceil(n / buffer_size)), desc="buffers", disable=not progress):
            xs, ys = torch.empty((0, *shape)), torch.empty(0, dtype=torch.long)
            for i in range(iterations):
                model = models[i % len(models)]  # one model per iteration, in turn
                if len(xs) < buffer_size:
                    idx = None
                    x0, y = torch.rand((batch, *shape), generator=g), torch.randint(0, k, (batch,), generator=g)
                else:
                    idx = torch.randint(0, len(xs), (batch,), generator=g)
                    x0, y = xs[idx].clone(), ys[idx].clone()
                    fresh = torch.rand(batch, generator=g) > 1 - reinit
                    new_label = torch.rand(batch, generator=g) > 1 - relabel
                    noise_x, noise_y = torch.rand((batch, *shape), generator=g), torch.randint(0, k, (batch,), generator=g)
                    if i < iterations - nomix:
                        x0[fresh], y[new_label] = noise_x[fresh], noise_y[new_label]
                label = y.to(dev) if num_classes > 0 else None
                x, _ = langevin(composed_energy([model], [label]), x0.to(dev), steps, step_size, noise, grad_clip)
                x = x.cpu()
                if idx is None:
                    xs, ys = torch.cat([xs, x]), torch.cat([ys, y])
                else:  # set_elms: in order, so of repeated indices the last chain stays
                    xs[idx], ys[idx] = x, y
            images.append(quantise(xs[:buffer_size]))
            labels.append(ys[:buffer_size].numpy())
    return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def _scores(restored: np.ndarray, clean: np.ndarray, start: np.ndarray, prefix: str) -> dict:
    mse = ((restored - clean) ** 2).mean((1, 2, 3))
    return {f"{prefix}/mse": mse.mean(), f"{prefix}/mse_std": mse.std(), f"{prefix}/psnr": psnr(restored, clean).mean(),
            f"{prefix}/mse_input": ((start - clean) ** 2).mean(), f"{prefix}/psnr_input": psnr(start, clean).mean()}


def release_inpaint(model, x: np.ndarray, labels: Optional[np.ndarray], step_size: float, noise: float = 0.005,
                    steps: int = 200, seed: int = 0, prefix: str = "inpaint") -> tuple[dict, np.ndarray]:
    """boxcorrupt: the bottom half uniform noise, `steps` Langevin steps there alone, no clip."""
    rng = np.random.default_rng(seed)
    mask = np.zeros_like(x)
    mask[..., x.shape[2] // 2:, :] = 1
    start = (x * (1 - mask) + rng.random(x.shape, dtype=np.float32) * mask).astype(np.float32)
    out = restore([model], start, labels, mask, steps, step_size, noise, None, seed)
    return _scores(out, x, start, prefix), out


def release_denoise(model, x: np.ndarray, labels: Optional[np.ndarray], step_size: float, noise: float = 0.005,
                    steps: int = 100, seed: int = 0, prefix: str = "denoise") -> tuple[dict, np.ndarray]:
    """anticorrupt: 5% of pixel positions (all channels) set to 0.1, 5% to 0.9; `steps` steps on every pixel."""
    rng = np.random.default_rng(seed)
    u = rng.random((x.shape[0], 1, *x.shape[2:]))
    start = np.where(u < 0.05, 0.1, np.where(u < 0.1, 0.9, x)).astype(np.float32)
    out = restore([model], start, labels, None, steps, step_size, noise, None, seed)
    return _scores(out, x, start, prefix), out


def markdown_table(metrics: dict, paper: dict, title: str) -> str:
    """One row per metric: ours, the paper's (where it printed one)."""
    rows = [f"## {title}", "", "| metric | ours | paper |", "|---|---|---|"]
    for key in sorted(metrics):
        ref = paper.get(key)
        rows.append(f"| {key} | {metrics[key]:.4g} | {'' if ref is None else f'{ref:g}'} |")
    return "\n".join(rows) + "\n"
