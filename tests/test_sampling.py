import math

import torch

from ebmscale.sampling import frozen, langevin, model_energy


def test_quadratic_energy_gives_the_gaussian():
    """E(x) = |x - mu|^2 / (2 s^2) and noise^2 = 2 * step: Langevin samples ~ N(mu, s^2)."""
    torch.manual_seed(0)
    mu, s, step = 0.5, 0.05, 1e-4
    energy = lambda x: ((x - mu) ** 2).flatten(1).sum(1) / (2 * s * s)
    x0 = torch.rand(2000, 1, 2, 2)
    x, stats = langevin(energy, x0, steps=2000, step_size=step, noise=math.sqrt(2 * step), clamp=False)
    assert abs(x.mean().item() - mu) < 0.005
    assert abs(x.std().item() - s) / s < 0.05
    assert stats.energy_end < stats.energy_start


def test_grad_clip_bounds_each_move_and_clamp_keeps_range():
    energy = lambda x: -1000.0 * x.flatten(1).sum(1)  # pushes every pixel up, hard
    x0 = torch.full((4, 1, 3, 3), 0.5)
    x, _ = langevin(energy, x0, steps=1, step_size=10.0, noise=0.0, grad_clip=0.01)
    assert torch.allclose(x, torch.full_like(x, 0.6))  # 0.5 + 10 * 0.01, not + 10 * 1000
    x, _ = langevin(energy, x0, steps=5, step_size=10.0, noise=0.0, grad_clip=None)
    assert x.max() <= 1.0 and x.min() >= 0.0


def test_mask_moves_only_free_pixels_and_input_untouched():
    energy = lambda x: (x ** 2).flatten(1).sum(1)
    x0 = torch.rand(3, 1, 4, 4)
    keep = x0.clone()
    mask = torch.zeros_like(x0)
    mask[..., :2, :] = 1
    x, _ = langevin(energy, x0, steps=10, step_size=0.1, noise=0.01, mask=mask)
    assert torch.equal(x[..., 2:, :], x0[..., 2:, :]) and not torch.equal(x[..., :2, :], x0[..., :2, :])
    assert torch.equal(x0, keep)


def test_chains_stay_fp32_with_bf16_energy_and_params_frozen():
    lin = torch.nn.Linear(4, 1).to(torch.bfloat16)
    model = torch.nn.Sequential(torch.nn.Flatten(), lin)
    fn = lambda x, y: model(x.to(torch.bfloat16)).squeeze(1)  # the energy gets fp32 x and casts it (as EnergyModel)
    wrapped = type("M", (torch.nn.Module,), {"forward": lambda self, x, y: fn(x, y)})()
    wrapped.inner = model
    with frozen(wrapped) as m:
        assert not any(p.requires_grad for p in m.parameters())
        x, _ = langevin(model_energy(m, None, torch.bfloat16), torch.full((2, 1, 2, 2), 0.99), steps=3,
                        step_size=1e-3, noise=0.005)
    assert x.dtype == torch.float32
    assert all(p.requires_grad for p in wrapped.parameters())
    assert lin.weight.grad is None  # no parameter gradients from sampling
    assert not torch.all(x == 0.99)  # 0.005 noise survives: it would round away in bf16 near 1.0
