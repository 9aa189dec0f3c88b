"""Langevin dynamics on any energy callable.

Per step: x += N(0, noise^2); g = dE/dx (clamped to +-grad_clip when set); x -= step_size * g;
x is clamped to [0, 1]. The chains stay fp32 whatever precision the energy runs in: a noise of
0.005 is below bf16's resolution near 1.0, so only the energy's input is cast.

Speed (measured in ebmscale/bench/README.md): the energy runs in the compute dtype on a channels-last
input, spectral-norm weights are computed once per sampling call (`frozen`), only dE/dx is computed
(parameters frozen, `torch.autograd.grad`), and nothing in the loop waits for the device: the noise is
drawn on it and the stats stay tensors. With fp32 compute and a contiguous input the samples are
bit-identical to a plain `.backward()` loop (tests/test_perf_paths.py).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

EnergyFn = Callable[[torch.Tensor], torch.Tensor]  # x [N,C,H,W] fp32 -> energies [N]; optional attribute grad_scale
# fp16 compute: dE/dx of a smooth energy is ~1e-4..1e-6 per pixel, at or below fp16's smallest normal (6e-5), so the
# backward runs on the energy times this (halved on overflow); bf16 and fp32 have fp32's exponent range and need none
FP16_INPUT_GRAD_SCALE = 2.0 ** 14


class InputGradScale:
    """fp16 compute's scale on the energy before dE/dx, kept on the device and carried from step to step and from call
    to call (the trainer holds one for the run): no host sync. A step whose scaled gradient overflows moves by its
    noise only (its gradient is dropped, counted in `overflows`) and halves the scale; `growth_every` finite steps in
    a row double it, as torch's GradScaler does for parameter gradients."""

    def __init__(self, device, init: float = FP16_INPUT_GRAD_SCALE, growth_every: int = 200, max_scale: float = 2.0 ** 24):
        self.scale = torch.tensor(float(init), device=device)
        self.streak = torch.zeros((), device=device)
        self.overflows = torch.zeros((), device=device)
        self.growth_every, self.max_scale = growth_every, max_scale

    def unscale(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient of scale * E -> dE/dx (zero where it overflowed); updates the scale, all on the device."""
        ok = torch.isfinite(g).all()
        g = torch.where(ok, g / self.scale, torch.zeros_like(g))
        self.streak = torch.where(ok, self.streak + 1, torch.zeros_like(self.streak))
        grow = self.streak >= self.growth_every
        self.scale = torch.where(ok, torch.where(grow, (self.scale * 2).clamp(max=self.max_scale), self.scale),
                                 (self.scale / 2).clamp(min=1.0))
        self.streak = torch.where(grow, torch.zeros_like(self.streak), self.streak)
        self.overflows = self.overflows + (~ok).float()
        return g


@dataclass
class LangevinStats:
    energy_start: torch.Tensor  # mean energy before the first step (0-dim, no sync taken)
    energy_end: torch.Tensor
    grad_abs: torch.Tensor  # mean |dE/dx| over the chain
    step_change: torch.Tensor  # mean |x_t+1 - x_t| per pixel per step

    def as_floats(self) -> dict:
        return {k: float(v) for k, v in self.__dict__.items()}


def langevin(energy: EnergyFn, x: torch.Tensor, steps: int, step_size: float, noise: float,
             grad_clip: Optional[float] = None, clamp: bool = True, mask: Optional[torch.Tensor] = None,
             frames: Optional[List[torch.Tensor]] = None, frame_every: int = 0,
             generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, LangevinStats]:
    """Run `steps` Langevin steps from `x` (not modified). `mask` (1 = free pixel) restricts the
    moves, for inpainting. `frames` collects detached snapshots every `frame_every` steps (a copy
    to the host each time: only for pictures)."""
    x = x.detach().float().clone()
    x0 = x.clone()
    grad_abs = x.new_zeros(())
    e_start = e_end = x.new_zeros(())
    scale = getattr(energy, "grad_scale", 1.0)
    scale = scale if isinstance(scale, InputGradScale) else float(scale)
    for t in range(steps):
        if noise > 0:
            eps = torch.randn(x.shape, device=x.device, generator=generator) if generator is not None \
                else torch.randn_like(x)
            x = x + noise * (eps if mask is None else eps * mask)
        x = x.detach().requires_grad_(True)
        e, g, scale = energy_and_input_grad(energy, x, scale)
        x = x.detach()
        if grad_clip is not None:
            g = g.clamp(-grad_clip, grad_clip)
        if mask is not None:
            g = g * mask
        x = x - step_size * g
        if clamp:
            x = x.clamp(0.0, 1.0)
        grad_abs = grad_abs + g.abs().mean()
        if t == 0:
            e_start = e.detach().float().mean()
        if t == steps - 1:
            e_end = e.detach().float().mean()
        if frames is not None and frame_every and t % frame_every == 0:
            frames.append(x.detach().cpu())
    n = max(steps, 1)
    stats = LangevinStats(e_start, e_end, grad_abs / n, (x - x0).abs().mean() / n)
    return x, stats


def energy_and_input_grad(energy: EnergyFn, x: torch.Tensor, scale: float = 1.0):
    """E(x) and dE/dx (fp32) with no parameter gradients. `scale` > 1 (fp16 compute) scales the energy before the
    backward so that small input-gradients do not flush to zero in fp16, and is halved until the gradient is
    finite; returns the scale that worked (the next step starts there). An `InputGradScale` (what fp16 sampling
    uses) instead drops an overflowed step's gradient and halves its scale on the device, without a host sync."""
    if isinstance(scale, InputGradScale):
        e = energy(x)
        (g,) = torch.autograd.grad(e.sum() * scale.scale, x)
        return e, scale.unscale(g.float()), scale
    while True:
        e = energy(x)
        (g,) = torch.autograd.grad(e.sum() * scale if scale != 1.0 else e.sum(), x)
        g = g.float()
        if scale == 1.0:
            return e, g, scale
        if bool(torch.isfinite(g).all()):  # one sync per step, fp16 only
            return e, g / scale, scale
        scale = max(scale / 2, 1.0)


@contextlib.contextmanager
def frozen(model: nn.Module, channels_last: bool = False):
    """Parameters frozen and spectral-norm weights computed once, on entry, for the whole sampling call;
    with `channels_last`, stored NHWC, as NHWC convolutions want them (else each converts its weight at
    every step: ResNet128 at batch 2 on CPU, 1.2x)."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no power iteration per Langevin step; the training forward keeps updating it
    try:
        with parametrize.cached():
            # ZeRO-3 partitions parameters outside the forward: there the cache fills at the first step
            if not any(hasattr(p, "ds_id") for p in model.parameters()):
                for m in model.modules():  # a compiled energy reads these as inputs, not recomputing them
                    if parametrize.is_parametrized(m):
                        for name in m.parametrizations:
                            getattr(m, name)
                cache = getattr(parametrize, "_cache", None)  # torch's cache of the computed weights
                if channels_last and cache is None:
                    warnings.warn("torch.nn.utils.parametrize._cache is gone in this torch: sampler.channels_last "
                                  "now converts every weight at every Langevin step (slower, same samples)")
                for key, w in list(cache.items()) if channels_last and cache else ():
                    if w is not None and w.dim() == 4:
                        cache[key] = w.contiguous(memory_format=torch.channels_last)
            yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def _forward(model: nn.Module, x: torch.Tensor, labels: Optional[torch.Tensor], dtype: torch.dtype,
             memory_format: torch.memory_format) -> torch.Tensor:
    return model(x.contiguous(memory_format=memory_format), labels).float()  # fp32 x: the stem reads it in fp32


@functools.cache
def _compiled_forward():
    return torch.compile(_forward)


def model_energy(model: nn.Module, labels: Optional[torch.Tensor], dtype: torch.dtype,
                 channels_last: bool = False, compile: bool = False,
                 grad_scale: Optional[InputGradScale] = None) -> EnergyFn:
    """An energy callable over a bare module (never a DeepSpeed engine): fp32 chains, `dtype` compute; the module
    gets the fp32 chain and casts it itself (EnergyModel's stem reads it in fp32, models/resnet.py).
    `channels_last` feeds the convolutions NHWC (faster in bf16 on CPU and GPU; in fp32 it changes the
    summation order, not the maths); `compile` runs the forward (and so its input-backward) through
    torch.compile, once per model, dtype and batch shape. Use inside `frozen(model)`. fp16: `grad_scale`, the run's
    InputGradScale to carry from call to call (a new one, starting at 2^14, when None)."""
    fwd = _compiled_forward() if compile else _forward
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def energy(x: torch.Tensor) -> torch.Tensor:
        return fwd(model, x, labels, dtype, fmt)
    if dtype == torch.float16:
        energy.grad_scale = grad_scale if grad_scale is not None else InputGradScale(
            next(model.parameters()).device)
    else:
        energy.grad_scale = 1.0
    return energy
