"""Reservoir sampling (ebmscale/reservoir.py): every pushed sample kept with probability capacity / pushed."""
import pytest
import torch

from ebmscale.buffer import reshard
from ebmscale.reservoir import ReservoirBuffer


def stream_into(buf: ReservoirBuffer, total: int, batch: int) -> None:
    for start in range(0, total, batch):
        ids = torch.arange(start, min(start + batch, total))
        buf.push(torch.zeros(len(ids), 1, 1, 1), ids, ids)


@pytest.mark.slow  # over 10 s on 2 busy cores
def test_each_sample_kept_with_probability_capacity_over_pushed():
    torch.manual_seed(0)
    capacity, total, trials = 10, 100, 4000
    kept = torch.zeros(total)
    for _ in range(trials):
        b = ReservoirBuffer(capacity, (1, 1, 1), num_classes=total, dtype="fp16")
        stream_into(b, total, batch=7)  # batches that straddle the fill point and collide on slots
        assert len(b) == capacity and b.seen == total and b.labels.unique().numel() == capacity
        kept[b.labels] += 1
    share = kept / trials
    # binomial std at p=0.1, 4000 trials: 0.0047; the seed is fixed, so 0.025 (5 std) is a margin, never a flake
    assert (share - capacity / total).abs().max() < 0.025, share
    early, late = share[:50].mean(), share[50:].mean()
    assert abs(early - late) < 0.01  # a ring buffer would give early 0, late 0.2


def test_ring_until_full_then_state_resumes_exactly():
    torch.manual_seed(1)
    b = ReservoirBuffer(6, (1, 1, 1), num_classes=50, dtype="fp16")
    stream_into(b, 4, batch=4)
    assert b.labels[:4].tolist() == [0, 1, 2, 3] and b.seen == 4
    stream_into(b, 30, batch=5)
    sd = b.state_dict()
    c = ReservoirBuffer(6, (1, 1, 1), num_classes=50, dtype="fp16")
    c.load_state_dict(sd)
    assert c.seen == b.seen == 34
    torch.manual_seed(2)
    b.push(torch.zeros(5, 1, 1, 1), torch.arange(100, 105))
    torch.manual_seed(2)
    c.push(torch.zeros(5, 1, 1, 1), torch.arange(100, 105))
    assert torch.equal(b.labels, c.labels)


def test_reshard_splits_the_seen_count_and_keeps_every_sample():
    torch.manual_seed(3)
    shards = []
    for r in range(2):
        b = ReservoirBuffer(8, (1, 1, 1), num_classes=1000, dtype="fp16")
        stream_into(b, 41 + r, batch=4)
        shards.append(b.state_dict())
    parts = [reshard(shards, 3, r, capacity=8)[0] for r in range(3)]
    assert sum(p["seen"] for p in parts) == 41 + 42
    assert sorted(sum((p["labels"].tolist() for p in parts), [])) == sorted(sum((s["labels"].tolist() for s in shards), []))
    c = ReservoirBuffer(8, (1, 1, 1), num_classes=1000, dtype="fp16")
    c.load_state_dict(parts[0])
    assert c.seen == parts[0]["seen"]
