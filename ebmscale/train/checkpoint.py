"""Checkpoints that count only once committed.

Layout of `RUN/checkpoints/step_000500/`:
  DeepSpeed's files (model + ZeRO optimizer shards, written by every rank)
  rank_00000.pt ...  per-rank state: replay-buffer shard, RNG states, data-stream position
  trainer.json       step, world size, tracking run id, config (rank 0)
  COMMITTED          written last by rank 0, after every rank's files are complete (barrier); JSON with
                     `healthy`: the stability guard's judgement (guard.py), a rollback goes only to healthy ones
Before COMMITTED every rank fsyncs and hashes its own files (sha256) and rank 0 records every file's size
("files") and content hash ("sha256") in it; then the folder and its parent are fsynced. `latest()` is the one
answer to "which checkpoint": the newest *valid* committed folder (COMMITTED and trainer.json parse, every rank's
file is there, every file has its committed size and content); a torn or altered one is passed over with a warning
naming the bad file. A rollback target and a resume are content-checked; pruning and listing check sizes only.
Committed folders are immutable: nothing writes into a step_* once COMMITTED is there. What belongs to a committed
step but is written later lives beside it, keyed to its commit (`commit_key`, a digest of COMMITTED) and moved or
removed with it (branch, rollback, prune): `step_N.rollback.json` (the guard's state after a rollback to it, read
by `read_trainer_state` in place of trainer.json) and `step_N_universal/` (main.to_universal). If the run folder
holds committed checkpoints but none is readable, `resume=auto` refuses to start from step 0 over them.
A save first checks the free space (the last checkpoint's size, +10%) and fails naming the folder and the bytes;
a disk that fills during a save stops the run with `CheckpointWriteError` in words (the save is left uncommitted,
the committed ones untouched). Bookkeeping (`latest`) that cannot be written is a warning. `RUN/checkpoints/latest` is only written from it, for people
and DeepSpeed's tools; nothing reads it.
Branches: `checkpoint.resume=<older step or another run's checkpoint>` moves the newer step folders (a fork: all of
them) into `RUN/checkpoints/branched-<time>/` before anything is saved, and records the start in branch.json, so
a relaunch with the same setting continues the branch instead of branching again. A save never writes into a
committed folder. With the guard off, COMMITTED still records whether the weights were finite, and retention
always keeps the newest finite checkpoint.
A folder without COMMITTED is a partial save (a crash mid-write): it is never resumed and on the next start
(under the run folder's writer lock, runlock.py) is moved aside into `RUN/checkpoints/partial-<time>/`, never
deleted. Only folders named exactly `step_<digits>` are ebmscale's; anything else (`step_000000500.bak`, a user's
copy) is left alone and never listed.

Everything ebmscale writes loads with torch.load(weights_only=True) (the RNG states are stored as plain tensors,
DeepSpeed's files need four plain classes, `safe_deepspeed_globals`); `load` refuses a file that needs more, unless
the user trusts it (`--trust-pickles` in the tools, `checkpoint.trust_pickles`). `safe_torch_load()` routes
DeepSpeed's own loaders through `load` as well.

What is saved is one list, `Trainer.components()` (as torchtitan's checkpointer): name -> (object with
state_dict/load_state_dict, where). "rank" parts go to this rank's rank_*.pt, "shared" parts into trainer.json
(rank 0); the engine (model + optimizer) is DeepSpeed's own files. `restore` loads the same list back.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ebmscale.buffer import reshard
from ebmscale.config import ConfigError
from ebmscale.log import get_logger
from ebmscale.train import faults

log = get_logger(__name__)

COMMIT = "COMMITTED"
BRANCH = "branch.json"
ROLLBACK = ".rollback.json"  # step_N.rollback.json beside step_N
UNIVERSAL = "_universal"  # step_N_universal/ beside step_N
SPACE_MARGIN = 1.1  # a save needs the last checkpoint's size times this free


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full or failing disk); the message names the folder and what to do."""


STEP_NAME = re.compile(r"step_(\d+)")


def tag(step: int) -> str:
    return f"step_{step:09d}"


def step_of(folder: Path) -> Optional[int]:
    """The step of an ebmscale checkpoint folder; None for any other name."""
    m = STEP_NAME.fullmatch(Path(folder).name)
    return int(m.group(1)) if m else None


def committed(folder: Path) -> bool:
    return (folder / COMMIT).exists()


