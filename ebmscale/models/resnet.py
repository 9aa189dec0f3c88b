"""The IGEBM ResNet energy functions (Du & Mordatch 2019; openai/ebm_code_release models.py).

Each net: 3x3 stem conv -> residual blocks -> activation -> global sum pool -> linear -> one energy.
Widths are multiples of `filters` (128 for the 32px nets, 64 for ResNet128).

The details that differ between the release and ebmscale's measured choices are constructor arguments, set
by the config's `recipe` (config.recipe_choices); the defaults here are ebmscale's. Under the release's
choices the nets hold exactly the parameters its forward pass uses (tests/test_paper_parity.py).

The stem conv always computes in fp32 on the fp32 input, and the pool and linear head in fp32, whatever the
module's dtype: in bf16 the input's spacing on [0.5, 1) is 1/256, so a cast would erase the 1/256
dequantization noise and most of the 0.005 Langevin noise before the first layer, and a bf16 energy is
rounded to 2^-8 of itself. The blocks between compute in the module's dtype.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from ebmscale.config import ARCHS

# arch -> ((width multiple of filters, downsample), ...); the stem conv is always in_channels -> filters
ARCH_BLOCKS = {
    "resnet32": ((1, True), (1, False), (2, True), (2, False), (2, True), (2, False)),
    "resnet32large": ((1, True), (1, False), (1, False), (2, True), (2, False), (2, False),
                      (4, True), (4, False), (4, False)),
    "resnet32wider": ((2, True), (2, False), (2, False), (4, True), (4, False), (4, False),
                      (8, True), (8, False), (8, False)),
    "resnet128": ((1, True), (2, True), (4, True), (8, True), (8, True), (8, False)),
}
assert tuple(ARCH_BLOCKS) == ARCHS, "config.ARCHS (the names the schema accepts) must list exactly these nets"

# torch's spectral-norm parametrization class is private: take it by name (torch 2.3-2.13), else as the class the
# public spectral_norm() registers. The release's capped norm below subclasses it and uses its power iteration.
try:
    from torch.nn.utils.parametrizations import _SpectralNorm
except ImportError:  # pragma: no cover - a torch that renamed it
    _SpectralNorm = type(spectral_norm(nn.Linear(1, 1)).parametrizations.weight[0])
_SN_INTERNALS = ("_reshape_weight_to_matrix", "_power_method")


# the initial raw weights: torch's defaults (kaiming-uniform convs and fc, a random fc bias) or the release's
# (utils.py get_weight: every spectral-normed weight N(0, 1), conv2 N(0, 1e-10); the fc xavier with a zero bias)
INITS = ("torch", "release")


class _CappedSpectralNorm(_SpectralNorm):
    """W / (sigma + 1e-6) * min(sigma + 1e-6, 1): the release's bound on conv2 (utils.py spectral_normed_weight,
    lower_bound=True). A weight with sigma below 1 is left as it is, so the N(0, 1e-10) start stays near zero."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mat = self._reshape_weight_to_matrix(weight)
        if self.training:
            self._power_method(mat, self.n_power_iterations)
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        sigma = torch.vdot(u, torch.mv(mat, v)) + 1e-6
        return weight / sigma * sigma.clamp(max=1.0)


class Fp32Conv2d(nn.Conv2d):
    """A conv that computes in fp32 whatever its parameters' dtype (the stem). Called as a module, so that ZeRO-3
    gathers its weight and bias whatever stage3_param_persistence_threshold says."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        return F.conv2d(x.float(), self.weight.float(), None if b is None else b.float(), self.stride, self.padding,
                        self.dilation, self.groups)


class Fp32Linear(nn.Linear):
    """A linear layer that computes in fp32 whatever its parameters' dtype (the energy head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


