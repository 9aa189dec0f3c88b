"""Sample from a trained run: python tools/sample.py RUN_DIR --per-class 10 --out samples.npz

For IS/FID, the paper's test-time procedure over many ranks (each writes its part, rank 0 merges):
  torchrun --nproc_per_node 8 tools/sample.py RUN_DIR --n 50000 --init noise --rounds 100 --steps 20 \\
      --reinit 0.01 --relabel 0.1 --nomix 5 --grad-clip 0.05 --ensemble 10 --uint8 --out RUN_DIR/eval/samples.npz
Rank and world size come from RANK / WORLD_SIZE (torchrun), else SLURM_PROCID / SLURM_NTASKS (srun).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ebmscale.eval.loading import (cast_for_sampling, load_buffer, load_energy_model, load_ensemble,
                                   sampling_precision)
from ebmscale.eval.sample import sample_rounds
from ebmscale.tracking.pictures import image_grid
from ebmscale.export import is_exported
from ebmscale.train.checkpoint import trust_pickles
from ebmscale.program import prog


def rank_world() -> tuple[int, int]:
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", 1))
    return int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1))


def save(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)  # uncompressed: 50,000 samples save in seconds
    os.replace(tmp, path)


def _part_of_this_launch(part: Path, meta: dict) -> bool:
    """A part left by an earlier, crashed or timed-out launch has another checkpoint or other settings."""
    try:
        with np.load(part) as d:
            return all(str(d[k]) == str(v) for k, v in meta.items())
    except (OSError, ValueError, KeyError):
        return False


def merge(out: Path, world: int, timeout_s: float, meta: dict) -> dict:
    """Rank 0: wait for every rank's part of this launch, concatenate them in rank order, remove them."""
    parts = [out.with_name(f"{out.stem}.part{r:05d}of{world:05d}.npz") for r in range(world)]
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() and _part_of_this_launch(p, meta) for p in parts):
        if time.monotonic() > deadline:
            missing = [str(p) for p in parts if not (p.exists() and _part_of_this_launch(p, meta))]
            raise TimeoutError(f"parts of this launch still missing after {timeout_s:g}s (absent, or left by an "
                               f"earlier launch with other settings): {missing}")
        time.sleep(2)
    loaded = [dict(np.load(p)) for p in parts]
    merged = {k: np.concatenate([d[k] for d in loaded]) if k in ("images", "labels") else loaded[0][k]
              for k in loaded[0]}
    save(out, **merged)
    for p in parts:
        p.unlink()
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (latest committed checkpoint), a checkpoint folder or an exported model "
                   "(`ebmscale export`; it has no replay buffer: --init noise)")
    p.add_argument("--per-class", type=int, default=10, help="samples per class (or total / 10 if unconditional)")
    p.add_argument("--n", type=int, help="total samples instead, labels balanced over the classes (e.g. 50000 for FID)")
    p.add_argument("--classes", type=int, nargs="*", help="only these classes (default: all)")
    p.add_argument("--compose", type=int, nargs="*", default=[],
                   help="also condition on these classes at once (sum of energies), e.g. --classes 1 --compose 7")
    p.add_argument("--models", nargs="*", default=[],
                   help="add the energies of these runs / checkpoints (composition of models; same image shape)")
    p.add_argument("--ensemble", type=int, default=1,
                   help="historical ensemble: sum the energies of the last K committed checkpoints of RUN")
    p.add_argument("--init", choices=["buffer", "noise"], default="buffer",
                   help="start chains from the saved replay buffer (refinement) or from uniform noise")
    p.add_argument("--steps", type=int, help="Langevin steps per round (default: 20 from the buffer, 3x training "
                   "from noise)")
    p.add_argument("--rounds", type=int, default=1, help="sweeps of --steps over the persistent set of chains")
    p.add_argument("--reinit", type=float, default=0.0, help="share of chains restarted from noise after each round")
    p.add_argument("--relabel", type=float, default=0.0, help="share of chains given a new random label each round")
    p.add_argument("--nomix", type=int, default=0, help="no --reinit/--relabel in the last NOMIX rounds")
    p.add_argument("--step-size", type=float)
    p.add_argument("--noise", type=float, help="default: training noise / 5 from the buffer, training noise from noise")
    p.add_argument("--grad-clip", type=float, help="per-element clip of dE/dx (default: training's; 0 = none)")
    p.add_argument("--batch", type=int, default=256, help="chains per Langevin call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda = the local rank's GPU (LOCAL_RANK or SLURM_LOCALID, modulo the visible GPUs)")
    p.add_argument("--precision", choices=["auto", "train", "fp32", "bf16", "fp16"], default="auto",
                   help="model compute during sampling (chains stay fp32); auto = bf16 where this hardware has it "
                        "natively, else fp32 (fp16 on older GPUs); train = the run's train.precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--uint8", action="store_true", help="store images as uint8 0..255 (what IS/FID see; 4x smaller)")
    p.add_argument("--merge-timeout", type=float, default=7200, help="seconds rank 0 waits for the other parts")
    p.add_argument("--trust-pickles", action="store_true",
                   help="load checkpoint files that hold more than tensors (they could run code): only ones you trust")
    p.add_argument("--out", required=True, help="output .npz (images N x C x H x W float32 in [0,1], labels)")
    a = p.parse_args(argv)
    trust_pickles(a.trust_pickles)

    rank, world = rank_world()
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    device = f"cuda:{local % torch.cuda.device_count()}" if a.device == "cuda" else a.device
    models, cfg, ckpt, step = load_ensemble(a.run, a.ensemble, device)
    s, m = cfg.sampler, cfg.model
    shape = (m.in_channels, m.resolution, m.resolution)
    for path in a.models:
        other, ocfg, _, _ = load_energy_model(path, device)
        if (ocfg.model.in_channels, ocfg.model.resolution) != shape[:2]:
            raise SystemExit(f"--models {path}: makes {ocfg.model.in_channels}x{ocfg.model.resolution}px images, "
                             f"{a.run} makes {shape[0]}x{shape[1]}px")
        models.append(other)
    precision = sampling_precision(a.precision, cfg.train.precision, device)
    cast_for_sampling(models, precision)
    buffer = load_buffer(ckpt) if a.init == "buffer" else None
    if a.init == "buffer" and buffer is None:
        print(f"{ckpt} has no replay buffer; sampling from noise", file=sys.stderr)
    from_buffer = buffer is not None
    steps = a.steps if a.steps is not None else (20 if from_buffer else 3 * s.steps)
    noise = a.noise if a.noise is not None else (s.noise / 5 if from_buffer else s.noise)
    clip = s.grad_clip if a.grad_clip is None else (a.grad_clip or None)
    classes = a.classes if a.classes else list(range(max(m.num_classes, 1)))
    labels = torch.tensor(classes)[torch.arange(a.n) % len(classes)] if a.n else \
        torch.tensor(classes).repeat_interleave(a.per_class)
    mine = np.array_split(np.arange(len(labels)), world)[rank]
    labels = labels[torch.as_tensor(mine, dtype=torch.long)]
    extra = [torch.full_like(labels, c) for c in a.compose]
    x, labels = sample_rounds(models, labels, shape, steps, a.step_size or s.step_size, noise, clip, a.rounds,
                              a.reinit, a.relabel, a.nomix, m.num_classes, "buffer" if from_buffer else "noise",
                              buffer, a.seed + 7919 * rank, a.batch, extra, progress=rank == 0)
    images = (x * 255).round().to(torch.uint8).numpy() if a.uint8 else x.numpy().astype(np.float32)
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "merge_timeout")}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(step=step, run=str((Path(ckpt) if is_exported(ckpt) else Path(ckpt).parent.parent).resolve()), checkpoint=str(Path(ckpt).resolve()),
                settings=json.dumps({**settings, "precision": precision, "steps": steps, "noise": noise, "grad_clip": clip, "world": world}))
    if world > 1:
        save(out.with_name(f"{out.stem}.part{rank:05d}of{world:05d}.npz"), images=images, labels=labels.numpy(),
             **meta)
        if rank:
            return 0
        merged = merge(out, world, a.merge_timeout, {k: meta[k] for k in ("checkpoint", "settings")})
        images, labels = merged["images"], torch.as_tensor(merged["labels"])
    else:
        save(out, images=images, labels=labels.numpy(), **meta)
    show = np.argsort(labels.numpy()[:400], kind="stable")  # at most 400 in the picture, by class
    grid = images[show].astype(np.float32) / (255 if a.uint8 else 1)
    Image.fromarray(image_grid(grid, nrow=a.per_class if not a.n else 20)).save(out.with_suffix(".png"))
    print(f"{len(images)} samples from {ckpt} (step {step}; {len(models)} models; {a.rounds} x {steps} Langevin "
          f"steps from {'the buffer' if from_buffer else 'noise'} in {precision}; {world} ranks) -> {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
