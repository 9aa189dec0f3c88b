"""`data.shards` -> a list of shard URLs with sample counts.

Accepted forms, several joined by `::` (each one source, mixed by `data.weights`):
  data/x/train-{000000..000127}.tar   brace pattern (local path or any URL webdataset opens)
  data/x/manifest.json                the manifest written by tools/make_shards.py (names may be full URLs)
  data/x/shards.txt                   one shard per line (relative to the file's folder), # comments
Sample counts come from a manifest.json (given, or found beside the shards) or, for local files, by reading the
tar headers. `pipe:` URLs run shell commands and are refused unless `data.allow_pipe`.

A shard is data someone else may have written (docs/security.md). Reading one is bounded whatever its headers
say: an extended header (pax, GNU long name/link) over MAX_HEADER_BYTES and any GNU sparse member end the shard as
unreadable before tarfile reads them into memory; a member over data.max_member_bytes is skipped unread; only the
extensions ebmscale uses (USED_KEYS) are read; a key with more than MAX_MEMBERS members or more than
MEMBER_SLOTS x data.max_member_bytes read is a bad sample. Keys follow webdataset's base_plus_ext.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import braceexpand  # declared in pyproject.toml; webdataset.shardlists.expand_urls would also substitute env vars
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from ebmscale.config import ConfigError
from ebmscale.trust import Untrusted, read_bytes

log = logging.getLogger("ebmscale.data")


@dataclass
class Shard:
    url: str
    samples: Optional[int]  # None until counted
    source: int  # index of its `::` part
    manifest: Optional[dict] = None


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _join(base: str, name: str) -> str:
    return name if not is_local(name) or os.path.isabs(name) or not base else posixpath.join(base, name)


MAX_INDEX_BYTES = 64 << 20  # a manifest.json or shard list (100k shards: ~15 MB)


def _read_index(url: str) -> bytes:
    """A manifest or shard list: a local one must be a regular file (a FIFO there hung the reader, a link to
    /dev/zero filled memory); local or remote, at most MAX_INDEX_BYTES."""
    if is_local(url):
        return read_bytes(url, MAX_INDEX_BYTES)
    with gopen(url) as f:
        data = f.read(MAX_INDEX_BYTES + 1)
    if len(data) > MAX_INDEX_BYTES:
        raise Untrusted(f"{url} is over {MAX_INDEX_BYTES:,} bytes: refused (not a manifest or shard list)")
    return data


def _read_json(url: str) -> dict:
    return json.loads(_read_index(url))


def _from_manifest(url: str, source: int) -> List[Shard]:
    m = _read_json(url)
    if not m.get("complete", True):
        raise ConfigError(f"data.shards: {url} is incomplete (tools/make_shards.py was interrupted or is still "
                          f"running); re-run the same make_shards command to finish it")
    base = posixpath.dirname(url)
    return [Shard(_join(base, s["name"]), s.get("samples"), source, m) for s in m["shards"]]


def _from_list(url: str, source: int) -> List[Shard]:
    lines = [ln.strip() for ln in _read_index(url).decode().splitlines()]
    return [Shard(_join(posixpath.dirname(url), ln), None, source) for ln in lines if ln and not ln.startswith("#")]


def _refuse_pipe(url: str) -> None:
    raise ConfigError(f"data.shards: '{url}' is a pipe: URL, which runs a shell command; "
                      f"set data.allow_pipe=true only if you trust where this config came from")


def list_shards(spec: str, allow_pipe: bool = False) -> List[Shard]:
    """Expand `data.shards` (no counting, no existence check)."""
    shards: List[Shard] = []
    for i, part in enumerate(p.strip() for p in spec.split("::")):
        if part.startswith("pipe:") and not allow_pipe:
            _refuse_pipe(part)
        if part.endswith(".json"):
            shards += _from_manifest(part, i)
        elif part.endswith((".txt", ".list")):
            shards += _from_list(part, i)
        else:
            shards += [Shard(u, None, i) for u in braceexpand.braceexpand(part)]
    for s in shards:
        if s.url.startswith("pipe:") and not allow_pipe:
            _refuse_pipe(s.url)
    return shards


META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not samples
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
LABEL_KEYS = ("cls", "json", "pyd", "pickle")  # .pyd/.pickle decoded only under data.allow_pickle
USED_KEYS = frozenset(IMAGE_KEYS + LABEL_KEYS)
MAX_HEADER_BYTES = 1 << 16  # one pax / GNU long-name header (a long path is a few KB)
MAX_MEMBERS = 64  # members under one key (an image, a label, a few extras)
MEMBER_SLOTS = 2  # bytes read per sample: at most this many members of up to data.max_member_bytes (image, label)


class _CappedInfo(tarfile.TarInfo):
    """tarfile reads an extended header (pax, GNU long name) whole into memory before the member it describes:
    refuse one over MAX_HEADER_BYTES, global pax headers adding up past it, and GNU sparse members (their
    extension blocks chain without bound) before they are read. (TarInfo._proc_member: the one hook tarfile has.)"""

    def _proc_member(self, tarfile_):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.HeaderError(f"{self.name}: a GNU sparse member (shards hold none)")
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE):
            seen = getattr(tarfile_, "_global_header_bytes", 0) + (self.size if self.type == tarfile.XGLTYPE else 0)
            if self.size > MAX_HEADER_BYTES or seen > MAX_HEADER_BYTES:
                raise tarfile.HeaderError(f"an extended tar header of {self.size:,} bytes (over {MAX_HEADER_BYTES:,})")
            tarfile_._global_header_bytes = seen
        return super()._proc_member(tarfile_)


def tar_samples(url: str, max_member_bytes: int, keys=USED_KEYS) -> Iterator[dict]:
    """The samples of one tar shard, grouped by key as webdataset does: {"__key__", "__url__", ext: bytes}, with only
    the extensions in `keys` read. A member over max_member_bytes is skipped unread, so one huge file costs no
    memory; its sample carries "__bad__": why, as does a key with too many members or bytes (module docstring)."""
    with gopen(url) as f, tarfile.open(fileobj=f, mode="r|*", tarinfo=_CappedInfo) as tar:
        sample = None
        for m in tar:
            tar.members = []  # stream mode would keep every header
            key, ext = base_plus_ext(m.name)
            if not m.isreg() or key is None or META.match(m.name):
                continue
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample, members, read = {"__key__": key, "__url__": url}, 0, 0
            ext, members = ext.lower(), members + 1
            if members > MAX_MEMBERS:
                sample["__bad__"] = f"{key}: more than {MAX_MEMBERS} members under one key"
            elif m.size > max_member_bytes:
                sample["__bad__"] = f"{m.name} is {m.size:,} bytes, over data.max_member_bytes={max_member_bytes:,}"
            elif ext in sample:
                sample["__bad__"] = f"{m.name}: a second .{ext} member under one key"
            elif ext in keys and "__bad__" not in sample:
                read += m.size
                if read > MEMBER_SLOTS * max_member_bytes:
                    sample["__bad__"] = (f"{key}: over {MEMBER_SLOTS} x data.max_member_bytes="
                                         f"{max_member_bytes:,} bytes read under one key")
                else:
                    sample[ext] = tar.extractfile(m).read()
        if sample is not None:
            yield sample


def _count_tar(path: str) -> int:
    """Samples (distinct keys) in a local tar, reading only the headers; a truncated tar counts what is there."""
    keys = set()
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*", tarinfo=_CappedInfo) as tar:
            for m in tar:
                tar.members = []
                if m.isreg() and not META.match(m.name):
                    keys.add(base_plus_ext(m.name)[0])
    except (tarfile.TarError, OSError, EOFError):
        pass
    keys.discard(None)
    return len(keys)


def count_samples(shards: List[Shard]) -> None:
    """Fill in `samples`: from a manifest.json beside the shards, else (local files) from the tar headers."""
    beside: Dict[str, tuple] = {}  # folder -> (manifest or None, {name: samples})
    for s in shards:
        if s.samples is not None:
            continue
        folder = posixpath.dirname(s.url)
        if folder not in beside:
            try:
                m = None if s.url.startswith("pipe:") else _read_json(posixpath.join(folder, "manifest.json"))
            except Exception:
                m = None
            beside[folder] = (m, {e["name"]: e["samples"] for e in m["shards"]} if m else {})
        m, counts = beside[folder]
        s.samples = counts.get(posixpath.basename(s.url))
        s.manifest = m if s.samples is not None else None
    unknown = [s for s in shards if s.samples is None]
    if any(not is_local(s.url) for s in unknown):
        raise ConfigError(f"data.shards: cannot count the samples of {len(unknown)} remote shards (e.g. "
                          f"{unknown[0].url}); point data.shards at a manifest.json listing them with their counts "
                          f"(tools/make_shards.py writes one)")
    if len(unknown) > 20:
        log.warning(f"counting samples by reading the headers of {len(unknown)} shards; "
                    f"a manifest.json beside them makes this instant")
    for s in unknown:
        s.samples = _count_tar(s.url)


def _hint(spec: str) -> str:
    if "digits" in spec:
        return "python tools/make_shards.py digits data/digits"
    out = posixpath.dirname(spec.split("::")[0]) or "OUT_DIR"
    return f"python tools/make_shards.py {{imagenet,folder,flat,cifar10}} SRC {out}"


def resolve(data_cfg) -> List[Shard]:
    """list_shards plus the checks a launcher wants before queueing: something matches, local files readable."""
    spec = data_cfg.shards
    try:
        shards = list_shards(spec, data_cfg.allow_pipe)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"data.shards: cannot read '{spec}' ({type(e).__name__}: {e}); "
                          f"make the shards first: {_hint(spec)}") from None
    bad = [s.url for s in shards if is_local(s.url) and not (os.path.isfile(s.url) and os.access(s.url, os.R_OK))]
    if not shards or len(bad) == len(shards):
        raise ConfigError(f"data.shards: nothing matches '{spec}'; make the shards first: {_hint(spec)}")
    if bad:
        raise ConfigError(f"data.shards: {len(bad)} of {len(shards)} shards are missing or unreadable "
                          f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); re-run make_shards "
                          f"(it skips complete shards) or fix the pattern in '{spec}'")
    return shards


def check_shards(data_cfg) -> List[str]:
    """The shard URLs of `data.shards`, or a ConfigError naming data.shards and the fix."""
    return [s.url for s in resolve(data_cfg)]
