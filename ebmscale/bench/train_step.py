"""Seconds per full training step (sampling + replay buffer + update + data) through the real trainer code, against
the plain PyTorch loop, per architecture; every row once per round, rounds interleaved.

ebmscale  Trainer.train_step + Trainer.update over a DeepSpeed engine built in this process (world size 1, ZeRO-2,
          the config's precision resolved on this hardware: bf16 where native, else fp32), as ebmscale/train/main.py builds it (bench/_trainer.py: build_trainer)
plain     the seed's script: fp32 model, plain_langevin (bench/__init__.py), the same replay buffer, CD loss,
          torch Adam; and the same under bf16 autocast
Data is a batch drawn from an in-memory pool (what the loader costs: tools/bench.py data). The split: sampling
(the Langevin chains), buffer (init_chains + push), update (the forward/backward on positives + negatives and
the optimizer step), data, other (the rest of the step).

  python tools/bench.py train-step                        # digits, resnet32 (batch 16, 60 steps), resnet128
  python tools/bench.py train-step --archs resnet32 --reps 5
"""
from __future__ import annotations

import copy
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ebmscale.bench import device, hardware_line, plain_frozen, plain_langevin, positive, set_threads, sync, write_json
from ebmscale.bench._trainer import build_trainer, trainer_step
from ebmscale.buffer import build_buffer
from ebmscale.config import load_config
from ebmscale.models import build_model
from ebmscale.train.loss import cd_loss
from ebmscale.train.timing import step_times

ARCHS = {  # name: (config, overrides); the batch of resnet128 comes from --resnet128-batch
    "digits": ("configs/digits.yaml", []),
    "resnet32": ("configs/cifar10.yaml", ["data.batch_size=16", "sampler.steps=60"]),
    "resnet128": ("configs/imagenet128.yaml", ["buffer.capacity=1000"]),
}
PARTS = ("sampling", "buffer", "update", "data", "other")


