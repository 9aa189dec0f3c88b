"""Checkpoint cost of an ImageNet128-sized replay buffer (10,000 x 3 x 128 x 128 uint8 per rank, ~0.5 GB).

Measures, for one rank's shard, through the trainer's own code (`ReplayBuffer`, `Checkpointer`):
  stall   the time the training loop waits per save (snapshot of the buffer + starting the writer thread)
  write   the background write until the file is durable (fsync), i.e. what the next step's commit may wait for
  load    torch.load(mmap) + load_state_dict at resume, and the extra resident memory it needs

  python tools/bench.py checkpoint [--capacity 10000 --size 128 --dir /path/on/the/shared/fs]
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ebmscale.bench import positive, write_json
from ebmscale.buffer import ReplayBuffer
from ebmscale.train.checkpoint import Checkpointer


def add_args(p) -> None:
    p.add_argument("--capacity", type=positive, default=10000)
    p.add_argument("--size", type=positive, default=128)
    p.add_argument("--dtype", default="uint8", choices=["uint8", "fp16"])
    p.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    p.add_argument("--repeat", type=positive, default=3)
    p.add_argument("--json", default="runs/bench/checkpoint.json")


def _rss_mb() -> float:
    """Anonymous resident memory: what a second copy would cost (mmap'd file pages are reclaimable)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    return kb / 1024


class _NoEngine:  # the DeepSpeed part is measured by DeepSpeed's own save; here only our files
    def save_checkpoint(self, save_dir, tag, **kw):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)


def run(a) -> dict:
    shape = (3, a.size, a.size)
    buf = ReplayBuffer(a.capacity, shape, 1000, a.dtype)
    buf.push(torch.rand(a.capacity, *shape), torch.randint(0, 1000, (a.capacity,)))
    mb = buf.images.numel() * buf.images.element_size() / 2 ** 20
    root = Path(a.dir or tempfile.mkdtemp(prefix="ebm-ckpt-bench-"))
    rows = []
    for i in range(a.repeat):
        ck = Checkpointer(root / "checkpoints", SimpleNamespace(async_buffer=True, keep_last=1, keep_every=0,
                                                                  resume="auto"), rank=0, world_size=1)
        t0 = time.perf_counter()
        ck.save(_NoEngine(), i + 1, {"buffer": buf.state_dict()}, {"step": i + 1})
        stall = time.perf_counter() - t0
        t1 = time.perf_counter()
        ck.commit()
        write = stall + time.perf_counter() - t1
        folder = root / "checkpoints" / f"step_{i + 1:09d}"
        fresh = ReplayBuffer(a.capacity, shape, 1000, a.dtype)
        rss0 = _rss_mb()
        t2 = time.perf_counter()
        sd = torch.load(folder / "rank_00000.pt", map_location="cpu", weights_only=False, mmap=True)
        fresh.load_state_dict(sd["buffer"])
        load = time.perf_counter() - t2
        extra = _rss_mb() - rss0
        del sd
        assert torch.equal(fresh.images, buf.images)
        rows.append({"stall_s": stall, "write_s": write, "load_s": load, "load_extra_rss_mb": extra})
    best = {k: min(r[k] for r in rows) for k in rows[0]}
    result = {"buffer_mb": mb, "capacity": a.capacity, "shape": shape, "dtype": a.dtype, "dir": str(root),
              "runs": rows, "best": best, "write_mb_per_s": mb / best["write_s"]}
    print(f"replay-buffer shard {a.capacity} x {shape} {a.dtype} = {mb:.0f} MB, written to {root}")
    print(f"{'':>8} {'stall (s)':>10} {'write (s)':>10} {'load (s)':>9} {'load +RSS (MB)':>15}")
    for i, r in enumerate(rows):
        print(f"{'run ' + str(i):>8} {r['stall_s']:10.3f} {r['write_s']:10.2f} {r['load_s']:9.2f} "
              f"{r['load_extra_rss_mb']:15.0f}")
    print(f"training stall per save {best['stall_s']:.3f} s; the write ({mb / best['write_s']:.0f} MB/s) overlaps "
          f"the next step; loading needs {best['load_extra_rss_mb']:.0f} MB beyond the buffer itself")
    if not a.dir:
        shutil.rmtree(root, ignore_errors=True)
    write_json(a.json, result)
    return result