def list_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint folders, oldest first."""
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and committed(p)), key=step_of)


MAX_SMALL = 16 << 20  # COMMITTED, trainer.json, markers: larger is not ebmscale's


def read_small(path: Path, limit: int = MAX_SMALL) -> bytes:
    """The bytes of a small regular file (a marker, trainer.json) from a folder that may be data: a FIFO, a device
    (a symlink to /dev/zero) or a file over `limit` is refused with ValueError naming it, never read forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise ValueError(f"{path} is not a regular file of at most {limit} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def read_json(path: Path, limit: int = MAX_SMALL):
    return json.loads(read_small(path, limit) or b"{}")


def healthy(folder: Path) -> bool:
    """The guard's flag (and finite weights) in COMMITTED; older checkpoints (or an empty marker) count as healthy."""
    try:
        marker = read_json(folder / COMMIT)
        return bool(marker.get("healthy", True)) and bool(marker.get("finite", True))
    except (OSError, ValueError, AttributeError):
        return True


def healthy_checkpoints(root: Path, world_size: Optional[int] = None) -> list[Path]:
    """Committed checkpoints the guard judged healthy (written by `world_size` ranks if given), oldest first."""
    def ok(p):
        return healthy(p) and invalid(p) is None and (
            world_size is None or read_json(p / "trainer.json")["world_size"] == world_size)
    return [p for p in list_checkpoints(root) if ok(p)]


def digest(path: Path) -> str:
    """sha256 of a file's content (hashlib uses the CPU's SHA instructions; docs/security.md, "Checkpoints and the writer lock": speed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def commit_key(folder: Path) -> Optional[str]:
    """The identity of one commit of `folder` (a digest of its COMMITTED: sizes, hashes, time); what the files
    beside it (`_universal`, `.rollback.json`) are keyed to. None if not committed."""
    try:
        return hashlib.sha256(read_small(Path(folder) / COMMIT)).hexdigest()[:32]
    except (OSError, ValueError):
        return None


def companions(folder: Path) -> list[Path]:
    """The files and folders beside a step folder that belong to it (moved and removed with it)."""
    folder = Path(folder)
    return [p for p in (folder.with_name(folder.name + UNIVERSAL), folder.with_name(folder.name + ROLLBACK))
            if p.exists()]


def _move_with_companions(folder: Path, dest_dir: Path) -> None:
    for p in [folder, *companions(folder)]:
        os.replace(p, dest_dir / p.name)


REMOVING = ".removing-"  # a folder renamed so before it is deleted: a kill mid-delete leaves no torn commit


def _remove_with_companions(folder: Path) -> None:
    for p in [folder, *companions(folder)]:
        gone = p.with_name(REMOVING + p.name)
        _rmtree(gone)  # one left by a kill
        os.replace(p, gone)
        _rmtree(gone)


def _rmtree(p: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder."""
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


_verified: dict = {}  # (folder, COMMITTED's mtime and size) -> None: content checked once per process


def invalid(folder: Path, content: bool = False) -> Optional[str]:
    """Why a committed checkpoint cannot be resumed (naming the bad file), or None. `content`: also every file's
    sha256 against COMMITTED (checkpoints committed before hashes were recorded: sizes only)."""
    folder = Path(folder)
    bad = folder / COMMIT
    try:
        marker = read_json(bad)
        files, sums = dict(marker.get("files") or {}), dict(marker.get("sha256") or {})
        if not all(isinstance(v, int) for v in files.values()) or not all(
                isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in sums.values()):
            raise ValueError("its sizes must be integers and its sha256 64 hex digits")
        bad = folder / "trainer.json"
        world = read_json(bad)["world_size"]
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"world_size {world!r} is not a positive integer")
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        return f"{bad} unreadable: {type(e).__name__}: {e}"
    for r in range(world):
        if not (folder / f"rank_{r:05d}.pt").exists():
            return f"{folder / f'rank_{r:05d}.pt'} is missing"
    for name in {*files, *sums}:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{folder / COMMIT} names {name!r}, outside its folder"
    for p in (folder, *(folder / n for n in sorted({*files, *sums}))):
        if p.is_symlink():  # ebmscale writes none: a link would make the checkpoint's content live elsewhere
            return f"{p} is a symbolic link (to {os.readlink(p)}); a checkpoint's files must lie in its folder"
    for name, size in files.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{f} is {'missing' if not f.is_file() else f'{f.stat().st_size} bytes'}, {size} at commit"
    if content and sums:
        st = (folder / COMMIT).stat()
        key = (str(folder.resolve()), st.st_mtime_ns, st.st_size)
        if key not in _verified:
            for name, want in sorted(sums.items()):
                f = folder / name
                got = digest(f) if f.is_file() else "missing"
                if got != want:
                    return f"{f} has changed since its commit (sha256 {got[:12]}, {str(want)[:12]} at commit)"
            _verified[key] = None
    return None


