"""Draw samples from a trained model: from noise, or refined from the saved replay buffer."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ebmscale.sampling import frozen, langevin


def composed_energy(models: Sequence[torch.nn.Module], labels: Sequence[Optional[torch.Tensor]]):
    """Sum of energies: several models (an ensemble, or composition of concepts) and/or labels."""
    def energy(x: torch.Tensor) -> torch.Tensor:
        return sum(m(x, y).float() for m in models for y in labels)
    return energy


def initial_chains(kind: str, labels: torch.Tensor, shape: tuple, buffer: Optional[dict],
                   generator: torch.Generator) -> torch.Tensor:
    n = labels.shape[0]
    if kind == "noise" or buffer is None:
        return torch.rand((n, *shape), generator=generator)
    x = torch.empty((n, *shape))
    for c in labels.unique():
        pool = (buffer["labels"] == c).nonzero().flatten()
        if pool.numel() == 0:
            pool = torch.arange(buffer["labels"].numel())
        take = pool[torch.randint(0, pool.numel(), (int((labels == c).sum()),), generator=generator)]
        v = buffer["images"][take]
        x[labels == c] = (v.float() + torch.rand(v.shape, generator=generator)) / 256 \
            if buffer["dtype"] == "uint8" else v.float()
    return x


def sample(model: torch.nn.Module, labels: torch.Tensor, shape: tuple, steps: int, step_size: float,
           noise: float, grad_clip: Optional[float], init: str = "noise", buffer: Optional[dict] = None,
           seed: int = 0, batch: int = 256, extra_labels: Sequence[torch.Tensor] = (),
           models: Sequence[torch.nn.Module] = ()) -> torch.Tensor:
    """Samples in [0, 1], fp32, [N, *shape]; `labels` condition them (ignored when unconditional).
    `extra_labels` / `models` add energies (composition, historical ensembles)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x0 = initial_chains(init, labels, shape, buffer, g)
    out = []
    all_models = [model, *models]
    with frozen(model):
        for i in range(0, labels.shape[0], batch):
            y = labels[i:i + batch]
            ys = [y, *[e[i:i + batch] for e in extra_labels]]
            x, _ = langevin(composed_energy(all_models, ys), x0[i:i + batch], steps, step_size, noise, grad_clip)
            out.append(x)
    return torch.cat(out)