def _conv(cin: int, cout: int, k: int, sn: bool, bias: bool = True, release_residual: bool = False,
          init: str = "torch", cls: type = nn.Conv2d) -> nn.Conv2d:
    conv = cls(cin, cout, k, padding=k // 2, bias=bias)
    if init == "release":  # utils.py get_weight: the raw weight N(0, 1) under spectral norm, else xavier; 'b' zeros
        (nn.init.normal_ if sn else nn.init.xavier_uniform_)(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    if release_residual:
        # utils.py get_weight(zero=True): N(0, 1e-10) under spectral norm, zeros without
        if sn or init != "release":
            nn.init.normal_(conv.weight, std=1e-10)
        else:
            nn.init.zeros_(conv.weight)
        if sn:
            missing = [a for a in _SN_INTERNALS if not hasattr(_SpectralNorm, a)]
            if missing:  # pragma: no cover - only on an untested torch
                raise RuntimeError(f"model.residual=release with spectral norm needs torch's {_SpectralNorm.__name__}."
                                   f"{', '.join(missing)} (torch 2.13 has them; this is torch {torch.__version__}): "
                                   f"install torch 2.13, or train with model.residual=scaled")
            parametrize.register_parametrization(conv, "weight", _CappedSpectralNorm(conv.weight))
        return conv
    return spectral_norm(conv) if sn else conv


def _act(name: str) -> nn.Module:
    return {"leaky_relu": lambda: nn.LeakyReLU(0.2), "swish": nn.SiLU, "relu": nn.ReLU}[name]()


class ReleaseDropout(nn.Module):
    """Dropout that ignores train()/eval(): the release builds ResNet32Large with train=True, so every forward of
    training drops units, the Langevin steps' included (the sampler puts the module in eval mode). Evaluation
    switches it off: `set_dropout(model, False)`."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.active = p, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=self.active)


def set_dropout(model: nn.Module, active: bool) -> nn.Module:
    for m in model.modules():
        if isinstance(m, ReleaseDropout):
            m.active = active
    return model


class ResBlock(nn.Module):
    """The official conditioning: a per-class bias on the input of each conv, a per-class gain on the
    output of the second. Unconditional nets keep one (learned) row of each table, as the release does."""

    def __init__(self, cin: int, cout: int, downsample: bool, num_classes: int, sn: bool, act: nn.Module,
                 shortcut_kernel: int = 1, conv_bias: bool = True, dropout: float = 0.0, residual: str = "scaled",
                 class_gain_bias: bool = False, init: str = "torch"):
        super().__init__()
        self.conditional = num_classes > 0
        self.downsample = downsample
        self.act = act
        self.conv1 = _conv(cin, cout, 3, sn, conv_bias, init=init)
        self.conv2 = _conv(cout, cout, 3, sn, conv_bias, release_residual=residual == "release", init=init)
        self.shortcut = _conv(cin, cout, shortcut_kernel, sn, conv_bias, init=init) if cin != cout else nn.Identity()
        self.dropout = ReleaseDropout(dropout) if dropout > 0 else nn.Identity()
        k = max(num_classes, 1)
        self.bias1, self.bias2, self.gain2 = nn.Embedding(k, cin), nn.Embedding(k, cout), nn.Embedding(k, cout)
        nn.init.zeros_(self.bias1.weight)
        nn.init.zeros_(self.bias2.weight)
        nn.init.ones_(self.gain2.weight)
        # utils.py conv_block: the class gain is g[y] + cb, cb a per-channel bias shared by all classes
        self.gain2_bias = nn.Parameter(torch.zeros(cout)) if class_gain_bias and self.conditional else None
        # A learned scale on the residual branch. Measured on the digits demo: starting it at 0 (identity
        # blocks, the release's near-zero conv2) leaves it near 0.03 after 500 Adam steps at lr 3e-4, so the
        # net stays almost linear and barely conditional; torch's spectral norm already bounds the branch.
        self.res_scale = nn.Parameter(torch.ones(1)) if residual == "scaled" else None

    def _cond(self, table: nn.Embedding, y: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        # the table is called, never read: under ZeRO-3 only a module call gathers its weight
        w = table(y) if self.conditional else table(torch.zeros(1, dtype=torch.long, device=device))
        return w[:, :, None, None]  # [N or 1, C, 1, 1]

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.act(self.dropout(self.conv1(x + self._cond(self.bias1, y, x.device))))
        gain = self._cond(self.gain2, y, x.device)
        if self.gain2_bias is not None:
            gain = gain + self.gain2_bias[None, :, None, None]
        h = self.conv2(h + self._cond(self.bias2, y, x.device)) * gain
        if self.res_scale is not None:
            h = h * self.res_scale
        h = h + self.shortcut(x)
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return self.act(h)


class EnergyModel(nn.Module):
    def __init__(self, arch: str = "resnet32", filters: int = 128, in_channels: int = 3, resolution: int = 32,
                 num_classes: int = 0, activation: str = "leaky_relu", spectral_norm: bool = True,
                 shortcut_kernel: int = 1, conv_bias: bool = True, pool_activation: Optional[str] = None,
                 first_block_activation: Optional[str] = None, dropout: float = 0.0, residual: str = "scaled",
                 class_gain_bias: bool = False, init: str = "torch"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init '{init}'; allowed: {', '.join(INITS)}")
        if arch not in ARCH_BLOCKS:
            raise ValueError(f"unknown arch '{arch}'; allowed: {', '.join(ARCH_BLOCKS)}")
        n_down = sum(d for _, d in ARCH_BLOCKS[arch])
        if resolution % 2 ** n_down:
            raise ValueError(f"{arch} downsamples {n_down} times; resolution {resolution} is not a multiple "
                             f"of {2 ** n_down}")
        self.arch, self.resolution, self.num_classes = arch, resolution, num_classes
        self.act = _act(activation)
        self.pool_act = _act(pool_activation or activation)
        self.stem = _conv(in_channels, filters, 3, spectral_norm, conv_bias, init=init, cls=Fp32Conv2d)
        blocks, cin = [], filters
        for i, (mult, down) in enumerate(ARCH_BLOCKS[arch]):
            act = _act(first_block_activation) if i == 0 and first_block_activation else self.act
            blocks.append(ResBlock(cin, mult * filters, down, num_classes, spectral_norm, act, shortcut_kernel,
                                   conv_bias, dropout, residual, class_gain_bias, init))
            cin = mult * filters
        self.blocks = nn.ModuleList(blocks)
        self.fc = Fp32Linear(cin, 1)
        if init == "release":  # models.py init_fc_weight(..., 'fc5', spec_norm=False): xavier weight, zero bias
            nn.init.xavier_uniform_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [N, C, H, W] in [0, 1], best fp32 (the stem reads it in fp32); y: [N] class labels (ignored when
        unconditional) -> energies [N], fp32."""
        if self.num_classes > 0 and y is None:
            raise ValueError("this model is class-conditional: pass labels y")
        # every parameter is read inside its own module's call (ZeRO-3 gathers it there, at any persistence
        # threshold); the dtype of a parameter is known without its data
        h = self.act(self.stem(x)).to(self.fc.weight.dtype)
        for block in self.blocks:
            h = block(h, y)
        h = self.pool_act(h).float().sum(dim=(2, 3))  # fp32 pool and head: bf16 would round E to 2^-8 of itself
        return self.fc(h).squeeze(1)


MODEL_CHOICES = ("shortcut_kernel", "conv_bias", "pool_activation", "first_block_activation", "dropout",
                 "residual", "class_gain_bias", "init")


def build_model(cfg) -> EnergyModel:
    """cfg: the `model` config section (DictConfig or ModelConfig); a recipe key left null takes the default
    above (ebmscale's choice) - config.load_config fills them from the `recipe` first."""
    choices = {k: getattr(cfg, k) for k in MODEL_CHOICES if getattr(cfg, k, None) is not None}
    return EnergyModel(arch=cfg.arch, filters=cfg.filters, in_channels=cfg.in_channels,
                       resolution=cfg.resolution, num_classes=cfg.num_classes,
                       activation=cfg.activation, spectral_norm=cfg.spectral_norm, **choices)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
