"""The training stream: shards -> (x float32 [B,C,H,W] in [0,1], y int64 [B]), the same number of steps on every rank.

Every DataLoader worker of every rank is one *slot* that yields exactly `per_worker` batches per epoch:
  resampled      shards drawn with replacement by an RNG seeded (seed, rank, worker, epoch), as open_clip's
                 ResampledShards2; an epoch is a nominal total_samples / (batch * world) steps; infinite.
  not resampled  one shared (seed, epoch) permutation of the shards, slot s takes shards[s::slots]; every slot
                 stops at the batch count the smallest share allows (so ranks stay in step); one epoch per iter().
Samples pass a shuffle buffer seeded (seed, rank, worker, epoch, "samples"); sample i of a slot's epoch is
augmented and dequantized with a numpy RNG seeded (seed, rank, worker, epoch, i), so a resumed run skips the
samples it already used without decoding them and continues the identical stream (`state_dict`); a corrupt
sample before the restart point shifts the resumed slot by one sample (they are skipped undecoded, so not known).
The loader's workers serve batches round-robin; after a restart worker j plays slot (j + consumed) % workers, so
the order of batches is unchanged too. Workers start from a forkserver, never forked from a process that holds
CUDA or DeepSpeed's gloo threads.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import multiprocessing as mp
import pickle
import random
import socket
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ebmscale.config import ConfigError
from ebmscale.data.images import decode, open_for, to_mode
from ebmscale.data.shards import IMAGE_KEYS, count_samples, resolve, tar_samples
from ebmscale.data.writer import sha256_of

log = logging.getLogger("ebmscale.data")
FORKSERVER_PRELOAD = ("ebmscale.data.stream",)  # what loader workers import before forking
MAX_JSON_LABEL = 1 << 16  # a .json label is a small object: {"cls": 3} (or "label" / "class"), or a bare integer
MIN_CHECKED = 100  # samples (good + bad) a worker reads before data.max_bad_fraction is enforced
LOG_FIRST, LOG_EVERY_S = 10, 60.0  # bad samples: log the first ten, then one line a minute
RRC_SCALE, RRC_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)  # random-resized-crop: area fraction, aspect range


class CorruptDataError(RuntimeError):
    """More than data.max_bad_fraction of the samples could not be read; the message names the shards."""


class LoaderTimeout(RuntimeError):
    """A loader worker sent no batch within data.loader_timeout_s; the message names the rank, host and shards."""


class BadSample(ValueError):
    pass


def shuffled(data, bufsize: int, initial: int, rng: random.Random):
    """A shuffle buffer: webdataset's filters._shuffle (1.0.2) line for line, so the stream is unchanged, without
    its private API: fill to `initial` (taking two items per step while under bufsize), then yield a random one."""
    data, buf, initial = iter(data), [], min(initial, bufsize)
    for sample in data:
        buf.append(sample)
        if len(buf) < bufsize:
            buf.extend(itertools.islice(data, 1))
        if len(buf) >= initial:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list, rng: random.Random):
    k = rng.randint(0, len(buf) - 1)
    sample, buf[k] = buf[k], buf[-1]
    buf.pop()
    return sample


def _rng(*key) -> random.Random:
    return random.Random("/".join(map(str, key)))  # str seeds hash with sha512: same in every process


def _crop_box(w: int, h: int, rng: np.random.Generator):
    for _ in range(10):
        area = w * h * rng.uniform(*RRC_SCALE)
        ratio = np.exp(rng.uniform(*np.log(RRC_RATIO)))
        cw, ch = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def _json_label(data: bytes) -> int:
    """A .json label: a bare integer, or an object with an integer "cls", "label" or "class" (in that order)."""
    if len(data) > MAX_JSON_LABEL:
        raise BadSample(f".json label of {len(data):,} bytes (over {MAX_JSON_LABEL:,})")
    try:
        d = json.loads(data)
    except ValueError as e:
        raise BadSample(f".json label is not JSON: {e}") from None
    y = next((d[k] for k in ("cls", "label", "class") if k in d), None) if isinstance(d, dict) else d
    if not isinstance(y, int) or isinstance(y, bool):
        raise BadSample(f".json label {str(d)[:80]} has no integer cls/label/class")
    return y


class ShardBatches(IterableDataset):
    """One slot's batches, endless epochs; each batch is (x, y, counts since the previous batch)."""

    def __init__(self, urls, weights, per_worker: int, rank: int, world_size: int, seed: int, data_cfg, model_cfg):
        self.urls, self.cum_weights = list(urls), list(itertools.accumulate(weights)) if weights else None
        self.per_worker, self.rank, self.world_size, self.seed = per_worker, rank, world_size, seed
        d = data_cfg
        self.batch_size, self.shuffle_buffer, self.resampled = d.batch_size, d.shuffle_buffer, d.resampled
        self.flip, self.rrc, self.dequantize = d.flip, d.random_resized_crop, d.dequantize
        self.max_bad_fraction, self.allow_pickle = d.max_bad_fraction, d.allow_pickle
        self.max_pixels, self.max_member_bytes = d.max_image_pixels, d.max_member_bytes
        self.res, self.channels, self.num_classes = model_cfg.resolution, model_cfg.in_channels, model_cfg.num_classes
        self.epoch, self.consumed = 0, 0  # where to start; set by Stream before each loader start

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        w = (wid + self.consumed) % nw  # worker 0 of a restarted loader serves batch `consumed` of the old order
        self.good, self.bad, self.reported, self.logged = 0, 0, 0, 0.0
        self.bad_shards, self.new_bad = Counter(), Counter()
        skip = len(range(w, self.consumed, nw))
        for epoch in itertools.count(self.epoch):
            yield from self._epoch(epoch, w, nw, skip)
            skip = 0

    def _epoch(self, epoch: int, w: int, nw: int, skip: int):
        key = (self.seed, self.rank, w, epoch)
        if self.resampled:  # one endless pass of shards drawn with replacement
            rng = _rng(*key, "shards")
            passes = [(rng.choices(self.urls, cum_weights=self.cum_weights)[0] for _ in itertools.count())]
        else:  # this slot's share of one permutation; passed again only if bad data left it short
            order = list(self.urls)
            _rng(self.seed, epoch).shuffle(order)
            passes = itertools.repeat(order[self.rank * nw + w::self.world_size * nw])
        entropy, batch, done, i = [self.seed % (1 << 63), self.rank, w, epoch], [], skip, -1
        for n, urls in enumerate(passes):
            samples = self._read(urls)
            if self.shuffle_buffer > 1:
                samples = shuffled(samples, self.shuffle_buffer, min(100, self.shuffle_buffer), _rng(*key, n))
            for sample in samples:
                i += 1
                if i < skip * self.batch_size:  # used before a restart: skipped undecoded
                    continue
                try:
                    batch.append(self._decode(sample, np.random.default_rng(entropy + [i])))
                    self.good += 1
                except Exception as e:
                    self._bad(sample.get("__url__", "?"), f"{sample.get('__key__')}: {type(e).__name__}: {e}")
                    continue
                if len(batch) == self.batch_size:
                    self._check()
                    yield self._collate(batch)
                    batch, done = [], done + 1
                    if done == self.per_worker:
                        return

    def _read(self, urls):
        for url in urls:
            n = 0
            try:
                for sample in tar_samples(url, self.max_member_bytes):
                    n += 1
                    yield sample
            except Exception as e:
                self._bad(url, f"unreadable after {n} samples: {type(e).__name__}: {e}")
                continue
            if n == 0:
                self._bad(url, "no samples in shard")

    def _decode(self, sample: dict, rng: np.random.Generator):
        if "__bad__" in sample:
            raise BadSample(sample["__bad__"])
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise BadSample(f"no image among fields {sorted(k for k in sample if not k.startswith('__'))}")
        y = self._label(sample) if self.num_classes else 0
        r = self.res
        if self.rrc:
            img = to_mode(open_for(io.BytesIO(data), 0, self.max_pixels), self.channels)
            img = img.resize((r, r), Image.Resampling.BICUBIC, box=_crop_box(*img.size, rng))
            a = np.asarray(img, dtype=np.uint8).reshape(r, r, self.channels).transpose(2, 0, 1)
        else:
            a = decode(data, r, self.channels, self.max_pixels)
        if self.flip and rng.random() < 0.5:
            a = a[:, :, ::-1]
        if self.dequantize:  # uniform 1/256 dequantization: pixel k -> [k/256, (k+1)/256)
            return (a + rng.random(a.shape, dtype=np.float32)) / np.float32(256), y
        return a.astype(np.float32) / np.float32(255), y

    def _label(self, sample: dict) -> int:
        if "cls" in sample:
            y = int(sample["cls"])
        elif "json" in sample:
            y = _json_label(sample["json"])
        elif "pyd" in sample or "pickle" in sample:
            if not self.allow_pickle:
                raise BadSample("label is pickled (.pyd/.pickle); set data.allow_pickle=true only for shards you trust")
            y = int(pickle.loads(sample.get("pyd", sample.get("pickle"))))
        else:
            raise BadSample("no label (.cls or .json) but model.num_classes > 0")
        if not 0 <= y < self.num_classes:
            raise BadSample(f"label {y} outside model.num_classes={self.num_classes}")
        return y

    def _bad(self, url: str, why: str) -> None:
        self.bad, self.last_why = self.bad + 1, why
        self.bad_shards[url] += 1
        self.new_bad[url] += 1
        if self.bad <= LOG_FIRST or time.monotonic() - self.logged > LOG_EVERY_S:
            self.logged = time.monotonic()
            more = " (from now on one line a minute)" if self.bad == LOG_FIRST else ""
            log.warning(f"skipped bad sample {self.bad} (rank {self.rank}) in {url}: {why}{more}")
        self._check()

    def _check(self) -> None:
        seen = self.good + self.bad
        if seen >= MIN_CHECKED and (self.good == 0 or self.bad > self.max_bad_fraction * seen):
            worst = ", ".join(f"{u} ({n})" for u, n in self.bad_shards.most_common(5))
            raise CorruptDataError(
                f"{self.bad} of {seen} samples read by rank {self.rank} failed, more than data.max_bad_fraction="
                f"{self.max_bad_fraction}; worst shards: {worst}; last error: {self.last_why}. Re-write them "
                f"(tools/make_shards.py), drop them from data.shards, or raise data.max_bad_fraction")

    def _collate(self, batch):
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        y = torch.tensor([b[1] for b in batch], dtype=torch.int64)
        counts = {"samples": self.good - self.reported, "bad": dict(self.new_bad)}
        self.reported, self.new_bad = self.good, Counter()
        return x, y, counts


