"""The nearest-neighbour entropy estimate on distributions of known entropy, and the bank's loss term."""
import math

import pytest
import torch

from ebmscale.buffer import reshard
from ebmscale.train.entropy import build_bank, entropy_loss, kozachenko_leonenko, nn_log_distance


def gaussian_entropy(d, sigma):
    return 0.5 * d * math.log(2 * math.pi * math.e * sigma ** 2)


@pytest.mark.parametrize("d", [1, 2, 4])
def test_kozachenko_leonenko_matches_known_entropies(d):
    g = torch.Generator().manual_seed(d)
    n = 3000
    for sigma in (0.25, 1.0, 3.0):
        x, ref = torch.randn(n, d, generator=g) * sigma, torch.randn(n, d, generator=g) * sigma
        assert kozachenko_leonenko(x, ref) == pytest.approx(gaussian_entropy(d, sigma), abs=0.12)
    u, uref = torch.rand(n, d, generator=g), torch.rand(n, d, generator=g)
    # uniform on the unit cube: 0 nats (the faces bias the estimate upwards as d grows: 0.12 at d=4, n=3000)
    assert kozachenko_leonenko(u, uref) == pytest.approx(0.0, abs=0.05 * d)


def test_the_loss_term_orders_spread_and_is_zero_until_the_bank_is_full():
    torch.manual_seed(0)
    bank = build_bank(200, (1, 4, 4), "cpu")
    x = torch.rand(32, 1, 4, 4, requires_grad=True)
    assert entropy_loss(x, bank, 50).item() == 0.0
    bank.push(0.5 + 0.05 * torch.randn(200, 1, 4, 4))
    tight = 0.5 + 0.05 * torch.randn(32, 1, 4, 4)
    wide = 0.5 + 0.3 * torch.randn(32, 1, 4, 4)
    assert entropy_loss(wide, bank, 200) < entropy_loss(tight, bank, 200)  # lower loss = higher entropy
    loss = entropy_loss(x, bank, 50)
    (g,) = torch.autograd.grad(loss, x)
    assert g.abs().sum() > 0  # the gradient reaches the samples


def test_bank_state_resumes_and_reshards_like_the_buffer():
    torch.manual_seed(1)
    banks = [build_bank(8, (1, 2, 2), "cpu") for _ in range(2)]
    for step in range(5):
        for b in banks:
            b.push(torch.rand(3, 1, 2, 2), born=torch.full((3,), step))
    sds = [b.state_dict() for b in banks]
    c = build_bank(8, (1, 2, 2), "cpu")
    c.load_state_dict(sds[0])
    torch.manual_seed(2)
    a = nn_log_distance(torch.rand(4, 1, 2, 2), banks[0].sample(8)[0])
    torch.manual_seed(2)
    assert torch.equal(a, nn_log_distance(torch.rand(4, 1, 2, 2), c.sample(8)[0]))
    one, dropped = reshard(sds, 1, 0, capacity=8)
    assert dropped == 8 and one["born"].min() >= 3  # one rank keeps the newest rows
