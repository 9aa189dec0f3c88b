"""The replay buffer: one shard per rank, a fixed-capacity ring of past Langevin samples.

Storage is preallocated tensors (uint8 with dequantization noise on reuse, as the IGEBM
release, or fp16), so push and sample cost O(batch) whatever the capacity.

The uint8 codec: `unbiased` stores floor(256 x) and decodes (v + U(0, 1)) / 256, so a round trip keeps the
mean; `release` is train.py compress_x_mod / decompress_x_mod: floor(255 x), decoded v / 256 + U(0, 1/256),
which pulls every reused sample towards 0 by a factor 255/256 (1.0 comes back as at most 0.9961).
"""
from __future__ import annotations

from typing import Optional

import torch

from ebmscale.config import icd_active


class ReplayBuffer:
    def __init__(self, capacity: int, shape: tuple, num_classes: int = 0, dtype: str = "uint8",
                 fresh_fraction: float = 0.05, device: str | torch.device = "cpu", codec: str = "unbiased"):
        self.capacity, self.shape, self.num_classes = capacity, tuple(shape), num_classes
        self.dtype, self.fresh_fraction, self.levels = dtype, fresh_fraction, 255.0 if codec == "release" else 256.0
        store = torch.uint8 if dtype == "uint8" else torch.float16
        self.images = torch.zeros((capacity, *self.shape), dtype=store, device=device)
        self.labels = torch.zeros(capacity, dtype=torch.long, device=device)
        self.born = torch.zeros(capacity, dtype=torch.long, device=device)  # step of the chain's start
        self.size = 0
        self.ptr = 0

    def __len__(self) -> int:
        return self.size

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == "uint8":
            return (x * self.levels).floor().clamp(0, 255).to(torch.uint8)
        return x.to(torch.float16)

    def _decode(self, v: torch.Tensor) -> torch.Tensor:
        if self.dtype == "uint8":
            return (v.float() + torch.rand(v.shape, device=v.device)) / 256.0
        return v.float()

    def push(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, born: Optional[torch.Tensor] = None) -> None:
        n = x.shape[0]
        if n > self.capacity:
            x, n = x[-self.capacity:], self.capacity
            y = None if y is None else y[-self.capacity:]
            born = None if born is None else born[-self.capacity:]
        idx = (self.ptr + torch.arange(n, device=self.images.device)) % self.capacity
        self.images[idx] = self._encode(x.detach().to(self.images.device))
        self.labels[idx] = 0 if y is None else y.to(self.labels.device)
        self.born[idx] = 0 if born is None else born.to(self.born.device)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.size, (n,), device=self.images.device)
        return self._decode(self.images[idx]), self.labels[idx].clone(), self.born[idx].clone()

    def init_chains(self, n: int, step: int, device: torch.device | str = "cpu",
                    labels: Optional[torch.Tensor] = None):
        """Chain starts: `fresh_fraction` uniform noise, the rest from the buffer (all noise while it holds
        less than one batch). Their labels: `labels` when given (the release gives the chains the data batch's
        labels, train.py 252-256), else each reused sample's stored label and random ones for fresh chains.
        Returns (x fp32, labels, fresh mask, born)."""
        noise = torch.rand((n, *self.shape), device=device)
        fresh_labels = torch.randint(0, max(self.num_classes, 1), (n,), device=device) if labels is None \
            else labels.to(device)
        born = torch.full((n,), step, dtype=torch.long, device=device)
        if self.size < n:
            return noise, fresh_labels, torch.ones(n, dtype=torch.bool, device=device), born
        fresh = torch.rand(n, device=device) < self.fresh_fraction
        bx, by, bb = (t.to(device) for t in self.sample(n))
        keep = ~fresh
        x = torch.where(keep.view(-1, *[1] * len(self.shape)), bx, noise)
        y = fresh_labels if labels is not None else torch.where(keep, by, fresh_labels)
        return x, y, fresh, torch.where(keep, bb, born)

    def state_dict(self) -> dict:
        """The filled slots in storage order plus the write position, so a resumed run draws exactly
        the same samples; `born` orders them by age for re-sharding."""
        n = self.size
        snap = {k: getattr(self, k)[:n].to("cpu", copy=True) for k in ("images", "labels", "born")}  # one copy
        return {**snap, "ptr": self.ptr, "dtype": self.dtype, "shape": self.shape}

    def load_state_dict(self, sd: dict) -> None:
        if tuple(sd["shape"]) != self.shape or sd["dtype"] != self.dtype:
            raise ValueError(f"buffer shard holds {sd['dtype']} {tuple(sd['shape'])} samples; this run expects "
                             f"{self.dtype} {self.shape} (buffer.dtype / model.resolution / model.in_channels)")
        n = sd["images"].shape[0]
        if n > self.capacity:
            raise ValueError(f"buffer shard holds {n} samples, more than buffer.capacity={self.capacity}")
        self.images[:n] = sd["images"].to(self.images.device)
        self.labels[:n] = sd["labels"].to(self.labels.device)
        self.born[:n] = sd["born"].to(self.born.device)
        self.size = n
        self.ptr = int(sd.get("ptr", n)) % self.capacity if n == self.capacity else n % self.capacity


