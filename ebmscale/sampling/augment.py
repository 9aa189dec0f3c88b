"""Data-augmentation transitions inside the Langevin chains (ICD, Du et al. 2021, section 3.3).

An augmentation is a large move between modes that small gradient steps would take long to make; ICD applies one
to every chain restarted from the replay buffer, so each chain takes an augmentation transition once per training
step, i.e. every `sampler.steps` Langevin steps (the release: its buffer's `sample()` transforms every draw).
The release's set (torchvision, per image, for cifar10): RandomResizedCrop(scale=(0.08, 1)), RandomHorizontalFlip,
ColorJitter(0.8s, 0.8s, 0.8s, 0.4s) with p 0.8, RandomGrayscale(p 0.2). Here the same, batched on the device:
the crop and flip as one affine resampling (bilinear, border padding), the jitter in a fixed order (brightness,
contrast, saturation, hue as a rotation in YIQ) instead of torchvision's random order; every op keeps [0, 1].
Randomness comes from torch's global RNG, which the checkpoints restore per rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)


def _u(n: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=like.device)


class ChainAugment:
    def __init__(self, crop_scale: float = 0.08, flip: bool = True, color_jitter: float = 1.0, grayscale: float = 0.2):
        self.crop_scale, self.flip, self.jitter, self.grayscale = crop_scale, flip, color_jitter, grayscale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] fp32 in [0, 1] -> augmented, same shape, in [0, 1]."""
        if self.crop_scale < 1 or self.flip:
            x = self.crop_flip(x)
        if self.jitter > 0:
            x = self.color(x)
        if self.grayscale > 0 and x.shape[1] == 3:
            gray = (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(x)
            x = torch.where((torch.rand(x.shape[0], device=x.device) < self.grayscale).view(-1, 1, 1, 1), gray, x)
        return x.clamp(0.0, 1.0)

    def crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        area = _u(n, self.crop_scale, 1.0, x)
        ratio = _u(n, math.log(3 / 4), math.log(4 / 3), x).exp()
        w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)  # fractions of the side
        if self.crop_scale >= 1:  # flip only
            w, h = torch.ones_like(w), torch.ones_like(h)
        cx, cy = _u(n, -1.0, 1.0, x) * (1 - w), _u(n, -1.0, 1.0, x) * (1 - h)  # the box stays inside the image
        sign = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0) if self.flip else torch.ones_like(w)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def color(self, x: torch.Tensor) -> torch.Tensor:
        n, c, s = x.shape[0], x.shape[1], self.jitter
        on = (torch.rand(n, device=x.device) < 0.8).view(-1, 1, 1, 1)
        out = x * _u(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, x).view(-1, 1, 1, 1)  # brightness
        out = out.clamp(0, 1)
        gray = self._gray(out)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        out = (mean + _u(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, x).view(-1, 1, 1, 1) * (out - mean)).clamp(0, 1)
        if c == 3:
            gray = self._gray(out)
            out = (gray + _u(n, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, x).view(-1, 1, 1, 1) * (out - gray)).clamp(0, 1)
            out = self._hue(out, _u(n, -min(0.4 * s, 0.5), min(0.4 * s, 0.5), x) * 2 * math.pi).clamp(0, 1)
        return torch.where(on, out, x)

    @staticmethod
    def _gray(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return x
        return (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)

    @staticmethod
    def _hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        """Rotate the chroma plane of YIQ by `angle` (radians, per image)."""
        to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        yiq = torch.einsum("ij,njhw->nihw", to_yiq, x)
        cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
        i, q = yiq[:, 1], yiq[:, 2]
        yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
        return torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_yiq), yiq)


def augment_chains(augment: ChainAugment, x0: torch.Tensor, y: torch.Tensor, fresh: torch.Tensor):
    """The transition on the chains restarted from the buffer; fresh noise chains and every label unchanged."""
    keep = fresh.view(-1, *[1] * (x0.dim() - 1))
    return torch.where(keep, x0, augment(x0)), y