def latest(root: Path, warn: bool = True, content: bool = True) -> Optional[Path]:
    """The newest valid committed checkpoint (content-checked unless `content=False`): the one answer to "which
    checkpoint is latest"."""
    for p in reversed(list_checkpoints(root)):
        why = invalid(p, content)
        if why is None:
            return p
        if warn:
            _log(f"WARNING: skipping torn checkpoint {p.name}: {why}; falling back to the one before")
    return None


class RNG:
    """The process's random generators as a checkpoint component."""

    @staticmethod
    def state_dict() -> dict:
        return rng_state()

    @staticmethod
    def load_state_dict(sd: dict) -> None:
        set_rng_state(sd)


def rng_state() -> dict:
    """Plain tensors and numbers only (loads with weights_only=True)."""
    version, keys, gauss = random.getstate()
    _, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"])
    if isinstance(npy, dict):
        npy = ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- safe loading ---------------------------------------------------------------------------------------------
class UntrustedFile(RuntimeError):
    """A checkpoint file that needs arbitrary pickled objects to load (it could run code)."""


TRUST_PICKLES = False  # set by the tools' --trust-pickles and checkpoint.trust_pickles
_torch_load = torch.load


def trust_pickles(on: bool) -> None:
    global TRUST_PICKLES
    TRUST_PICKLES = bool(on)


