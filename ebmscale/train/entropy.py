"""The ICD entropy term: a nearest-neighbour estimate against a bank of this rank's recent samples.

Kozachenko-Leonenko: for N points x_i in d dimensions and a reference set of m independent points, with rho_i the
distance from x_i to its nearest reference point,
    H ~= d/N sum_i log rho_i + log V_d + log m + gamma      (V_d the unit ball's volume, gamma Euler's constant).
Only the first term depends on the samples, so the ICD loss uses -coeff * mean_i log rho_i (the release's
`loss_repel`, coefficient 0.3): it pushes the final Langevin samples, through the sampler's last steps, away
from one another's recent predecessors, which counters mode collapse.

The bank is a ring of the most recent final samples of this rank (a fp16 ReplayBuffer without labels), so the
state is per rank: saved in the rank file beside the replay buffer, and on a new world size re-sharded as the
buffer is (buffer.reshard: every row to one rank, newest kept). The release compares against 100 draws from its
replay buffer instead (a reservoir, so a uniform sample of the whole history, augmented); see docs/recipes.md, "The ICD recipe".
"""
from __future__ import annotations

import math

import torch

from ebmscale.buffer import ReplayBuffer


def nn_log_distance(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """log of the Euclidean distance from each row of `x` to its nearest row of `ref` (both flattened): [N]."""
    d = torch.cdist(x.flatten(1).float(), ref.flatten(1).float().to(x.device),
                    compute_mode="donot_use_mm_for_euclid_dist")  # the matmul form loses small distances
    return d.min(dim=1).values.clamp_min(eps).log()


def kozachenko_leonenko(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Differential entropy (nats) of the distribution of `x` from nearest-neighbour distances to `ref`, an
    independent sample of the same distribution."""
    d, m = x.flatten(1).shape[1], ref.shape[0]
    log_unit_ball = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)
    return float(d * nn_log_distance(x, ref).double().mean()) + log_unit_ball + math.log(m) + 0.5772156649015329


def entropy_loss(x: torch.Tensor, bank: ReplayBuffer, compare: int) -> torch.Tensor:
    """-mean log nearest-neighbour distance of `x` (carrying its graph) to `compare` random bank rows; zero
    (no graph) until the bank is full."""
    if len(bank) < bank.capacity:
        return x.new_zeros(())
    ref, _, _ = bank.sample(compare)
    return -nn_log_distance(x, ref.detach()).mean()


def build_bank(capacity: int, shape: tuple, device) -> ReplayBuffer:
    return ReplayBuffer(capacity, shape, num_classes=0, dtype="fp16", fresh_fraction=0.0, device=device)
