import torch

from ebmscale.buffer import ReplayBuffer, reshard


def test_capacity_ring_and_state_order():
    b = ReplayBuffer(5, (1, 2, 2), num_classes=3)
    for i in range(3):
        b.push(torch.full((3, 1, 2, 2), i / 10), torch.full((3,), i), torch.full((3,), i))
    assert len(b) == 5 and b.images.shape[0] == 5
    sd = b.state_dict()
    assert sd["born"].tolist() == [1, 2, 2, 2, 1] and sd["ptr"] == 4  # storage order: the first push is gone
    b2 = ReplayBuffer(5, (1, 2, 2), num_classes=3)
    b2.load_state_dict(sd)
    assert torch.equal(b2.state_dict()["images"], sd["images"]) and b2.ptr == b.ptr
    torch.manual_seed(1)
    first = b.sample(4)
    torch.manual_seed(1)
    assert all(torch.equal(u, v) for u, v in zip(first, b2.sample(4)))  # a resumed run draws the same chains


def test_mix_ratio_fresh_noise_and_buffer():
    torch.manual_seed(0)
    b = ReplayBuffer(1000, (1, 4, 4), num_classes=10, fresh_fraction=0.05)
    x, y, fresh, _ = b.init_chains(64, step=0)
    assert fresh.all()  # empty buffer: all noise
    b.push(torch.zeros(1000, 1, 4, 4), torch.full((1000,), 7))
    shares = []
    for _ in range(20):
        x, y, fresh, _ = b.init_chains(1000, step=1)
        shares.append(fresh.float().mean().item())
    assert abs(sum(shares) / 20 - 0.05) < 0.01
    assert (x[~fresh] < 1 / 256 + 1e-6).all()  # reused zeros plus dequantization noise < 1/256
    assert (y[~fresh] == 7).all() and y[fresh].unique().numel() == 10  # random labels for fresh chains


def test_uint8_and_fp16_round_trip():
    x = torch.rand(8, 3, 4, 4)
    for dtype, tol in (("uint8", 1 / 256), ("fp16", 1e-3)):
        b = ReplayBuffer(8, (3, 4, 4), dtype=dtype)
        b.push(x)
        assert (b._decode(b.images) - x).abs().max() <= tol + 1e-6
    assert ReplayBuffer(8, (3, 4, 4)).images.element_size() == 1


def test_reshard_keeps_every_sample_once():
    shards = []
    for r in range(2):
        b = ReplayBuffer(10, (1, 1, 1))
        b.push(torch.arange(r * 10, r * 10 + 10).float().view(-1, 1, 1, 1) / 255, born=torch.arange(10) + r)
        shards.append(b.state_dict())
    one, dropped = reshard(shards, 1, 0, capacity=20)
    assert dropped == 0 and sorted(one["images"].flatten().tolist()) == list(range(20))
    parts = [reshard([one], 2, r, capacity=10)[0]["images"].flatten().tolist() for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(20)) and len(parts[0]) == 10


def test_reshard_from_mmap_files_of_uneven_shards_keeps_pairs_and_drops_only_the_oldest(tmp_path):
    files = []
    for r, n in enumerate([7, 3, 5]):  # shards of different fill, one sample id per image
        b = ReplayBuffer(8, (2, 2, 2), num_classes=100)
        ids = torch.arange(n) + 10 * r
        b.push((ids.float() / 255).view(-1, 1, 1, 1).expand(n, 2, 2, 2), y=ids, born=ids * 7 % 13)
        files.append(tmp_path / f"rank_{r}.pt")
        torch.save(b.state_dict(), files[-1])
    shards = [torch.load(f, mmap=True, weights_only=False) for f in files]
    every = {int(i) for s in shards for i in s["labels"]}
    for world in (1, 2, 4):
        parts = [reshard(shards, world, r, capacity=8)[0] for r in range(world)]
        got = [int(i) for p in parts for i in p["labels"]]
        for p in parts:  # each image still carries its own label, and born ages stay with them
            assert (p["images"].flatten(1).long().T == p["labels"]).all()
            assert (p["born"] == p["labels"] * 7 % 13).all()
        assert len(got) == len(set(got))
        dropped = every - set(got)
        kept_born = min(i * 7 % 13 for i in got)
        assert all(i * 7 % 13 <= kept_born for i in dropped)  # only the oldest go
        assert sum(reshard(shards, world, r, capacity=8)[1] for r in range(world)) == len(dropped)
        assert len(dropped) == {1: 15 - 8, 2: 0, 4: 0}[world]
