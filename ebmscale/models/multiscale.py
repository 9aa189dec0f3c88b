"""The multi-scale energy of ICD (Du et al. 2021, section 3.4; the release's `multiscale` ResNetModel).

E(x) = sum_k E_k(pool^k(x)): one energy net per input resolution (full, 1/2, 1/4, ... for `model.scales` = 1, 2,
3, ...), where pool is the release's 3x3 stride-2 average pool (padding 1). The coarse nets see global shape and
colour, the full-resolution net detail; the sampler follows the sum. Each scale's net is this framework's
ResNet at that resolution (same arch, filters and conditioning; the release uses shallower, separate nets for
the coarse scales). The release's loss sees the scales' energies side by side ([N, 3]): its CD and KL terms are
the mean over scales (the sum / 3), its L2 term the mean of each scale's own square, and its entropy weight (0.3)
is not divided; `model.scale_loss: mean` (the default) trains that loss, `sum` the summed energy's.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ebmscale.models import resnet


class MultiScaleEnergy(nn.Module):
    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.arch, self.resolution, self.num_classes = nets[0].arch, nets[0].resolution, nets[0].num_classes

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, per_scale: bool = False) -> torch.Tensor:
        """The summed energy [N]; per_scale: each scale's own, [N, scales] (the ICD release's loss averages them)."""
        energies = [self.nets[0](x, y)]
        for net in self.nets[1:]:
            x = F.avg_pool2d(x, 3, stride=2, padding=1)
            energies.append(net(x, y))
        return torch.stack(energies, -1) if per_scale else sum(energies[1:], energies[0])


def _at_resolution(cfg, resolution: int):
    if isinstance(cfg, DictConfig):
        cfg = cfg.copy()
        cfg.resolution = resolution
        return cfg
    return dataclasses.replace(cfg, resolution=resolution)


def build_model(cfg) -> nn.Module:
    """cfg: the `model` section. One ResNet, or with `scales` > 1 a MultiScaleEnergy of one per resolution."""
    scales = int(getattr(cfg, "scales", 1) or 1)
    if scales == 1:
        return resnet.build_model(cfg)
    return MultiScaleEnergy([resnet.build_model(_at_resolution(cfg, cfg.resolution // 2 ** k)) for k in range(scales)])
