"""Draw samples from a trained model: from noise, or refined from the saved replay buffer; for evaluation, the
paper's test-time procedure (a persistent buffer of chains refined for many rounds, a small share of chains and
labels re-initialised after each round)."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from ebmscale.sampling import frozen, langevin, model_energy


def _dtype(m: torch.nn.Module) -> torch.dtype:
    return next(m.parameters()).dtype


def composed_energy(models: Sequence[torch.nn.Module], labels: Sequence[Optional[torch.Tensor]]):
    """Sum of energies: several models (an ensemble, or composition of concepts) and/or labels. Each model
    computes in its parameters' dtype (`loading.cast_for_sampling`), NHWC when that is bf16/fp16, as the
    trainer's sampler; chains and energies stay fp32."""
    parts = [model_energy(m, y, _dtype(m), channels_last=_dtype(m) != torch.float32) for m in models for y in labels]

    def energy(x: torch.Tensor) -> torch.Tensor:
        return sum(e(x) for e in parts)
    return energy


@contextlib.contextmanager
def frozen_all(models: Sequence[torch.nn.Module]):
    """`frozen` for every model at once: no parameter gradients, spectral norms computed once (stored NHWC for
    the models that `composed_energy` feeds NHWC)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(frozen(m, channels_last=_dtype(m) != torch.float32)) for m in models]


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


def sample_rounds(models: Sequence[torch.nn.Module], labels: torch.Tensor, shape: tuple, steps: int,
                  step_size: float, noise: float, grad_clip: Optional[float], rounds: int = 1, reinit: float = 0.0,
                  relabel: float = 0.0, nomix: int = 0, num_classes: int = 0, init: str = "noise",
                  buffer: Optional[dict] = None, seed: int = 0, batch: int = 256,
                  extra_labels: Sequence[torch.Tensor] = (), progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`rounds` sweeps of `steps` Langevin steps over every chain, energies of all `models` summed; after each
    round but the last `nomix`, a `reinit` share of chains restarts from uniform noise and a `relabel` share draws
    a new label (as the IGEBM release's test_inception.py). Returns (samples [N, *shape] fp32 in [0, 1] on the
    CPU, their final labels)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = initial_chains(init, labels, shape, buffer, g)
    labels = labels.clone()
    dev = next(models[0].parameters()).device
    with frozen_all(models):
        for r in tqdm(range(rounds), desc="rounds", disable=not progress or rounds == 1):
            for i in range(0, labels.shape[0], batch):
                ys = [t[i:i + batch].to(dev) for t in (labels, *extra_labels)]
                out, _ = langevin(composed_energy(models, ys), x[i:i + batch].to(dev), steps, step_size, noise,
                                  grad_clip)
                x[i:i + batch] = out.cpu()
            if r < rounds - max(nomix, 1):
                fresh = torch.rand(len(x), generator=g) < reinit
                x[fresh] = torch.rand((int(fresh.sum()), *shape), generator=g)
                if num_classes > 0:
                    new = torch.rand(len(x), generator=g) < relabel
                    labels[new] = torch.randint(0, num_classes, (int(new.sum()),), generator=g)
    return x, labels