def safe_deepspeed_globals() -> list:
    """The plain-data classes DeepSpeed pickles into its checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load(path, trust: Optional[bool] = None, **kw):
    """torch.load with weights_only=True (plus DeepSpeed's plain classes); UntrustedFile for a file that needs
    more, unless `trust` (default: TRUST_PICKLES)."""
    kw.pop("weights_only", None)
    if TRUST_PICKLES if trust is None else trust:
        return _torch_load(path, weights_only=False, **kw)
    try:
        extra = safe_deepspeed_globals()
    except ImportError:
        extra = []
    try:
        with torch.serialization.safe_globals(extra):
            return _torch_load(path, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), str(e).splitlines()[0])
        raise UntrustedFile(f"{path}: refusing to load, it holds more than tensors and plain data ({why[:200]}); "
                            f"loading it could run code. Only if you trust who wrote it: pass --trust-pickles "
                            f"(tools) or checkpoint.trust_pickles=true (training)") from None


@contextmanager
def safe_torch_load(trust: Optional[bool] = None):
    """Every torch.load inside (DeepSpeed's loaders: engine.load_checkpoint, zero_to_fp32) goes through `load`."""
    def guarded(f, map_location=None, *args, **kw):
        return load(f, trust, map_location=map_location, **kw)
    torch.load = guarded
    try:
        yield
    finally:
        torch.load = _torch_load


def fingerprint(obj) -> str:
    """A short digest of tensors/arrays/values, printed on resume so a person (or a test) can check it."""
    h = hashlib.sha256()
    def feed(o):
        if isinstance(o, dict):
            for k in sorted(o):
                h.update(str(k).encode())
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                feed(v)
        elif isinstance(o, torch.Tensor):
            h.update(o.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif hasattr(o, "tobytes"):
            h.update(o.tobytes())
        else:
            h.update(repr(o).encode())
    feed(obj)
    return h.hexdigest()[:16]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(obj, src: int = 0):
    """Rank 0 decides (e.g. which checkpoint to resume), everyone agrees."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` to `path` atomically (tmp + fsync + rename) only if its content differs: a full disk can then
    fail the write but never truncate what was there. Returns whether it wrote."""
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    _atomic_write(path, text)
    return True


def bookkeeping(path: Path, text: str) -> None:
    """A write nothing depends on (a pointer for people): a failure is a warning, not the end of the run."""
    try:
        write_if_changed(path, text)
    except OSError as e:
        _log(f"WARNING: could not write {path} ({e.strerror or e}); carrying on without it")


def _owned(name: str) -> int:
    """The rank that wrote (and fsyncs and hashes) a checkpoint file: rank_R.pt and DeepSpeed's *pp_rank_R_* are
    rank R's, everything else rank 0's; a hidden temporary file (another rank's `.rank_R.pt.tmp`, still being
    written) nobody's (-1)."""
    if name.startswith("."):
        return -1
    m = re.fullmatch(r"rank_(\d+)\.pt", name) or re.search(r"pp_rank_(\d+)_", name)
    return int(m.group(1)) if m else 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves, commits, prunes and finds checkpoints. `save` returns after DeepSpeed's files and a
    snapshot of the per-rank state; the per-rank file is written on a background thread and the
    commit (barrier + marker) happens at `commit()`, which the trainer calls at the next step
    boundary (or at once when stopping), so a large buffer does not stall training."""

    def __init__(self, root: Path, cfg, rank: int, world_size: int):
        self.root, self.cfg, self.rank, self.world_size = Path(root), cfg, rank, world_size
        self._pending: Optional[tuple[Path, dict, threading.Thread]] = None
        self._error: list[BaseException] = []
        self._sums: dict = {}  # this rank's files -> sha256, computed off the training thread after the save
        self.fence = None  # () -> why this process lost the run folder's lease (runlock.Lease.lost), or None
        self.last_save_s = 0.0

    # ---- finding ------------------------------------------------------------------------------
    def resume_target(self) -> Optional[Path]:
        """Rank 0 resolves `checkpoint.resume` (auto | never | path) and cleans partial saves."""
        target = None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for p in sorted(self.root.iterdir()):
                if p.name.startswith(REMOVING):  # a prune or rollback killed mid-delete: finish it
                    _rmtree(p)
                elif p.is_dir() and step_of(p) is not None and not committed(p):
                    aside = self.root / f"partial-{time.strftime('%Y%m%d-%H%M%S')}"
                    aside.mkdir(exist_ok=True)
                    _log(f"moving partial checkpoint {p} (no {COMMIT} marker) aside to {aside}")
                    os.replace(p, aside / p.name)
            mode = self.cfg.resume
            if mode not in ("auto", "never"):
                target = Path(mode).resolve()
                if not committed(target):
                    raise FileNotFoundError(f"checkpoint.resume={mode}: not a committed checkpoint folder "
                                            f"(missing {target / COMMIT})")
                why = invalid(target, content=True)
                if why:
                    raise ConfigError(f"checkpoint.resume={mode}: this checkpoint cannot be resumed: {why}")
                if self.branched_from() == str(target) and list_checkpoints(self.root):
                    _log(f"checkpoint.resume={mode}: this run folder already branched from it "
                         f"({self.root / BRANCH}); continuing the branch from its latest checkpoint")
                    mode = "auto"
                else:
                    self.branch(target)
            if mode == "auto":
                target = latest(self.root)
                found = list_checkpoints(self.root)
                if target is None and found:
                    why = "; ".join(f"{p.name}: {invalid(p, True)}" for p in found)
                    raise ConfigError(
                        f"checkpoint.resume=auto: {self.root} holds {len(found)} committed checkpoint(s) but none is "
                        f"readable ({why}); refusing to start again from step 0 over them. Restore them (or point "
                        f"checkpoint.resume at a good copy), or start afresh in this folder with "
                        f"checkpoint.resume=never run.overwrite=true (they are moved aside, not deleted)")
            target = str(target) if target else None
        target = broadcast(target)
        return Path(target) if target else None

    def branched_from(self) -> Optional[str]:
        try:
            return json.loads((self.root / BRANCH).read_text())["from"]
        except (OSError, ValueError, KeyError):
            return None

    def branch(self, target: Path) -> None:
        """A new line of history starts at `target`: newer step folders here (a fork from another run: all of
        them) move into branched-<time>/, and branch.json records the start."""
        since = step_of(target) if target.parent == self.root.resolve() else -1
        newer = [p for p in sorted(self.root.iterdir()) if p.is_dir() and (step_of(p) if step_of(p) is not None
                                                                             else -1) > since]
        aside = self.root / f"branched-{time.strftime('%Y%m%d-%H%M%S')}"
        if newer:
            aside.mkdir(exist_ok=True)
            for p in newer:
                _move_with_companions(p, aside)
            _log(f"checkpoint.resume={target}: a new branch; the {len(newer)} later checkpoint folder(s) "
                 f"{', '.join(p.name for p in newer)} moved to {aside}")
        _atomic_write(self.root / BRANCH, json.dumps({"from": str(target), "time": time.time(),
                                                      "moved_to": str(aside) if newer else None}))
        self._point_latest()

    def _point_latest(self) -> None:
        newest = latest(self.root, warn=False, content=False)
        if newest is not None:
            bookkeeping(self.root / "latest", newest.name + "\n")

    @property
    def pending(self) -> bool:
        return self._pending is not None

    # ---- saving -------------------------------------------------------------------------------
    def save(self, engine, step: int, rank_state: dict, trainer_state: dict) -> Path:
        """DeepSpeed's files, then `rank_state` (this rank's file) and `trainer_state` (trainer.json, rank 0)."""
        self.commit()  # at most one save in flight
        t0 = time.perf_counter()
        folder = self.root / tag(step)
        short = broadcast(self.space_short(folder) if self.rank == 0 else None)
        if short:
            raise CheckpointWriteError(short)
        if self.rank == 0 and committed(folder):  # never write into a committed checkpoint
            aside = self.root / f"branched-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir(exist_ok=True)
            _move_with_companions(folder, aside)
            _log(f"WARNING: {folder} was committed already (another line of history); moved to {aside}")
        _barrier()
        with self._writing(folder):
            engine.save_checkpoint(str(self.root), tag=tag(step), save_latest=False)
            faults.maybe_kill("kill_in_save", step, self.rank)
            if self.rank == 0:
                _atomic_write(folder / "trainer.json", json.dumps(trainer_state, indent=1, default=str))
        if self.cfg.async_buffer:
            thread = threading.Thread(target=self._write_rank_file, args=(folder, rank_state), daemon=True)
            thread.start()
        else:
            self._write_rank_file(folder, rank_state)
            thread = None
        self._pending = (folder, trainer_state, thread)
        self.last_save_s = time.perf_counter() - t0
        return folder

    def space_short(self, folder: Path) -> Optional[str]:
        """Why there is not room for the next checkpoint (its size estimated from the last one), or None."""
        last = next(iter(list_checkpoints(self.root)[-1:]), None)
        try:
            size = sum(read_json(last / COMMIT).get("files", {}).values()) if last else 0
            free = shutil.disk_usage(self.root).free
        except (OSError, ValueError, AttributeError, TypeError):
            return None
        need = int(size * SPACE_MARGIN)
        if free >= need:
            return None
        return (f"not enough free space to save {folder}: about {need} bytes needed ({last.name} took {size}), "
                f"{free} free on the filesystem holding {self.root}. Nothing was written and the committed "
                f"checkpoints are untouched; free space there (or lower checkpoint.keep_last) and relaunch to resume "
                f"from {last.name}")

    @contextmanager
    def _writing(self, folder: Path):
        """An error while writing a checkpoint (a full disk: OSError, or torch.save's RuntimeError from its C++
        stream) becomes CheckpointWriteError in words."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            raise CheckpointWriteError(self._write_failed(folder, e)) from e

    def _write_failed(self, folder: Path, e: BaseException) -> str:
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 1 << 20)
        why = getattr(e, "strerror", None) or f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        good = latest(self.root, warn=False, content=False)
        return (f"rank {self.rank}: writing checkpoint {folder} failed"
                + (f": the filesystem holding {self.root} is full ({free} bytes free)" if full else
                   f" ({free if free is not None else 'unknown'} bytes free on the filesystem holding {self.root})")
                + f"; the error was {why} ({getattr(e, 'filename', None) or folder}). It is not committed (moved "
                f"aside at the next start); the committed checkpoints are untouched"
                + (f", the newest is {good.name}" if good else "") + ". Free space there and relaunch to resume")

    def _write_rank_file(self, folder: Path, state: dict) -> None:
        """This rank's file, then every file this rank wrote (DeepSpeed's are complete by now) fsynced and hashed:
        on the background thread with checkpoint.async_buffer, so hashing does not stall training."""
        try:
            _save_file(state, folder / f"rank_{self.rank:05d}.pt")
            sums = {}
            for f in sorted(folder.rglob("*")):
                if f.is_file() and _owned(f.name) == self.rank:
                    _fsync(f)
                    sums[str(f.relative_to(folder))] = digest(f)
            self._sums = sums
        except BaseException as e:  # surfaced at commit time, never lost silently
            self._error.append(e)

    def commit(self, healthy: bool = True, finite: bool = True) -> Optional[Path]:
        """Every rank's files complete, fsynced and hashed -> barrier -> rank 0 writes COMMITTED (with the guard's
        `healthy`, whether the weights were `finite`, every file's size and sha256), fsyncs the folders, moves
        `latest`, prunes. Refused (fence) when this process no longer holds the run folder's lease."""
        if self._pending is None:
            return None
        folder, _, thread = self._pending
        self._pending = None
        if thread is not None:
            thread.join()
        if self._error:
            e = self._error.pop()
            if isinstance(e, (OSError, RuntimeError)):
                raise CheckpointWriteError(self._write_failed(folder, e)) from e
            raise RuntimeError(f"writing {folder}/rank_{self.rank:05d}.pt failed") from e
        with self._writing(folder):
            sums, self._sums = self._sums, {}  # each rank its own files (rank 0 the shared ones)
            if dist.is_available() and dist.is_initialized():
                every = [None] * dist.get_world_size()
                dist.all_gather_object(every, sums)
                sums = {k: v for d in every for k, v in d.items()}
            lost = broadcast(self.fence() if self.rank == 0 and self.fence else None)  # also the barrier
            if lost:
                raise RuntimeError(f"not committing {folder}: {lost}; another process may be writing {self.root}")
            if self.rank == 0:
                missing = [r for r in range(self.world_size) if not (folder / f"rank_{r:05d}.pt").exists()]
                if missing:
                    raise RuntimeError(f"checkpoint {folder} lacks the files of ranks {missing}; not committed")
                files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMMIT)
                names = [str(f.relative_to(folder)) for f in files]
                unhashed = [n for n in names if n not in sums]
                if unhashed:  # a file no rank claimed (a shared filesystem's late arrival): rank 0 hashes it
                    sums.update({n: digest(folder / n) for n in unhashed})
                for d in {f.parent for f in files} | {folder}:
                    _fsync(d)
                _atomic_write(folder / COMMIT, json.dumps({
                    "step": step_of(folder), "world_size": self.world_size, "time": time.time(),
                    "healthy": bool(healthy), "finite": bool(finite),
                    "files": {n: f.stat().st_size for n, f in zip(names, files)},
                    "sha256": {n: sums[n] for n in names}}))
                _fsync(folder)
                _fsync(self.root)
        if self.rank == 0:
            self.prune()
            self._point_latest()
        _barrier()
        return folder

    def prune(self) -> None:
        found = list_checkpoints(self.root)
        keep = set(found[-self.cfg.keep_last:]) | set(healthy_checkpoints(self.root)[-1:])  # somewhere to roll back to
        if self.cfg.keep_every:
            keep |= {p for p in found if step_of(p) % self.cfg.keep_every == 0}
        for p in found:
            if p not in keep:
                _remove_with_companions(p)

    # ---- rolling back -------------------------------------------------------------------------
    def rollback_target(self) -> Optional[Path]:
        """The newest healthy checkpoint this world size wrote whose content is intact (rank 0 decides, everyone
        agrees)."""
        target = None
        if self.rank == 0:
            for p in reversed(healthy_checkpoints(self.root, self.world_size)):
                why = invalid(p, content=True)
                if why is None:
                    target = str(p)
                    break
                _log(f"WARNING: not rolling back to {p.name}: {why}")
        target = broadcast(target)
        return Path(target) if target else None

    def discard_after(self, folder: Path) -> None:
        """Remove every checkpoint newer than `folder` (written after the run went bad) and point `latest` at it."""
        if self.rank == 0:
            step = step_of(folder)
            for p in self.root.iterdir():
                if p.is_dir() and (step_of(p) or -1) > step:
                    _remove_with_companions(p)
            self._point_latest()
        _barrier()

    def write_trainer_state(self, folder: Path, state: dict) -> None:
        """Rank 0 records trainer state that belongs to a committed `folder` but came later (after a rollback to it:
        the guard's rollbacks and remedies) beside it, in step_N.rollback.json keyed to its commit; the committed
        trainer.json is never rewritten. A write that fails (a full disk) is a warning: the rollback goes on."""
        if self.rank == 0:
            side = Path(folder).with_name(Path(folder).name + ROLLBACK)
            try:
                write_if_changed(side, json.dumps({"commit": commit_key(folder), "state": state}, indent=1,
                                                  default=str))
            except OSError as e:
                _log(f"WARNING: could not write {side} ({e.strerror or e}): a relaunch before the next commit "
                     f"resumes at {Path(folder).name} without this rollback's remedies")

    # ---- loading ------------------------------------------------------------------------------
    @staticmethod
    def read_trainer_state(folder: Path) -> dict:
        """trainer.json, or the state recorded beside the step after a rollback to it (if it is keyed to this
        very commit of the folder)."""
        folder = Path(folder)
        state = read_json(folder / "trainer.json")
        try:
            side = read_json(folder.with_name(folder.name + ROLLBACK))
            if isinstance(side, dict) and side.get("commit") == commit_key(folder) and isinstance(side.get("state"), dict) \
                    and side["state"].get("world_size") == state.get("world_size"):  # a rollback keeps the world
                return side["state"]
        except (OSError, ValueError):
            pass
        return state

    @staticmethod
    def rank_files(folder: Path, state: dict) -> list[Path]:
        """The per-rank files of the ranks that wrote `folder` (those COMMITTED checked), not any rank_*.pt there."""
        return [Path(folder) / f"rank_{r:05d}.pt" for r in range(int(state["world_size"]))]


