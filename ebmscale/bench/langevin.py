"""Langevin sampling speed: ebmscale's sampler against the plain PyTorch loop, same network, batch and noise.

Rows: the plain loop (bench/__init__.py: fp32, parameters frozen, .backward(), clamp) in fp32 and under bf16
autocast, then ebmscale's sampler (frozen + model_energy + langevin, as Trainer.sample_negatives runs it) in fp32,
fp32 + channels_last, bf16, bf16 + channels_last, the config's default (train.precision resolved on this hardware:
bf16 where native, else fp32; sampler.channels_last) and, with --compile, bf16 + channels_last + torch.compile. Columns:
image x Langevin-steps/s, achieved FLOP/s (FlopCounterMode on one energy + input-gradient step), its share of the
fp32 and bf16 GEMM peaks measured in the same rounds, the speed-up over plain fp32, and the largest difference of
the samples from plain fp32's (same seed, same noise). On a GPU also the MFU against the device's bf16 peak.

  python tools/bench.py langevin                                           # CIFAR ResNet32, batch 16
  python tools/bench.py langevin --config configs/imagenet128.yaml --batch 2 --compile
"""
from __future__ import annotations

import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ebmscale.bench import (device, gemm, hardware_line, interleaved, nominal_peak, plain_frozen, plain_langevin,
                            set_threads, positive, write_json)
from ebmscale.config import load_config
from ebmscale.models import build_model
from ebmscale.precision import compute_dtype, resolve_here
from ebmscale.sampling import frozen, langevin, model_energy


def add_args(p) -> None:
    p.add_argument("--config", default="configs/cifar10.yaml", help="network and sampler settings")
    p.add_argument("--override", nargs="*", default=[], help="config overrides (key=value), e.g. model.filters=64")
    p.add_argument("--batch", type=positive, default=16)
    p.add_argument("--steps", type=positive, default=5, help="Langevin steps per timed call")
    p.add_argument("--reps", type=positive, default=5, help="timed rounds (every row once per round)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch's default)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile row (minutes to compile on CPU)")
    p.add_argument("--gemm-size", type=int, default=0, help="square matmul size (default 2048 CPU, 8192 GPU)")
    p.add_argument("--json", default="runs/bench/langevin.json")


