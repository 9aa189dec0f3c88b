"""Reservoir sampling for the replay buffer (the ICD release's `ReservoirBuffer`, Vitter's algorithm R).

The ring buffer keeps the newest `capacity` chains; the reservoir keeps a uniform sample of every chain ever
pushed: the n-th sample (1-based, over the rank's whole run) enters with probability capacity / n and then
replaces a uniformly chosen slot. Old modes of the sampler stay represented, which the ICD paper credits
with more diverse negatives. Storage, encoding, sampling and chain starts are the ring's (buffer.py).

State: the ring's, plus `seen` (samples pushed so far). Re-sharding (buffer.reshard) splits `seen` evenly
over the new ranks, so each keeps admitting new samples at the rate its share of the history implies.
"""
from __future__ import annotations

from typing import Optional

import torch

from ebmscale.buffer import ReplayBuffer


class ReservoirBuffer(ReplayBuffer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = 0

    def push(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, born: Optional[torch.Tensor] = None) -> None:
        n, dev = x.shape[0], self.images.device
        order = torch.arange(n, device=dev)
        free = self.capacity - self.size
        # the first `free` fill the empty slots in order; each later one draws j ~ U{0..seen_i - 1} (seen_i its
        # 1-based position in the stream) and replaces slot j when j < capacity: kept with probability capacity/seen_i
        draw = (torch.rand(n, device=dev) * (self.seen + 1 + order)).long()
        slot = torch.where(order < free, self.size + order, draw)
        later_same = (slot[:, None] == slot[None, :]) & (order[None, :] > order[:, None])
        write = (slot < self.capacity) & ~later_same.any(1)  # as one-at-a-time: of two picks of a slot, the later wins
        idx, src = slot[write], order[write]
        self.images[idx] = self._encode(x.detach().to(dev)[src])
        self.labels[idx] = 0 if y is None else y.to(dev)[src]
        self.born[idx] = 0 if born is None else born.to(dev)[src]
        self.seen += n
        self.size = min(self.size + n, self.capacity)
        self.ptr = self.size % self.capacity

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seen": self.seen}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.seen = max(int(sd.get("seen", self.size)), self.size)  # a ring buffer's state: count what it holds