class Stream:
    """Iterate for (x, y); `state_dict` / `load_state_dict` to resume; `stats()` for counts."""

    def __init__(self, dataset: ShardBatches, loader_kw: dict, steps_per_epoch: int, resampled: bool):
        self.dataset, self.loader_kw, self.resampled = dataset, loader_kw, resampled
        self.steps_per_epoch = steps_per_epoch
        self.epoch, self.batch, self.samples, self.bad_samples, self.bad_shards = 0, 0, 0, 0, Counter()
        self._batches = None

    def __iter__(self):
        if self._batches is None:
            self.dataset.epoch, self.dataset.consumed = self.epoch, self.batch
            self._batches = iter(DataLoader(self.dataset, **self.loader_kw))
        while True:
            try:
                x, y, counts = next(self._batches)
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                d = self.dataset
                raise LoaderTimeout(
                    f"rank {d.rank} on {socket.gethostname()}: no batch from its data loader workers in "
                    f"data.loader_timeout_s={self.loader_kw['timeout']:g} s (epoch {self.epoch}, batch {self.batch}); "
                    f"a worker is stuck reading its shards (a stalled filesystem or URL?) among "
                    f"{', '.join(d.urls[:3])}{', ...' if len(d.urls) > 3 else ''}. Relaunch to resume from the last "
                    f"checkpoint; raise data.loader_timeout_s if the storage is just slow") from e
            self.samples += counts["samples"]
            self.bad_samples += sum(counts["bad"].values())
            self.bad_shards.update(counts["bad"])
            self.batch += 1
            if self.batch == self.steps_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            yield x, y
            if self.batch == 0 and not self.resampled:
                return

    def close(self) -> None:
        """Stop the loader workers now. Left to garbage collection, they may outlive the trainer's objects into
        Python's exit handlers, and multiprocessing's then waits forever for workers that block SIGTERM
        (`launch.job.shield_helper_processes`)."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)  # the DataLoader iterator's own clean stop
        if shutdown:
            shutdown()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.dataset.seed, "samples": self.samples,
                "bad_samples": self.bad_samples, "world_size": self.dataset.world_size,
                "workers": self.loader_kw["num_workers"], "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, sd: dict) -> None:
        same = (sd.get("world_size"), sd.get("workers")) == (self.dataset.world_size, self.loader_kw["num_workers"])
        if not same:
            log.info("data stream: world size or data.workers changed since the checkpoint; continuing at epoch "
                     f"{sd['epoch']} batch {sd['batch']} with a stream that differs from the uninterrupted one")
        self.epoch, self.batch = sd["epoch"], min(sd["batch"], self.steps_per_epoch - 1)
        self.dataset.seed, self.samples, self.bad_samples = sd["seed"], sd.get("samples", 0), sd.get("bad_samples", 0)
        self.close()  # the next iter() starts workers at the restored position

    def stats(self) -> dict:
        return {"samples": self.samples, "bad_samples": self.bad_samples, "bad_shards": dict(self.bad_shards),
                "epoch": self.epoch, "batch": self.batch, "steps_per_epoch": self.steps_per_epoch}


def _check_labels(shards, model_cfg) -> None:
    manifests = {id(s.manifest): (s.url, s.manifest) for s in shards if s.manifest}
    for url, m in manifests.values():
        n = m.get("num_classes", 0)
        if model_cfg.num_classes and not n:
            raise ConfigError(f"model.num_classes: {model_cfg.num_classes}, but the shards of {url} have no labels; "
                              f"set model.num_classes=0 (unconditional) or use labelled shards")
        if n > model_cfg.num_classes > 0:
            raise ConfigError(f"model.num_classes: {model_cfg.num_classes}, but the shards of {url} hold {n} classes")


def verify_shards(shards, rank: int, world_size: int) -> None:
    """data.verify: this rank's share of the local shards against their manifest's sha256 (ConfigError naming them)."""
    import os
    import posixpath
    bad = []
    for s in shards[rank::world_size]:
        want = {e["name"]: e.get("sha256") for e in (s.manifest or {}).get("shards", [])}.get(posixpath.basename(s.url))
        if want and os.path.isfile(s.url) and sha256_of(s.url) != want:
            bad.append(s.url)
    if bad:
        raise ConfigError(f"data.verify: {len(bad)} shard(s) differ from their manifest.json sha256 (damaged or "
                          f"changed since written): {', '.join(bad[:5])}; re-write them (tools/make_shards.py) or "
                          f"check with `tools/make_shards.py verify DIR`")


def build_stream(data_cfg, model_cfg, rank: int, world_size: int, seed: int) -> Stream:
    """The per-rank training stream of `data_cfg.shards`; see the module docstring."""
    shards = resolve(data_cfg)
    count_samples(shards)
    if data_cfg.verify:
        verify_shards(shards, rank, world_size)
    _check_labels(shards, model_cfg)
    b, w = data_cfg.batch_size, max(1, data_cfg.workers)
    slots, total = world_size * w, sum(s.samples for s in shards)
    if total == 0:
        raise ConfigError(f"data.shards: the {len(shards)} shards of '{data_cfg.shards}' hold no samples")
    weights = None
    if data_cfg.resampled:
        per_worker = max(1, total // (b * slots))
        per_source = Counter()
        for s in shards:
            per_source[s.source] += s.samples
        ws = data_cfg.weights
        # a draw of shard j yields its n_j samples, so p_j = w_source / samples_in_source gives each source its
        # weight's share of the samples (and, unweighted, every sample the same chance)
        weights = [(ws[s.source] / per_source[s.source] if ws else 1.0) if s.samples else 0.0 for s in shards]
    else:
        if len(shards) < slots:
            raise ConfigError(f"data.shards: {len(shards)} shards cannot be split over {world_size} ranks x {w} "
                              f"workers without resampling; set data.resampled=true or make more, smaller shards "
                              f"(tools/make_shards.py --num-shards {slots})")
        per_worker = sum(sorted(s.samples for s in shards)[:len(shards) // slots]) // b
        if per_worker == 0:
            raise ConfigError(f"data.batch_size: {b} is more than one slot's share of the shards "
                              f"({world_size} ranks x {w} workers); lower it or data.workers, or set "
                              f"data.resampled=true")
    dataset = ShardBatches([s.url for s in shards], weights, per_worker, rank, world_size, seed, data_cfg, model_cfg)
    # its own generator: DataLoader.__iter__ otherwise draws a seed from the global torch RNG, so a resumed run
    # (whose loader starts after the RNG restore) would diverge from the uninterrupted one
    kw = dict(batch_size=None, num_workers=data_cfg.workers, generator=torch.Generator().manual_seed(seed),
              pin_memory=data_cfg.pin_memory and torch.cuda.is_available())
    if data_cfg.workers:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))  # ignored if the launcher already started it
        kw.update(prefetch_factor=data_cfg.prefetch, multiprocessing_context=ctx, timeout=data_cfg.loader_timeout_s)
    return Stream(dataset, kw, per_worker * w, data_cfg.resampled)
