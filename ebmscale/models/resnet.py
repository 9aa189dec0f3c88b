"""The IGEBM ResNet energy functions (Du & Mordatch 2019; openai/ebm_code_release models.py).

Each net: 3x3 stem conv -> residual blocks -> activation -> global sum pool -> linear -> one energy.
Widths are multiples of `filters` (128 for the 32px nets, 64 for ResNet128).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

# arch -> ((width multiple of filters, downsample), ...); the stem conv is always in_channels -> filters
ARCH_BLOCKS = {
    "resnet32": ((1, True), (1, False), (2, True), (2, False), (2, True), (2, False)),
    "resnet32large": ((1, True), (1, False), (1, False), (2, True), (2, False), (2, False),
                      (4, True), (4, False), (4, False)),
    "resnet32wider": ((2, True), (2, False), (2, False), (4, True), (4, False), (4, False),
                      (8, True), (8, False), (8, False)),
    "resnet128": ((1, True), (2, True), (4, True), (8, True), (8, True), (8, False)),
}


def _conv(cin: int, cout: int, k: int, sn: bool) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    return spectral_norm(conv) if sn else conv


def _act(name: str) -> nn.Module:
    return {"leaky_relu": lambda: nn.LeakyReLU(0.2), "swish": nn.SiLU}[name]()


class ResBlock(nn.Module):
    """The official conditioning: a per-class bias on the input of each conv, a per-class gain on the
    output of the second. Unconditional nets keep one (learned) row of each table, as the release does."""

    def __init__(self, cin: int, cout: int, downsample: bool, num_classes: int, sn: bool, act: nn.Module):
        super().__init__()
        self.conditional = num_classes > 0
        self.downsample = downsample
        self.act = act
        self.conv1 = _conv(cin, cout, 3, sn)
        self.conv2 = _conv(cout, cout, 3, sn)
        self.shortcut = _conv(cin, cout, 1, sn) if cin != cout else nn.Identity()
        k = max(num_classes, 1)
        self.bias1, self.bias2, self.gain2 = nn.Embedding(k, cin), nn.Embedding(k, cout), nn.Embedding(k, cout)
        nn.init.zeros_(self.bias1.weight)
        nn.init.zeros_(self.bias2.weight)
        nn.init.ones_(self.gain2.weight)
        # A learned scale on the residual branch. Measured on the digits demo: starting it at 0 (identity
        # blocks, the release's near-zero conv2) leaves it near 0.03 after 500 Adam steps at lr 3e-4, so the
        # net stays almost linear and barely conditional; torch's spectral norm already bounds the branch.
        self.res_scale = nn.Parameter(torch.ones(1))

    def _cond(self, table: nn.Embedding, y: Optional[torch.Tensor]) -> torch.Tensor:
        w = table(y) if self.conditional else table.weight[:1]
        return w[:, :, None, None]  # [N or 1, C, 1, 1]

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.act(self.conv1(x + self._cond(self.bias1, y)))
        h = self.conv2(h + self._cond(self.bias2, y)) * self._cond(self.gain2, y) * self.res_scale
        h = h + self.shortcut(x)
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return self.act(h)


class EnergyModel(nn.Module):
    def __init__(self, arch: str = "resnet32", filters: int = 128, in_channels: int = 3, resolution: int = 32,
                 num_classes: int = 0, activation: str = "leaky_relu", spectral_norm: bool = True):
        super().__init__()
        if arch not in ARCH_BLOCKS:
            raise ValueError(f"unknown arch '{arch}'; allowed: {', '.join(ARCH_BLOCKS)}")
        n_down = sum(d for _, d in ARCH_BLOCKS[arch])
        if resolution % 2 ** n_down:
            raise ValueError(f"{arch} downsamples {n_down} times; resolution {resolution} is not a multiple "
                             f"of {2 ** n_down}")
        self.arch, self.resolution, self.num_classes = arch, resolution, num_classes
        self.act = _act(activation)
        self.stem = _conv(in_channels, filters, 3, spectral_norm)
        blocks, cin = [], filters
        for mult, down in ARCH_BLOCKS[arch]:
            blocks.append(ResBlock(cin, mult * filters, down, num_classes, spectral_norm, self.act))
            cin = mult * filters
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [N, C, H, W] in [0, 1]; y: [N] class labels (ignored when unconditional) -> energies [N]."""
        if self.num_classes > 0 and y is None:
            raise ValueError("this model is class-conditional: pass labels y")
        h = self.act(self.stem(x))
        for block in self.blocks:
            h = block(h, y)
        h = self.act(h).sum(dim=(2, 3))
        return self.fc(h).squeeze(1)


def build_model(cfg) -> EnergyModel:
    """cfg: the `model` config section (DictConfig or ModelConfig)."""
    return EnergyModel(arch=cfg.arch, filters=cfg.filters, in_channels=cfg.in_channels,
                       resolution=cfg.resolution, num_classes=cfg.num_classes,
                       activation=cfg.activation, spectral_norm=cfg.spectral_norm)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
