"""Data-loader throughput: decoded 128x128 images per second per worker, against what a training step consumes.

Shards are built like ImageNet128's (JPEG q95, 128 px, shorter side + centre crop) from random crops of the
scikit-image photos, then read through the real training stream (imagenet128.yaml: resampled, flip, dequantize).
A rank's loader keeps up while  per-worker rate x data.workers  >  batch_size / step time.

  python tools/bench.py data                       # table + runs/bench/data.json
  python tools/bench.py data --step-seconds 0.3 --loader-workers 6 --workers 0 1 2
"""
from __future__ import annotations

import platform
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from ebmscale.bench import positive, write_json
from ebmscale.config import DataConfig, ModelConfig
from ebmscale.data.sources import Source
from ebmscale.data.stream import build_stream
from ebmscale.data.writer import write_shards

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def add_args(p) -> None:
    p.add_argument("--images", type=positive, default=1024, help="photo crops written to shards")
    p.add_argument("--size", type=positive, default=128)
    p.add_argument("--batch-size", type=positive, default=16, help="per-rank batch (imagenet128.yaml: 16)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="data.workers settings to time (0 = in-process)")
    p.add_argument("--batches", type=positive, default=40, help="timed batches per setting, after a warm-up")
    p.add_argument("--step-seconds", type=float, default=0.15,
                   help="training step time to compare with: ResNet128 (filters 64), 50 Langevin steps on 16 images "
                        "is ~20 TFLOP, ~0.1-0.2 s on one H100/H200 in bf16")
    p.add_argument("--loader-workers", type=positive, default=6,
                   help="data.workers per rank in the run (imagenet128.yaml: 6)")
    p.add_argument("--dir", help="shard folder (default: a temporary one)")
    p.add_argument("--json", default="runs/bench/data.json")


def _photo_crops(n: int, size: int, seed: int = 0) -> Source:
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("bench data needs scikit-image for its sample photos: pip install 'ebmscale[bench]'") from None

    rng, items = np.random.default_rng(seed), []
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    for i in range(n):
        k = i % len(photos)
        img = photos[k]
        side = int(rng.integers(size, min(img.shape[:2]) + 1))
        h, w = int(rng.integers(side * 3 // 4, side + 1)), side  # ImageNet-like aspect ratios
        y, x = rng.integers(0, img.shape[0] - h + 1), rng.integers(0, img.shape[1] - w + 1)
        items.append((np.ascontiguousarray(img[y:y + h, x:x + w]), k))
    return Source("bench", "skimage.data", items, [{"index": k, "id": n, "name": n} for k, n in enumerate(PHOTOS)])


def _rate(shards: str, args, workers: int) -> float:
    d = OmegaConf.structured(DataConfig(shards=shards, batch_size=args.batch_size, workers=workers, flip=True,
                                        resampled=True, dequantize=True, pin_memory=False))
    m = OmegaConf.structured(ModelConfig(arch="resnet128", resolution=args.size, num_classes=len(PHOTOS)))
    it = iter(build_stream(d, m, rank=0, world_size=1, seed=0))
    for _ in islice(it, max(5, 2 * workers)):  # worker start-up and the shuffle buffer fill
        pass
    t = time.perf_counter()
    for _ in islice(it, args.batches):
        pass
    return args.batches * args.batch_size / (time.perf_counter() - t)


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.dir or tmp)
        t = time.perf_counter()
        m = write_shards(_photo_crops(args.images, args.size), out, size=args.size, quality=95,
                         samples_per_shard=128, progress=False)
        write_s = time.perf_counter() - t
        need = args.batch_size / args.step_seconds
        rows = []
        for w in args.workers:
            rate = _rate(str(out / "manifest.json"), args, w)
            per_worker = rate / max(1, w)
            rows.append({"workers": w, "images_per_s": rate, "per_worker": per_worker,
                         "margin_at_loader_workers": per_worker * args.loader_workers / need,
                         "keeps_up_above_step_s": args.batch_size / (per_worker * args.loader_workers)})
    result = {"size": args.size, "batch_size": args.batch_size, "step_seconds": args.step_seconds,
              "step_consumes_images_per_s": need, "loader_workers": args.loader_workers,
              "shards": len(m["shards"]), "mean_jpeg_bytes": sum(s["bytes"] for s in m["shards"]) / m["total_samples"],
              "write_images_per_s": m["total_samples"] / write_s, "cpu": platform.processor() or platform.machine(),
              "rows": rows}
    print(f"{args.size}px JPEG q95 shards ({result['mean_jpeg_bytes'] / 1024:.1f} KiB/sample incl. tar), written at "
          f"{result['write_images_per_s']:.0f} img/s by one process; one step takes {args.batch_size} images per "
          f"{args.step_seconds} s = {need:.0f} img/s per rank")
    print(f"{'data.workers':>12} {'img/s':>9} {'img/s/worker':>13} {f'margin x{args.loader_workers} workers':>20} "
          f"{'keeps up if step >':>19}")
    for r in rows:
        print(f"{r['workers']:>12} {r['images_per_s']:>9.0f} {r['per_worker']:>13.0f} "
              f"{r['margin_at_loader_workers']:>19.1f}x {r['keeps_up_above_step_s'] * 1000:>16.1f} ms")
    write_json(args.json, result)
    return result
