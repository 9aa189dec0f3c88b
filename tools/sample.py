"""Sample from a trained run: python tools/sample.py RUN_DIR --per-class 10 --out samples.npz"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from ebmscale.eval.loading import load_buffer, load_energy_model
from ebmscale.eval.sample import sample
from ebmscale.tracking.pictures import image_grid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", help="run folder (latest committed checkpoint) or a checkpoint folder")
    p.add_argument("--per-class", type=int, default=10, help="samples per class (or total / 10 if unconditional)")
    p.add_argument("--classes", type=int, nargs="*", help="only these classes (default: all)")
    p.add_argument("--compose", type=int, nargs="*", default=[],
                   help="also condition on these classes at once (sum of energies), e.g. --classes 1 --compose 7")
    p.add_argument("--init", choices=["buffer", "noise"], default="buffer",
                   help="start chains from the saved replay buffer (refinement) or from uniform noise")
    p.add_argument("--steps", type=int, help="Langevin steps (default: 20 from the buffer, 3x training from noise)")
    p.add_argument("--step-size", type=float)
    p.add_argument("--noise", type=float, help="default: training noise / 5 from the buffer, training noise from noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .npz (images N x C x H x W float32 in [0,1], labels)")
    a = p.parse_args()

    model, cfg, ckpt, step = load_energy_model(a.run)
    s, m = cfg.sampler, cfg.model
    buffer = load_buffer(ckpt) if a.init == "buffer" else None
    if a.init == "buffer" and buffer is None:
        print(f"{ckpt} has no replay buffer; sampling from noise", file=sys.stderr)
    from_buffer = buffer is not None
    steps = a.steps if a.steps is not None else (20 if from_buffer else 3 * s.steps)
    noise = a.noise if a.noise is not None else (s.noise / 5 if from_buffer else s.noise)
    classes = a.classes if a.classes else list(range(max(m.num_classes, 1)))
    labels = torch.tensor(classes).repeat_interleave(a.per_class)
    extra = [torch.full_like(labels, c) for c in a.compose]
    x = sample(model, labels, (m.in_channels, m.resolution, m.resolution), steps, a.step_size or s.step_size,
               noise, s.grad_clip, "buffer" if from_buffer else "noise", buffer, a.seed, extra_labels=extra)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=x.numpy().astype(np.float32), labels=labels.numpy(), step=step)
    Image.fromarray(image_grid(x.numpy(), nrow=a.per_class)).save(out.with_suffix(".png"))
    print(f"{x.shape[0]} samples from {ckpt} (step {step}; {steps} Langevin steps from "
          f"{'the buffer' if from_buffer else 'noise'}) -> {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