def add_args(p) -> None:
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--resnet128-batch", type=int, default=0, help="default: 2 on CPU, 16 (imagenet128.yaml) on GPU")
    p.add_argument("--reps", type=positive, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch's default)")
    p.add_argument("--no-autocast", action="store_true", help="leave out the plain bf16 autocast row")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides for every arch (key=value)")
    p.add_argument("--json", default="runs/bench/train_step.json")


class ConvInputs(TorchDispatchMode):
    """Records (input dtype, weight dtype, input NHWC, weight NHWC) of every convolution run under it."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x, w = args[0], args[1]
            cl = torch.channels_last
            self.seen.add((str(x.dtype), str(w.dtype), x.is_contiguous(memory_format=cl),
                           w.is_contiguous(memory_format=cl)))
        return func(*args, **(kwargs or {}))


def _pool(cfg, dev, n=256):
    m = cfg.model
    xs = torch.rand(n, m.in_channels, m.resolution, m.resolution)
    ys = torch.randint(0, max(m.num_classes, 1), (n,))

    def batch(b):
        i = torch.randint(0, n, (b,))
        return xs[i].to(dev, non_blocking=True).float(), ys[i].to(dev, non_blocking=True)
    return batch


def _timed(clock: dict, key: str, fn, dev):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        sync(dev)
        clock[key] = clock.get(key, 0.0) + time.perf_counter() - t
        return out
    return wrapper


class PlainStep:
    """The plain script's training step, timed by part."""

    def __init__(self, cfg, dev, autocast=None):
        m, o = cfg.model, cfg.optim
        self.cfg, self.dev, self.autocast, self.step = cfg, dev, autocast, 0
        torch.manual_seed(cfg.run.seed)
        self.model = build_model(m).to(dev)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2))
        self.buffer = build_buffer(cfg, dev)

    def __call__(self, x_pos, y_pos) -> dict:
        s, cond, dev = self.cfg.sampler, self.cfg.model.num_classes > 0, self.dev
        t0 = time.perf_counter()
        x0, y, _, born = self.buffer.init_chains(x_pos.shape[0], self.step, dev)
        sync(dev)
        t1 = time.perf_counter()
        with plain_frozen(self.model):
            x_neg = plain_langevin(self.model, x0, y if cond else None, s.steps, s.step_size, s.noise, s.grad_clip,
                                   self.autocast)
        sync(dev)
        t2 = time.perf_counter()
        self.buffer.push(x_neg, y, born)
        sync(dev)
        t3 = time.perf_counter()
        with torch.autocast(dev.type, self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            e = self.model(torch.cat([x_pos, x_neg]), torch.cat([y_pos, y]) if cond else None).float()
        n = x_pos.shape[0]
        loss = cd_loss(e[:n], e[n:], self.cfg.train.alpha)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sync(dev)
        self.step += 1
        return {"sampling": t2 - t1, "buffer": (t1 - t0) + (t3 - t2), "update": time.perf_counter() - t3}


def _step(fn, batch, b, dev) -> dict:
    t0 = time.perf_counter()
    x, y = batch(b)
    sync(dev)
    t1 = time.perf_counter()
    parts = fn(x, y)
    sync(dev)
    total = time.perf_counter() - t0
    parts = {"data": t1 - t0, **parts}
    return {"total": total, **parts, "other": total - sum(parts.values())}


def run(args) -> dict:
    dev = device()
    threads = set_threads(args.threads) if dev.type == "cpu" else 0
    b128 = args.resnet128_batch or (16 if dev.type == "cuda" else 2)
    results = []
    for arch in args.archs:
        config, overrides = ARCHS[arch]
        overrides = overrides + ([f"data.batch_size={b128}"] if arch == "resnet128" else []) + args.override
        trainer = build_trainer(config, overrides, tempfile.mkdtemp(prefix="ebm-bench-"))
        cfg = copy.deepcopy(trainer.cfg)
        b = cfg.data.batch_size
        batch = _pool(cfg, dev)
        clock: dict = {}
        trainer.buffer.init_chains = _timed(clock, "buffer", trainer.buffer.init_chains, dev)
        trainer.buffer.push = _timed(clock, "buffer", trainer.buffer.push, dev)

        def ebm(x, y):
            clock.clear()
            out = trainer_step(trainer, x, y)  # noqa: F821 (bound in the loop; deleted only after use)
            sync(dev)
            t = step_times(out["marks"])  # CUDA events on a GPU (train/timing.py): the stream's time, not the enqueue
            return {"sampling": t["time/sample_s"] - clock["buffer"], "buffer": clock["buffer"],
                    "update": t["time/update_s"]}

        rows = {"plain fp32": PlainStep(cfg, dev)}
        if not args.no_autocast:
            rows["plain bf16 autocast"] = PlainStep(cfg, dev, torch.bfloat16)
        requested = load_config(config, ["tracking.enabled=false", *overrides]).train.precision
        rows[f"ebmscale {requested}={cfg.train.precision}"] = ebm
        with ConvInputs() as convs:  # what the sampler really runs: dtype and layout of its convolutions
            trainer.sample_negatives(b)
        param_dtype = str(next(trainer.engine.module.parameters()).dtype)
        times = {k: [] for k in rows}
        for r in range(args.reps + 1):  # round 0: warm-up, and fills the replay buffers
            for k, fn in rows.items():
                t = _step(fn, batch, b, dev)
                if r:
                    times[k].append(t)
        s = cfg.sampler
        label = f"{arch} {cfg.model.resolution}px batch {b}, {s.steps} Langevin steps"
        med = {k: {p: sorted(t[p] for t in v)[len(v) // 2] for p in ("total", *PARTS)} for k, v in times.items()}
        base_med, base_best = med["plain fp32"]["total"], min(t["total"] for t in times["plain fp32"])
        table = [{"row": k, **med[k], "best_total": min(t["total"] for t in v), "speedup": base_med / med[k]["total"],
                  "speedup_best": base_best / min(t["total"] for t in v)} for k, v in times.items()]
        results.append({"arch": arch, "config": config, "overrides": overrides, "batch": b, "langevin_steps": s.steps,
                        "precision": cfg.train.precision, "sampler_channels_last": s.channels_last,
                        "sampler_compile": s.compile, "engine_param_dtype": param_dtype,
                        "sampler_convolutions": sorted(convs.seen), "rows": table, "times": times})
        print(f"\n{label}; ebmscale: DeepSpeed ZeRO-{cfg.train.zero_stage}, parameters {param_dtype}, sampler "
              f"convolutions {sorted(convs.seen)}")
        print(f"{'':22} {'s/step':>7} {'speed-up':>8} {'(best)':>7}" + "".join(f" {p:>9}" for p in PARTS))
        for r in table:
            print(f"{r['row']:22} {r['total']:7.2f} {r['speedup']:7.2f}x {r['speedup_best']:6.2f}x"
                  + "".join(f" {r[p]:9.3f}" for p in PARTS))
        del trainer
    name = hardware_line(dev)
    print(name)
    result = {"device": name, "threads": threads, "reps": args.reps, "statistic": "median over rounds",
              "archs": results}
    write_json(args.json, result)
    return result
