"""Write a `Source` as WebDataset shards `PREFIX-%06d.tar` plus manifest.json (and classes.json).

A sample is `KEY.jpg` (or `.png`) and, when labelled, `KEY.cls` (the class index as text); nothing is pickled.
Items are shuffled once (seeded) so every shard mixes classes. Each shard is written as `NAME.tmp` and renamed
when complete, and manifest.json is rewritten after every shard ("complete": false until the end): a re-run
with the same settings keeps the complete shards and continues after them. Unreadable images are skipped,
logged and listed under "skipped"; they never stop the run. A worker process that dies (OOM killer, a crash in
a codec) stops the run with an error at once, never a hang; re-running continues after the last complete shard.
`verify_shards` checks every shard against the manifest's sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path

from tqdm import tqdm

from ebmscale.data.images import fit, open_for, to_mode
from ebmscale.data.sources import Source

log = logging.getLogger("ebmscale.data")


def encode(item, size: int, channels: int, fmt: str, quality: int):
    """(path or array, label) -> (encoded bytes or None, label, error or None). Runs in the worker processes."""
    src, label = item
    try:
        img = fit(to_mode(open_for(src, size), channels), size)
        buf = io.BytesIO()
        if fmt == "jpg":
            img.save(buf, "JPEG", quality=quality, subsampling=0)  # 4:4:4: chroma matters at 32-128 px
        else:
            img.save(buf, "PNG", optimize=False)
        return buf.getvalue(), label, None
    except Exception as e:  # a broken file is skipped and listed, never fatal
        return None, label, f"{type(e).__name__}: {e}"


class _ShardFile:
    def __init__(self, out: Path, name: str, num_classes: int):
        self.name, self.path, self.tmp = name, out / name, out / (name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples, self.class_counts = 0, [0] * num_classes

    def add(self, key: str, ext: str, data: bytes, label) -> None:
        self._member(f"{key}.{ext}", data)
        if self.class_counts:
            self._member(f"{key}.cls", str(label).encode())
            self.class_counts[label] += 1
        self.samples += 1

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)  # mtime 0, uid 0: identical inputs give byte-identical shards
        info.size, info.mode = len(data), 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def close(self, stop: int) -> dict:
        self.tar.close()
        self.file.close()
        sha = sha256_of(self.tmp)
        os.replace(self.tmp, self.path)
        return {"name": self.name, "samples": self.samples, "bytes": self.path.stat().st_size,
                "sha256": sha, "class_counts": self.class_counts, "stop": stop}


def _resume(out: Path, settings: dict) -> dict:
    """The manifest of an earlier run with the same settings, cut to its shards still intact on disk."""
    path = out / "manifest.json"
    if not path.exists():
        return {"settings": settings, "complete": False, "shards": [], "skipped": []}
    m = json.loads(path.read_text())
    if m.get("settings") != settings:
        diff = {k: (m.get("settings", {}).get(k), v) for k, v in settings.items() if m.get("settings", {}).get(k) != v}
        raise ValueError(f"{out} holds shards written with other settings {diff} (old, new); "
                         f"write to another OUT_DIR or delete this one")
    keep = []
    for s in m["shards"]:
        if not ((out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]):
            break
        keep.append(s)
    stop = keep[-1]["stop"] if keep else 0
    m["complete"] = m.get("complete", False) and len(keep) == len(m["shards"])
    m["shards"], m["skipped"] = keep, [x for x in m["skipped"] if x["pos"] < stop]
    return m


def sha256_of(path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def verify_shards(out_dir) -> list[str]:
    """Every shard of OUT_DIR/manifest.json against its recorded sha256; returns the problems (empty: all good)."""
    out = Path(out_dir)
    m = json.loads((out / "manifest.json").read_text())
    bad = []
    for s in m["shards"]:
        path = out / s["name"]
        if not path.is_file():
            bad.append(f"{path}: missing")
        elif sha256_of(path) != s["sha256"]:
            bad.append(f"{path}: sha256 differs from manifest.json (changed or damaged since it was written)")
    return bad


def _ordered_map(pool, job, items, window: int):
    """pool.map in order with at most `window` items in flight; a dead worker raises BrokenProcessPool."""
    inflight = deque()
    for item in items:
        inflight.append(pool.submit(job, item))
        if len(inflight) >= window:
            yield inflight.popleft().result()
    while inflight:
        yield inflight.popleft().result()


def _save(out: Path, manifest: dict) -> None:
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")


def write_shards(source: Source, out_dir, prefix: str = "train", size: int = 128, channels: int = 3,
                 fmt: str = "jpg", quality: int = 95, samples_per_shard: int = 5000,
                 max_shard_bytes: int = 10 ** 9, workers: int = 1, seed: int = 0, progress: bool = True) -> dict:
    """Encode every item of `source` into shards under `out_dir`; returns the manifest (also written there)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(source=source.kind, src=source.root, items=len(source.items), prefix=prefix, size=size,
                    channels=channels, format=fmt, quality=quality, samples_per_shard=samples_per_shard,
                    max_shard_bytes=max_shard_bytes, seed=seed)
    m = _resume(out, settings)
    if m["complete"]:
        log.info(f"{out}: all {len(m['shards'])} shards already complete")
        return m
    if m["shards"]:
        log.info(f"{out}: keeping {len(m['shards'])} complete shards, continuing after them")
    num_classes = len(source.classes)
    if num_classes:
        (out / "classes.json").write_text(json.dumps(source.classes, indent=1))
    order = list(range(len(source.items)))
    random.Random(seed).shuffle(order)
    start = m["shards"][-1]["stop"] if m["shards"] else 0
    job = partial(encode, size=size, channels=channels, fmt=fmt, quality=quality)
    todo = (source.items[i] for i in order[start:])
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = _ordered_map(pool, job, todo, 64 * workers) if pool else map(job, todo)
        bar = tqdm(range(start, len(order)), initial=start, total=len(order), unit="img", disable=not progress)
        shard = None
        for pos, (data, label, err) in zip(bar, results):
            index = order[pos]
            if err:
                src = source.items[index][0]
                m["skipped"].append({"pos": pos, "src": src if isinstance(src, str) else f"item {index}", "error": err})
                log.warning(f"skipped unreadable {m['skipped'][-1]['src']}: {err}")
                continue
            if shard and (shard.samples >= samples_per_shard or shard.file.tell() + len(data) + 2048 > max_shard_bytes):
                m["shards"].append(shard.close(stop=pos))
                _save(out, m)
                shard = None
            if shard is None:
                shard = _ShardFile(out, f"{prefix}-{len(m['shards']):06d}.tar", num_classes)
            shard.add(f"{index:08d}", fmt, data, label)
        if shard:
            m["shards"].append(shard.close(stop=len(order)))
    except BrokenProcessPool as e:
        raise RuntimeError(f"an encoding worker process died (out of memory? a crash in an image codec?) after "
                           f"{len(m['shards'])} complete shards in {out}; re-run the same command to continue "
                           f"after them (fewer --workers if memory is short)") from e
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
    if not m["shards"]:
        raise ValueError(f"{source.root}: none of the {len(order)} images could be read; see the warnings above")
    m.update(complete=True, total_samples=sum(s["samples"] for s in m["shards"]), num_classes=num_classes,
             class_counts=[sum(c) for c in zip(*(s["class_counts"] for s in m["shards"]))] if num_classes else [],
             image_size=size, channels=channels, format=fmt, classes_file="classes.json" if num_classes else None,
             pattern=f"{prefix}-{{000000..{len(m['shards']) - 1:06d}}}.tar")
    _save(out, m)
    return m
