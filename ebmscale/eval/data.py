"""Evaluation images straight from shards: deterministic order, no augmentation, no dequantization."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ebmscale.config import DataConfig
from ebmscale.data.images import decode
from ebmscale.data.shards import list_shards, tar_samples
from ebmscale.data.stream import IMAGE_KEYS


def iter_images(spec: str, size: int, channels: int, limit: int | None = None, batch: int = 1000,
                allow_pipe: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The first `limit` images of `spec` (any `data.shards` form) in shard order, fitted to size x size x
    channels as the shard writer does, in batches: (uint8 [B, C, H, W], labels int64 [B]; 0 without .cls)."""
    xs, ys, n = [], [], 0
    samples = (s for sh in list_shards(spec, allow_pipe) for s in tar_samples(sh.url, DataConfig.max_member_bytes))
    for s in samples:
        ext = next((k for k in IMAGE_KEYS if k in s), None)
        if ext is None or "__bad__" in s:
            continue
        xs.append(decode(s[ext], size, channels))
        ys.append(int(s["cls"]) if "cls" in s else 0)
        n += 1
        if len(xs) == batch or n == limit:
            yield np.stack(xs), np.asarray(ys, np.int64)
            xs, ys = [], []
        if n == limit:
            return
    if xs:
        yield np.stack(xs), np.asarray(ys, np.int64)
    if n == 0:
        raise ValueError(f"no images found in {spec}")


def read_images(spec: str, size: int, channels: int, limit: int | None = None,
                allow_pipe: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """iter_images, all at once: (x float32 [N, C, H, W] in [0, 1], labels)."""
    xs, ys = zip(*iter_images(spec, size, channels, limit, allow_pipe=allow_pipe))
    return np.concatenate(xs).astype(np.float32) / 255, np.concatenate(ys)
