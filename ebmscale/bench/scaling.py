"""Weak scaling on CPU: the real training step (bench/_trainer.py: build_trainer, trainer_step) on 1 rank and on
2 ranks (torchrun, gloo, DeepSpeed ZeRO-2), the same per-rank batch, 1 thread per rank.
Efficiency = step time on 1 rank / step time on 2 ranks (1.0: twice the images per second). Launches of 1 and 2
ranks alternate, so that load from other processes hits both alike.

  python tools/bench.py scaling                     # CIFAR ResNet32, batch 16 per rank, 10 Langevin steps
  python tools/bench.py scaling --ranks 1 2 4 --override sampler.steps=60
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ebmscale.bench import positive, write_json
from ebmscale.bench._trainer import build_trainer, trainer_step
from ebmscale.config import load_config
from ebmscale.train.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[2]


def add_args(p) -> None:
    p.add_argument("--config", default="configs/cifar10.yaml")
    p.add_argument("--override", nargs="*", default=["data.batch_size=16", "sampler.steps=10"])
    p.add_argument("--ranks", type=positive, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=positive, default=6, help="timed steps per launch, after 2 warm-up steps")
    p.add_argument("--rounds", type=positive, default=2, help="launches per rank count, alternating")
    p.add_argument("--json", default="runs/bench/scaling.json")


def worker(a) -> None:
    """One rank of a launch: time each step; rank 0 writes every rank's times."""
    torch.set_num_threads(1)
    trainer = build_trainer(a.config, a.override, tempfile.mkdtemp(prefix="ebm-bench-"))
    m, b = trainer.cfg.model, trainer.cfg.data.batch_size
    x = torch.rand(b, m.in_channels, m.resolution, m.resolution, device=trainer.device)
    y = torch.randint(0, max(m.num_classes, 1), (b,), device=trainer.device)
    times = []
    for i in range(2 + a.steps):
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        trainer_step(trainer, x, y)
        dist.barrier()  # a step ends when the slowest rank's ends
        if i >= 2:
            times.append((time.perf_counter() - t, time.process_time() - c))
    extra = collectives_and_checkpoint(trainer)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, times)
    extras = [None] * dist.get_world_size()
    dist.all_gather_object(extras, extra)
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(every))
        Path(a.out + ".extra").write_text(json.dumps(extras))


def collectives_and_checkpoint(trainer, reps: int = 5) -> dict:
    """Seconds of the step's collectives alone (an all-reduce of the gradients' size in fp32, the guard's 9 floats),
    medians of `reps`, and of one checkpoint (DeepSpeed's files + this rank's buffer file, committed)."""
    import torch.distributed as dist

    def timed(fn) -> float:
        out = []
        for _ in range(reps):
            dist.barrier()
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return sorted(out)[len(out) // 2]
    grads = torch.zeros(sum(p.numel() for p in trainer.engine.module.parameters()))
    guard = torch.zeros(9)
    res = {"allreduce_grads_s": timed(lambda: dist.all_reduce(grads)), "allreduce_guard_s": timed(lambda: dist.all_reduce(guard)),
           "grad_elements": grads.numel()}
    root = [tempfile.mkdtemp(prefix="ebm-bench-ck-") if trainer.rank == 0 else None]
    dist.broadcast_object_list(root)  # one checkpoint folder for every rank, as a run has
    ck = Checkpointer(Path(root[0]) / "checkpoints", trainer.cfg.checkpoint, trainer.rank, trainer.world_size)
    dist.barrier()
    t = time.perf_counter()
    ck.save(trainer.engine, 1, {"buffer": trainer.buffer.state_dict()}, {"step": 1, "world_size": trainer.world_size})
    ck.commit()
    res["checkpoint_s"] = time.perf_counter() - t
    return res


def _launch(a, n: int, out: Path) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "ebmscale.bench.scaling", "--worker", "--out", str(out), "--config", a.config, "--steps", str(a.steps),
           "--override", *a.override]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}  # CPU ranks, even on a GPU machine
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{n}-rank launch failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(out.read_text())


def run(a) -> dict:
    launches = {n: [] for n in a.ranks}
    extras: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for n in a.ranks:
                every = _launch(a, n, Path(tmp) / f"{n}_{r}.json")
                launches[n].append([[max(w for w, _ in s), max(c for _, c in s)] for s in zip(*every)])
                ex = json.loads((Path(tmp) / f"{n}_{r}.json.extra").read_text())
                extras.setdefault(n, []).append({k: max(e[k] for e in ex) for k in ex[0]})  # the slowest rank
    # per step: the slowest rank's wall time, and the most CPU time a rank used
    wall = {n: sorted(s[0] for ts in v for s in ts) for n, v in launches.items()}
    cpu = {n: sorted(s[1] for ts in v for s in ts) for n, v in launches.items()}
    med = {n: v[len(v) // 2] for n, v in wall.items()}
    best = {n: v[0] for n, v in wall.items()}
    cpu_med = {n: v[len(v) // 2] for n, v in cpu.items()}
    one = a.ranks[0]
    rows = [{"ranks": n, "median_step_s": med[n], "best_step_s": best[n], "median_cpu_s": cpu_med[n],
             "efficiency": med[one] / med[n], "efficiency_best": best[one] / best[n],
             "efficiency_cpu": cpu_med[one] / cpu_med[n], "images_per_s": n * _batch(a) / med[n],
             **{k: sorted(e[k] for e in extras[n])[len(extras[n]) // 2] for k in extras[n][0]}} for n in a.ranks]
    print(f"weak scaling, {a.config} {' '.join(a.override)}, 1 thread per rank, {a.rounds} launches x {a.steps} "
          f"steps per rank count, DeepSpeed over gloo")
    print(f"{'ranks':>5} {'s/step (median)':>15} {'img/s':>7} {'efficiency':>10} {'(best steps)':>12} "
          f"{'CPU s/step/rank':>15} {'CPU efficiency':>14}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['median_step_s']:15.3f} {r['images_per_s']:7.1f} {r['efficiency']:10.2f} "
              f"{r['efficiency_best']:12.2f} {r['median_cpu_s']:15.3f} {r['efficiency_cpu']:14.2f}")
    print("efficiency: wall clock, what a job sees; CPU efficiency: the CPU work a rank does per step, which "
          "other processes on the machine do not inflate")
    print(f"{'ranks':>5} {'all-reduce grads s':>18} {'all-reduce guard s':>18} {'checkpoint s':>12}  (slowest rank, median)")
    for r in rows:
        print(f"{r['ranks']:>5} {r['allreduce_grads_s']:18.4f} {r['allreduce_guard_s']:18.4f} {r['checkpoint_s']:12.2f}")
    result = {"config": a.config, "override": a.override, "steps": a.steps, "rounds": a.rounds,
              "cpus": os.cpu_count(), "rows": rows, "launches": launches}
    write_json(a.json, result)
    return result


def _batch(a) -> int:
    return load_config(a.config, a.override).data.batch_size


if __name__ == "__main__":  # a torchrun worker
    p = argparse.ArgumentParser()
    add_args(p)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out")
    worker(p.parse_args())
