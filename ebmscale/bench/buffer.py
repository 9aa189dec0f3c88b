"""Replay-buffer cost against its size: push and init_chains (the trainer's two calls per step) per batch, and
the bytes one stored sample takes. Both must stay flat in the capacity: the ring is preallocated and indexed.

  python tools/bench.py buffer                                    # CIFAR-sized samples, uint8 and fp16
  python tools/bench.py buffer --size 128 --capacities 1000 10000
"""
from __future__ import annotations

import torch

from ebmscale.bench import device, interleaved, positive, set_threads, write_json
from ebmscale.buffer import ReplayBuffer


def add_args(p) -> None:
    p.add_argument("--capacities", type=positive, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--size", type=positive, default=32)
    p.add_argument("--channels", type=positive, default=3)
    p.add_argument("--dtypes", nargs="+", default=["uint8", "fp16"], choices=["uint8", "fp16"])
    p.add_argument("--batch", type=positive, default=128)
    p.add_argument("--reps", type=positive, default=50)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch's default)")
    p.add_argument("--json", default="runs/bench/buffer.json")


def run(args) -> dict:
    dev = device()
    threads = set_threads(args.threads) if dev.type == "cpu" else 0
    shape = (args.channels, args.size, args.size)
    x = torch.rand(args.batch, *shape, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    born = torch.zeros(args.batch, dtype=torch.long, device=dev)
    fns, rows = {}, []
    for dtype in args.dtypes:
        for cap in args.capacities:
            buf = ReplayBuffer(cap, shape, 10, dtype, 0.05, device=dev)
            if dtype == "uint8":  # full, with random contents, without pushing it full
                buf.images.random_(0, 256)
            else:
                buf.images.uniform_()
            buf.size = cap
            fns[(dtype, cap, "push")] = lambda b=buf: b.push(x, y, born)
            fns[(dtype, cap, "init_chains")] = lambda b=buf: b.init_chains(args.batch, 0, dev)
            nbytes = sum(t.numel() * t.element_size() for t in (buf.images, buf.labels, buf.born))
            rows.append({"dtype": dtype, "capacity": cap, "bytes_per_sample": nbytes / cap, "mb": nbytes / 2 ** 20})
    for f in fns.values():
        f()
    times = interleaved(fns, args.reps, dev)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for r in rows:
        r["push_ms"] = 1e3 * med[(r["dtype"], r["capacity"], "push")]
        r["init_chains_ms"] = 1e3 * med[(r["dtype"], r["capacity"], "init_chains")]
    flat = {}
    for dtype in args.dtypes:
        mine = [r for r in rows if r["dtype"] == dtype]
        for op in ("push_ms", "init_chains_ms"):
            flat[f"{dtype} {op}"] = max(r[op] for r in mine) / min(r[op] for r in mine)
    print(f"replay buffer, samples {shape}, batch {args.batch}, median of {args.reps} interleaved rounds, {dev.type}"
          + (f", {threads} thread(s)" if threads else ""))
    print(f"{'dtype':>6} {'capacity':>9} {'MB':>8} {'bytes/sample':>12} {'push ms':>8} {'init_chains ms':>14}")
    for r in rows:
        print(f"{r['dtype']:>6} {r['capacity']:>9} {r['mb']:8.1f} {r['bytes_per_sample']:12.0f} {r['push_ms']:8.3f} "
              f"{r['init_chains_ms']:14.3f}")
    print("largest / smallest time over the capacities: "
          + ", ".join(f"{k.replace('_ms', '')} {v:.2f}x" for k, v in flat.items()))
    result = {"shape": shape, "batch": args.batch, "reps": args.reps, "device": dev.type, "threads": threads,
              "rows": rows, "flatness_max_over_min": flat}
    write_json(args.json, result)
    return result
