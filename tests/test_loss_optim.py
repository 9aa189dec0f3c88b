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


def test_official_clip_matches_a_hand_computed_release_step():
    """custom_adam.py: g clipped to +-(3 sqrt(v_{t-1} / (1 - beta2^t)) + 0.1), then Adam (beta1 = 0)."""
    lr, b2, eps = 0.01, 0.999, 1e-8
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ClippedAdam([p], lr=lr, betas=(0.0, b2), eps=eps)
    g1, g2 = [5.0, -5.0, 0.05], [100.0, 0.0, -1.0]
    # by hand, in plain floats
    c1 = [max(-0.1, min(0.1, g)) for g in g1]  # t = 1: v_0 = 0, bound 0.1
    v1 = [(1 - b2) * c * c for c in c1]
    p1 = [-lr * c / ((v / (1 - b2)) ** 0.5 + eps) for c, v in zip(c1, v1)]
    bound = [3 * (v / (1 - b2 ** 2)) ** 0.5 + 0.1 for v in v1]  # t = 2: corrected by 1 - beta2^2
    c2 = [max(-b, min(b, g)) for g, b in zip(g2, bound)]
    v2 = [b2 * v + (1 - b2) * c * c for v, c in zip(v1, c2)]
    p2 = [q - lr * c / ((v / (1 - b2 ** 2)) ** 0.5 + eps) for q, c, v in zip(p1, c2, v2)]
    assert abs(bound[0] - 0.3122) < 1e-4  # 1 - beta2^(t-1) would give 0.4
    p.grad = torch.tensor(g1, dtype=torch.float64)
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor(p1, dtype=torch.float64), rtol=1e-9, atol=0)
    p.grad = torch.tensor(g2, dtype=torch.float64)
    opt.step()
    assert torch.allclose(opt.state[p]["exp_avg_sq"], torch.tensor(v2, dtype=torch.float64), rtol=1e-9, atol=0)
    assert torch.allclose(p.detach(), torch.tensor(p2, dtype=torch.float64), rtol=1e-9, atol=0)


def test_paper_recipe_uses_the_clipped_adam():
    from ebmscale.config import CONFIG_DIR, load_config
    from ebmscale.train.optim import build_optimizer
    model = torch.nn.Linear(2, 1)
    paper = load_config(CONFIG_DIR / "cifar10.yaml")
    assert type(build_optimizer(model, paper.optim)) is ClippedAdam
    assert type(build_optimizer(model, load_config(CONFIG_DIR / "cifar10.yaml", ["recipe=ebmscale"]).optim)) \
        is torch.optim.Adam
    off = load_config(CONFIG_DIR / "cifar10.yaml", ["optim.official_clip=false"])  # an explicit key beats the recipe
    assert type(build_optimizer(model, off.optim)) is torch.optim.Adam
