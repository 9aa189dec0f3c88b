"""The KL term reaches the parameters only through the sampler's last steps, and never through the frozen copy."""
import pytest
import torch
from torch import nn

from ebmscale.sampling import langevin
from ebmscale.sampling.kl import differentiable_steps, evaluating, kl_loss


class Quadratic(nn.Module):
    """E_theta(x) = theta/2 * |x|^2 per sample: dE/dx = theta x, so one step maps x to (1 - eta theta) x."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x, y=None):
        return 0.5 * self.theta * x.double().pow(2).flatten(1).sum(1)


@pytest.mark.parametrize("k", [1, 2])
def test_kl_gradient_flows_only_through_the_last_k_steps(k):
    torch.manual_seed(0)
    theta, eta, total = 0.7, 0.3, 5
    model = Quadratic(theta)
    x0 = torch.rand(4, 1, 3, 3) * 0.5
    with evaluating(model, weights_grad=False):  # the first steps: plain CD sampling, no graph
        x_mid, _ = langevin(lambda x: model(x), x0, total - k, eta, 0.0)
    with evaluating(model, weights_grad=True):
        x_final = differentiable_steps(lambda x: model(x), x_mid, k, eta, 0.0)
    with evaluating(model, weights_grad=False):
        loss = kl_loss(lambda x: model(x), x_final)
    (grad,) = torch.autograd.grad(loss, model.theta)
    # by hand: x_T = a^k x_mid with a = 1 - eta theta; L = mean theta_frozen/2 |x_T|^2
    # dL/dtheta = mean theta |x_T|^2 / a^k * d(a^k)/dtheta = mean theta |x_T|^2 * k (-eta) / a
    a = 1 - eta * theta
    xt2 = x_final.detach().double().pow(2).flatten(1).sum(1)
    assert torch.allclose(x_final.detach().double(), a ** total * x0.double(), atol=1e-6)  # the whole chain ran
    expected = (theta * xt2 * k * (-eta) / a).mean()
    assert grad.item() == pytest.approx(expected.item(), rel=1e-6)  # the chains are fp32
    # what an unfrozen evaluation would add (0.5 |x_T|^2): absent
    assert abs(grad.item() - (expected + 0.5 * xt2.mean()).item()) > 1e-3


def test_no_gradient_without_differentiable_steps_and_flags_restored():
    model = Quadratic(0.5)
    x = torch.rand(2, 1, 2, 2)
    with evaluating(model, weights_grad=False):
        loss = kl_loss(lambda v: model(v), x)
    assert not loss.requires_grad
    assert model.theta.requires_grad and model.training


def test_clipped_and_clamped_elements_carry_no_gradient():
    model = Quadratic(1.0)
    x = torch.tensor([0.001, 0.5]).view(1, 1, 1, 2)
    with evaluating(model, weights_grad=True):
        xf = differentiable_steps(lambda v: model(v), x, 1, 1.0, 0.0, grad_clip=0.01)
    (g,) = torch.autograd.grad(xf.sum(), model.theta)
    # element 0: |theta x| = 0.001 < clip -> d/dtheta = -x = -0.001; element 1: clipped at 0.01 -> 0
    assert g.item() == pytest.approx(-0.001, rel=1e-6)


def test_on_the_resnet_the_kl_reaches_the_weights_and_leaves_spectral_norm_alone():
    from ebmscale.config import load_config
    from ebmscale.models import build_model
    from ebmscale.train.icd import ICD
    cfg = load_config("configs/digits.yaml", ["model.filters=4", "icd.enabled=true", "icd.kl_steps=2",
                                              "icd.entropy_bank=8", "icd.entropy_compare=4", "sampler.grad_clip=null"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    icd = ICD(cfg, (1, 16, 16), "cpu")
    icd.remember(torch.rand(8, 1, 16, 16), step=0)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("_u", "_v"))}
    y = torch.randint(0, 10, (4,))
    x_final = icd.last_steps(model, torch.rand(4, 1, 16, 16), y, torch.float32)
    loss, stats = icd.loss(model, x_final, y, torch.float32)
    loss.backward()
    assert stats["icd/entropy"] != 0 and model.training and all(p.requires_grad for p in model.parameters())
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # no power iteration in ICD passes