# Reservoir sampling (the ICD release's `ReservoirBuffer`, Vitter's algorithm R); ebmscale.reservoir names it too.
#
# The ring buffer keeps the newest `capacity` chains; the reservoir keeps a uniform sample of every chain ever
# pushed: the n-th sample (1-based, over the rank's whole run) enters with probability capacity / n and then
# replaces a uniformly chosen slot. Old modes of the sampler stay represented, which the ICD paper credits
# with more diverse negatives. Storage, encoding, sampling and chain starts are the ring's (buffer.py).
#
# State: the ring's, plus `seen` (samples pushed so far). Re-sharding (buffer.reshard) splits `seen` evenly
# over the new ranks, so each keeps admitting new samples at the rate its share of the history implies.
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


def build_buffer(cfg, device: str | torch.device = "cpu") -> ReplayBuffer:
    """This rank's buffer as a run's config (`buffer`, `model`, `icd.reservoir`) describes it."""
    m, b = cfg.model, cfg.buffer
    kind = ReservoirBuffer if icd_active(cfg) and cfg.icd.reservoir else ReplayBuffer
    return kind(b.capacity, (m.in_channels, m.resolution, m.resolution), m.num_classes, b.dtype,
                b.fresh_fraction, device=device, codec=getattr(b, "codec", None) or "unbiased")


def reshard(shards: list[dict], world_size: int, rank: int, capacity: int) -> tuple[dict, int]:
    """This rank's share when `len(shards)` buffer shards are resumed on `world_size` ranks.
    Every sample goes to exactly one rank (round-robin over all samples, oldest first); if the new shard
    would exceed `capacity`, the oldest are dropped and their number returned. A reservoir's `seen` count is split
    evenly over the new ranks (ebmscale/reservoir.py). Only the rank's own rows
    of each shard are read, so with mmap-loaded shards memory stays at one share however many there are."""
    born = torch.cat([s["born"] for s in shards])
    source = torch.cat([torch.full((len(s["born"]),), i, dtype=torch.long) for i, s in enumerate(shards)])
    row = torch.cat([torch.arange(len(s["born"])) for s in shards])
    mine = torch.argsort(born, stable=True)[rank::world_size]  # oldest first, so capacity drops the oldest
    dropped = max(0, mine.numel() - capacity)
    mine = mine[dropped:]
    images = torch.empty((mine.numel(), *shards[0]["shape"]), dtype=shards[0]["images"].dtype)
    labels = torch.empty(mine.numel(), dtype=torch.long)
    for i, s in enumerate(shards):
        at = (source[mine] == i).nonzero().squeeze(1)
        images[at], labels[at] = s["images"][row[mine[at]]], s["labels"][row[mine[at]]]
    share = {"images": images, "labels": labels, "born": born[mine], "dtype": shards[0]["dtype"], "shape": shards[0]["shape"]}
    if any("seen" in s for s in shards):
        seen = sum(int(s.get("seen", len(s["born"]))) for s in shards)
        share["seen"] = seen // world_size + (rank < seen % world_size)
    return share, dropped