def _log(msg: str) -> None:
    (log.warning if msg.startswith("WARNING") else log.info)(msg)


def restore(trainer, folder: Path, load_dir: Optional[Path] = None, data_and_rng: bool = True) -> None:
    """Load `trainer.components()` from `folder` and the engine from `load_dir` (default `folder`; a universal
    checkpoint for a new world size). `data_and_rng=False` (a guard rollback): the stream moves on past the
    batches that went bad and the caller reseeds."""
    folder, load_dir = Path(folder), Path(load_dir or folder)
    rank, world_size = trainer.rank, trainer.world_size
    state = Checkpointer.read_trainer_state(folder)
    with safe_torch_load():
        trainer.engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_lr_scheduler_states=False)
    parts = trainer.components()
    for name, (part, where) in parts.items():
        if where == "shared" and (name == "trainer" or name in state):
            part.load_state_dict(state if name == "trainer" else state[name])
    wanted = [n for n, (_, where) in parts.items() if where == "rank" and (data_and_rng or n == "buffer")]
    files = Checkpointer.rank_files(folder, state)
    buffer = parts["buffer"][0]
    if state["world_size"] == world_size:
        mine = load(files[rank], map_location="cpu", mmap=True)
        for name in wanted:
            if name in mine:  # a part switched on at this resume (the ICD bank) starts empty
                parts[name][0].load_state_dict(mine[name])
        icd = parts.get("icd", (None,))[0]
        _log(f"rank {rank}: {'resumed' if data_and_rng else 'rolled back to'} step {trainer.step} from {folder}; "
             f"buffer {len(buffer)} samples sha {fingerprint(buffer.state_dict())}; rng sha {fingerprint(mine['rng'])}"
             + (f"; icd sha {fingerprint(icd.state_dict())}" if icd is not None else ""))
        return
    shards = [load(f, map_location="cpu", mmap=True) for f in files]
    share, dropped = reshard([s["buffer"] for s in shards], world_size, rank, buffer.capacity)
    buffer.load_state_dict(share)
    if "icd" in parts and all("icd" in s for s in shards):
        parts["icd"][0].load_resharded([s["icd"] for s in shards], world_size, rank)
    if data_and_rng:
        parts["stream"][0].load_state_dict(shards[0]["stream"])
    torch.manual_seed(trainer.cfg.run.seed + 7919 * rank + trainer.step)
    if os.environ.get("EBMSCALE_DUMP_BUFFER_ON_RESUME"):  # lets a drill verify that no sample was lost
        dump = Path(os.environ["EBMSCALE_DUMP_BUFFER_ON_RESUME"])
        dump.mkdir(parents=True, exist_ok=True)
        torch.save(buffer.state_dict(), dump / f"rank_{rank}.pt")
    note = f"; {dropped} oldest samples did not fit buffer.capacity" if dropped else ""
    _log(f"rank {rank}: resumed step {trainer.step} from {folder} written by {state['world_size']} ranks on "
         f"{world_size}: buffer re-sharded ({len(buffer)} samples here{note}), optimizer via universal checkpoint")
