"""The KL term of improved contrastive divergence (Du, Li, Tenenbaum & Mordatch 2021, eq. 7).

Contrastive divergence drops the gradient that flows through the sampler: the final samples x_T depend on the
parameters theta through every Langevin step. ICD keeps a tractable part of it: the last K steps are run with
`create_graph=True`, so x_T(theta) carries dE/dx's dependence on theta, and the loss gains
    L_KL = mean_i E_frozen(x_T,i)
where E_frozen is the same network with its weights held constant (no gradient through them: the release sets
`requires_grad_(False)` around that forward). Minimising L_KL moves theta so that the sampler's last steps land
on lower energy, i.e. makes the sampler a better minimiser of the current energy.

The frozen copy is the current weights at this step (what the release does: the very same module, not a lagged
or EMA copy), so it has no state of its own to checkpoint. Both passes run with the model in eval mode: spectral
norm's power iteration runs once per step, in the training forward, as without ICD.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def evaluating(model: nn.Module, weights_grad: bool):
    """The model in eval mode; its parameters frozen unless `weights_grad` (restored on exit)."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    if not weights_grad:
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def differentiable_steps(energy: EnergyFn, x: torch.Tensor, steps: int, step_size: float, noise: float,
                         grad_clip: Optional[float] = None, clamp: bool = True) -> torch.Tensor:
    """`steps` Langevin steps as sampling.langevin takes them (noise, clipped gradient step, clamp to [0, 1]),
    but keeping the graph: the result is a function of the energy's parameters. `x` is detached first."""
    x = x.detach().float().requires_grad_(True)
    scale = getattr(energy, "grad_scale", 1.0)  # fp16 compute: as sampling.langevin, halved on overflow
    scale = float(scale.scale) if hasattr(scale, "scale") else float(scale)  # the sampler's InputGradScale: one sync
    for _ in range(steps):
        if noise > 0:
            x = x + noise * torch.randn_like(x)
        while True:
            (g,) = torch.autograd.grad(energy(x).sum() * scale, x, create_graph=True)
            if scale == 1.0 or bool(torch.isfinite(g).all()):
                break
            scale = max(scale / 2, 1.0)
        g = g.float() / scale
        if grad_clip is not None:
            g = g.clamp(-grad_clip, grad_clip)
        x = x - step_size * g
        if clamp:
            x = x.clamp(0.0, 1.0)
    return x


def kl_loss(frozen_energy: EnergyFn, x_final: torch.Tensor) -> torch.Tensor:
    """Mean energy of the final samples under the frozen weights: call inside `evaluating(model, False)`."""
    return frozen_energy(x_final).float().mean()
