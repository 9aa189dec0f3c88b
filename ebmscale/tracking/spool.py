"""A durable in-order queue of tracking calls: run_dir/tracking_spool/{spool.jsonl, cursor, state.json, files/}.

Every tracker call is appended here first and sent from here, so an outage, a crash or a requeue loses
nothing: whoever opens the same folder next sends what is left. spool.jsonl only grows until everything
in it is sent; `cursor` is the byte offset of the first unsent record. `state` is a small dict the owner
keeps in step with the records (written at compaction, so state.json + spool.jsonl always cover every
record ever appended). Files are copied under files/ at call time, so the caller may overwrite them.
Bounded: with `max_bytes` (tracking.spool_max_mb) a file that would take unsent records plus files/ past it is
refused (SpoolFull; the tracker drops it with a warning), while records themselves (metrics, tags) are always
kept: artifacts go first.
A spool may come with a run folder someone else wrote: a record's file is only ever looked for, sent or removed
under files/ (trust.spool_file); any other path is refused by name and nothing outside the spool is touched.
"""
import json
import os
import shutil
import threading
import uuid
from pathlib import Path

from ebmscale.trust import Untrusted, read_bytes, read_json, spool_file

COMPACT_BYTES = 1 << 20  # truncate a fully sent spool once it is this big
LINK_BYTES = 64 << 20  # hard-link (don't copy) files this big, e.g. checkpoints written once


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():  # a leftover (or a planted link): removed, never written through
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _own_file(path: Path) -> None:
    """A spool bookkeeping file that exists must be a regular file, not a link (to a file outside) or a FIFO."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise Untrusted(f"{path} is a link or not a regular file; the spool writes plain files there: refused "
                        f"(nothing outside the spool is read or written)")


class SpoolFull(RuntimeError):
    pass


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _link_or_copy(src, dst):
    if os.path.getsize(src) >= LINK_BYTES:
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    return shutil.copy2(src, dst)


class Spool:
    def __init__(self, root: Path, max_bytes: int = 0):
        self.root, self.max_bytes = Path(root), max_bytes
        if self.root.is_symlink():
            raise Untrusted(f"{self.root} is a symbolic link: refused (the spool is written in place)")
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        self.path, self.state_path = self.root / "spool.jsonl", self.root / "state.json"
        self.cursor_path = self.root / "cursor"
        for p in (self.path, self.state_path, self.cursor_path, self.root / "files"):
            if p.name == "files":
                if p.is_symlink():
                    raise Untrusted(f"{p} is a symbolic link: refused")
            else:
                _own_file(p)
        self.lock = threading.RLock()
        self.state = read_json(self.state_path, 64 << 20, self.root) if self.state_path.exists() else {}
        self._f = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644), "ab")
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # torn by a crash mid-append
            self._f.truncate(data.rfind(b"\n") + 1)
        self._f.seek(0, os.SEEK_END)
        self.cursor = int(read_bytes(self.cursor_path, 64, self.root)) if self.cursor_path.exists() else 0
        if self.cursor > self._f.tell():  # crashed between truncating and rewinding the cursor
            self.cursor = 0
        self.file_bytes = _size(self.root / "files")

    def fits(self, nbytes: int) -> bool:
        return not self.max_bytes or self.pending() + self.file_bytes + nbytes <= self.max_bytes

    def admit(self, path: Path) -> None:
        """Count a file written under new_file(); SpoolFull (and the file removed) if it does not fit."""
        size = _size(path)
        if not self.fits(size):
            shutil.rmtree(Path(path).parent, ignore_errors=True)
            raise SpoolFull(f"{Path(path).name} ({size} bytes)")
        self.file_bytes += size

    def append(self, record: dict) -> None:
        with self.lock:
            self._f.write(json.dumps(record).encode() + b"\n")
            self._f.flush()

    def records(self, start: int = None, limit: int = None):
        """[(end offset, record)] from byte `start` (default: the cursor); an unreadable line (or one that is not
        a JSON object) reads as {}."""
        out = []
        with self.lock, open(self.path, "rb") as f:
            f.seek(self.cursor if start is None else start)
            while limit is None or len(out) < limit:
                line = f.readline()
                if not line:
                    break
                try:
                    r = json.loads(line)
                except ValueError:
                    r = {}
                out.append((f.tell(), r if isinstance(r, dict) else {}))
        return out

    def pending(self) -> int:
        """Unsent bytes."""
        with self.lock:
            return self._f.tell() - self.cursor

    def ack(self, offset: int) -> None:
        """Everything before byte `offset` is sent."""
        with self.lock:
            self.cursor = offset
            if offset == self._f.tell() and offset >= COMPACT_BYTES:
                self.compact()
            else:
                _write_atomic(self.cursor_path, str(offset))

    def compact(self) -> None:
        with self.lock:
            if self.pending():
                return
            _write_atomic(self.state_path, json.dumps(self.state))
            self._f.truncate(0)
            self._f.seek(0)
            self.cursor = 0
            _write_atomic(self.cursor_path, "0")

    def new_file(self, name: str) -> Path:
        path = self.root / "files" / uuid.uuid4().hex[:12] / name
        path.parent.mkdir(parents=True)
        return path

    def stash(self, src: Path) -> str:
        """Copy a file or folder into the spool; returns its path relative to the spool root."""
        src = Path(src)
        size = _size(src)
        if not self.fits(size):
            raise SpoolFull(f"{src} ({size / 2 ** 20:.1f} MB)")
        dst = self.new_file(src.name)
        self.file_bytes += size
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
        return str(dst.relative_to(self.root))

    def file(self, rel) -> Path:
        """The file a record names, which must be one new_file() made (files/<id>/<name>); Untrusted otherwise."""
        return spool_file(self.root, rel)

    def discard(self, rel: str) -> None:
        """Remove a sent record's files/<id>/ folder; a path that is not one is left alone (Untrusted)."""
        try:
            folder = self.file(rel).parent
        except Untrusted:
            return
        self.file_bytes = max(0, self.file_bytes - _size(folder))
        shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        self._f.close()
