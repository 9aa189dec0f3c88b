import torch

from ebmscale.train.loss import cd_loss
from ebmscale.train.optim import ClippedAdam


def test_cd_loss_value_and_gradient_direction():
    e_pos = torch.tensor([1.0, 3.0], requires_grad=True)
    e_neg = torch.tensor([2.0, 4.0], requires_grad=True)
    loss = cd_loss(e_pos, e_neg, alpha=0.5)
    assert torch.isclose(loss, torch.tensor(2.0 - 3.0 + 0.5 * (5.0 + 10.0)))
    loss.backward()
    assert torch.allclose(e_pos.grad, torch.tensor([0.5 + 0.5, 0.5 + 1.5]))  # 1/2 + alpha * 2 e / 2
    assert torch.allclose(e_neg.grad, torch.tensor([-0.5 + 1.0, -0.5 + 2.0]))


def test_official_clip_bounds_gradient_by_second_moment():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ClippedAdam([p], lr=1.0, betas=(0.0, 0.999))
    p.grad = torch.tensor([5.0, -5.0, 0.05])
    opt.step()  # first step: clip to +-0.1
    v = opt.state[p]["exp_avg_sq"].clone()
    assert torch.allclose(v, (1 - 0.999) * torch.tensor([0.1, 0.1, 0.05]) ** 2)
    p.grad = torch.tensor([100.0, 0.0, 0.0])
    opt.step()
    bound = 3 * (v[0] / (1 - 0.999)).sqrt() + 0.1  # v_hat before this step
    v2 = opt.state[p]["exp_avg_sq"][0]
    assert torch.isclose(v2, 0.999 * v[0] + 0.001 * bound ** 2)
