"""Restoration by the energy model, PSNR against the clean image: inpainting (the masked pixels start as uniform
noise and only they move: `langevin(..., mask=)`) and denoising (Langevin from the noisy image, every pixel free)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ebmscale.eval.metrics import psnr
from ebmscale.eval.sample import composed_energy, frozen_all
from ebmscale.sampling import langevin

MASKS = ("half", "centre", "pixels")


def make_mask(kind: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """1 = missing pixel, [N, 1, H, W]: the bottom half (as the release), the centre square of half the side,
    or half of the pixels at random."""
    n, _, h, w = shape
    m = np.zeros((n, 1, h, w), np.float32)
    if kind == "half":
        m[..., h // 2:, :] = 1
    elif kind == "centre":
        m[..., h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = 1
    elif kind == "pixels":
        m[:] = rng.random(m.shape) < 0.5
    else:
        raise ValueError(f"unknown mask '{kind}'; allowed: {', '.join(MASKS)}")
    return m


def restore(models: Sequence[torch.nn.Module], start: np.ndarray, labels: Optional[np.ndarray],
            mask: Optional[np.ndarray], steps: int, step_size: float, noise: float, grad_clip: Optional[float],
            seed: int = 0, batch: int = 256) -> np.ndarray:
    """Langevin from `start` on the summed energy (conditioned on `labels` when given); `mask` limits the moves."""
    torch.manual_seed(seed)
    dev = next(models[0].parameters()).device
    out = []
    with frozen_all(models):
        for i in range(0, len(start), batch):
            y = None if labels is None else torch.as_tensor(labels[i:i + batch]).to(dev)
            mb = None if mask is None else torch.as_tensor(mask[i:i + batch]).to(dev)
            x, _ = langevin(composed_energy(models, [y]), torch.as_tensor(start[i:i + batch]).to(dev), steps,
                            step_size, noise, grad_clip, mask=mb)
            out.append(x.cpu().numpy())
    return np.concatenate(out)


def inpaint(models, x, labels, mask_kind, steps, step_size, noise, grad_clip, seed=0, batch=256) -> tuple[dict, dict]:
    """-> (PSNRs of the masked input, of a mean fill and of the restoration; the three image sets)."""
    rng = np.random.default_rng(seed)
    mask = np.broadcast_to(make_mask(mask_kind, x.shape, rng), x.shape).astype(np.float32)
    start = x * (1 - mask) + rng.random(x.shape, dtype=np.float32) * mask
    visible_mean = (x * (1 - mask)).sum((1, 2, 3), keepdims=True) / (1 - mask).sum((1, 2, 3), keepdims=True)
    out = restore(models, start, labels, mask, steps, step_size, noise, grad_clip, seed, batch)
    return ({"psnr_input": psnr(start, x).mean(), "psnr_mean_fill": psnr(x * (1 - mask) + visible_mean * mask, x).mean(),
             "psnr_restored": psnr(out, x).mean()}, {"input": start, "restored": out})


def denoise(models, x, labels, sigma, steps, step_size, noise, grad_clip, seed=0, batch=256) -> tuple[dict, dict]:
    """-> (PSNRs of the noisy input and of the restoration; the image sets). Noise: N(0, sigma^2), clipped."""
    rng = np.random.default_rng(seed)
    noisy = np.clip(x + sigma * rng.standard_normal(x.shape, dtype=np.float32), 0, 1)
    out = restore(models, noisy, labels, None, steps, step_size, noise, grad_clip, seed, batch)
    return {"psnr_input": psnr(noisy, x).mean(), "psnr_restored": psnr(out, x).mean()}, {"input": noisy, "restored": out}