def run(args) -> dict:
    dev = device()
    threads = set_threads(args.threads) if dev.type == "cpu" else 0
    cfg = load_config(args.config, ["data.shards=unused", *args.override])
    s, m = cfg.sampler, cfg.model
    torch.manual_seed(0)
    model32 = build_model(m).to(dev)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)  # as main.py: cast before DeepSpeed
    x0 = torch.rand(args.batch, m.in_channels, m.resolution, m.resolution, device=dev)
    y = torch.randint(0, max(m.num_classes, 1), (args.batch,), device=dev) if m.num_classes else None

    def plain(autocast=None):
        def f():
            with plain_frozen(model32):
                return plain_langevin(model32, x0, y, args.steps, s.step_size, s.noise, s.grad_clip, autocast)
        return f

    def ours(model, dtype, channels_last=False, compile=False):
        def f():
            with frozen(model, channels_last):
                energy = model_energy(model, y, dtype, channels_last=channels_last, compile=compile)
                return langevin(energy, x0, args.steps, s.step_size, s.noise, s.grad_clip)[0]
        return f

    bf16 = torch.bfloat16
    auto = resolve_here(cfg.train.precision, dev.type).precision
    model_auto = model16 if auto == "bf16" else model32 if auto == "fp32" else copy.deepcopy(model32).to(torch.float16)
    rows = {"plain fp32": plain(), "plain bf16 autocast": plain(bf16), "ebmscale fp32": ours(model32, torch.float32),
            "ebmscale fp32 channels_last": ours(model32, torch.float32, True),
            "ebmscale bf16": ours(model16, bf16), "ebmscale bf16 channels_last": ours(model16, bf16, True),
            f"ebmscale default ({cfg.train.precision}={auto})": ours(model_auto, compute_dtype(auto), s.channels_last)}
    if args.compile:
        rows["ebmscale bf16 channels_last compile"] = ours(model16, bf16, True, True)

    # FLOPs of one energy + input-gradient step (the same for every row)
    with frozen(model32), FlopCounterMode(display=False) as fc:
        x = x0.clone().requires_grad_(True)
        model32(x, y).sum().backward()  # FlopCounterMode cannot hook autograd.grad on a leaf; same FLOPs
    flops_step = fc.get_total_flops()

    # first calls: warm-up (and compile), and the samples compared with plain fp32 under the same seed
    first, diff = {}, {}
    for k, f in rows.items():
        torch.manual_seed(1)
        t = time.perf_counter()
        out = f()
        first[k] = time.perf_counter() - t
        diff[k] = out
    diff = {k: (v - diff["plain fp32"]).abs().max().item() for k, v in diff.items()}

    n = args.gemm_size or (8192 if dev.type == "cuda" else 2048)
    rep = 20 if dev.type == "cuda" else 1
    (g32, f32), (g16, f16) = gemm(n, torch.float32, dev, rep), gemm(n, bf16, dev, rep)
    g32(), g16()
    times = interleaved({"gemm fp32": g32, "gemm bf16": g16, **rows}, args.reps, dev)
    best = {k: min(v) for k, v in times.items()}
    peak32, peak16 = f32 / best["gemm fp32"], f16 / best["gemm bf16"]
    nominal = nominal_peak(dev)
    base = best["plain fp32"]
    table = []
    for k in rows:
        flops = flops_step * args.steps / best[k]
        table.append({"sampler": k, "img_steps_per_s": args.batch * args.steps / best[k], "flop_per_s": flops,
                      "share_fp32_gemm": flops / peak32, "share_bf16_gemm": flops / peak16,
                      "mfu": flops / nominal if nominal else None, "speedup": base / best[k],
                      "max_abs_diff_vs_plain_fp32": diff[k], "first_call_s": first[k],
                      "median_s": sorted(times[k])[len(times[k]) // 2], "best_s": best[k]})
    name = hardware_line(dev)
    result = {"config": args.config, "override": args.override, "arch": m.arch, "filters": m.filters, "resolution": m.resolution,
              "batch": args.batch, "langevin_steps_per_call": args.steps, "reps": args.reps, "device": name,
              "threads": threads, "gflop_per_image_step": flops_step / args.batch / 1e9,
              "gemm_size": n, "gemm_fp32_flop_per_s": peak32, "gemm_bf16_flop_per_s": peak16,
              "nominal_bf16_flop_per_s": nominal, "rows": table, "times": times}

    print(f"{m.arch} (filters {m.filters}, {m.resolution}px) batch {args.batch}, {args.steps} Langevin steps per call, "
          f"best of {args.reps} interleaved rounds; {name}")
    print(f"one step (energy + dE/dx) = {flops_step / args.batch / 1e9:.2f} GFLOP per image; GEMM {n}^3 peak in this "
          f"run: fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s"
          + (f"; nominal bf16 {nominal / 1e12:.0f} TFLOP/s" if nominal else ""))
    print(f"{'sampler':36} {'img*steps/s':>11} {'GFLOP/s':>8} {'%fp32 GEMM':>10} {'%bf16 GEMM':>10}"
          + (f" {'MFU':>6}" if nominal else "") + f" {'speed-up':>8} {'max|dx| vs fp32':>15}")
    for r in table:
        print(f"{r['sampler']:36} {r['img_steps_per_s']:11.1f} {r['flop_per_s'] / 1e9:8.0f} "
              f"{100 * r['share_fp32_gemm']:9.0f}% {100 * r['share_bf16_gemm']:9.0f}%"
              + (f" {100 * r['mfu']:5.1f}%" if nominal else "")
              + f" {r['speedup']:7.2f}x {r['max_abs_diff_vs_plain_fp32']:15.2e}")
    write_json(args.json, result)
    return result
