"""Pictures the trainer logs: sample grids, Langevin-chain GIFs and E+ vs E- histograms, as HxWx3 uint8 arrays."""
from pathlib import Path

import numpy as np
from PIL import Image


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def upscale(images, min_side: int = 64) -> np.ndarray:
    """[N,C,H,W] -> the same, each side repeated (nearest neighbour) until it is >= min_side pixels: small
    images (16x16 digits) stay legible in the MLflow UI, which shows pictures at their own size."""
    x = _numpy(images)
    k = max(1, -(-min_side // max(1, min(x.shape[-2:]))))
    return x if k == 1 else x.repeat(k, axis=-2).repeat(k, axis=-1)


def image_grid(images, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """[N,C,H,W] in [0,1] (numpy or torch, C = 1 or 3) -> HxWx3 uint8, `nrow` images per row."""
    x = _numpy(images)
    n, c, h, w = x.shape
    x = (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    if c == 1:
        x = x.repeat(3, axis=3)
    cols = max(1, min(nrow, n))
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for i, im in enumerate(x):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = im
    return grid


def chain_gif(frames, path: Path, nrow: int = 8, ms_per_frame: int = 100) -> Path:
    """Animated GIF of Langevin chains: frames = one [N,C,H,W] batch per sampler step; the last frame lingers."""
    pics = [Image.fromarray(image_grid(f, nrow)) for f in frames]
    durations = [ms_per_frame] * (len(pics) - 1) + [ms_per_frame * 10]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=durations, loop=0)
    return Path(path)


def energy_histogram(e_pos, e_neg, bins: int = 50) -> np.ndarray:
    """Histogram of the energies of data (E+) and of samples (E-) -> HxWx3 uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
    pos, neg = _numpy(e_pos).ravel(), _numpy(e_neg).ravel()
    bad = int((~np.isfinite(pos)).sum() + (~np.isfinite(neg)).sum())
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    edges = np.histogram_bin_edges(np.concatenate([pos, neg]), bins)
    fig = Figure(figsize=(5, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.hist(pos, edges, alpha=0.6, label=f"E+ data (mean {pos.mean() if pos.size else np.nan:.3g})")
    ax.hist(neg, edges, alpha=0.6, label=f"E- samples (mean {neg.mean() if neg.size else np.nan:.3g})")
    ax.set_xlabel("energy")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    if bad:
        ax.set_title(f"{bad} non-finite energies left out", fontsize=9, color="red")
    fig.tight_layout()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
