"""One door for files someone else may have written (the trust model, docs/security.md).

ebmscale trusts its code, the command line and the config files the user names. Everything else is data, even
inside a folder the user names: a run folder (its config.yaml, tracking.json, tracking_spool/), an exported model
(config.json), a samples .npz, a shard, a manifest. Every reader of such a file comes through here, and:
  - a path taken from a file stays in its folder: relative, no `..`, and after resolving symlinks still inside;
  - no command, URL scheme, pickle or `allow_*` / `trust_*` switch is taken from a file: `run_config` turns them
    off, and a run folder's pipe:/URL shard spec must be repeated on the command line to be read;
  - sizes are capped before anything is read into memory (JSON/YAML bytes, npz members against a zip bomb);
  - credentials go only to a store the user named (`tracking_target`);
  - secrets are redacted wherever config is logged, exported or carded (`redact`).
An `Untrusted` error names the file, what was refused and how to proceed. This module imports nothing of
ebmscale above config.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from ebmscale.config import ConfigError, from_yaml_file

MAX_JSON = 1 << 20  # tracking.json, config.json, trainer.json, manifest.json: a few KB in practice
MAX_YAML = 1 << 20  # a run folder's config.yaml
NPZ_RATIO = 20  # an .npz whose members unpack to more than this x its size (+ 1 MiB) is a zip bomb
SPOOL_FILE = re.compile(r"files/[0-9a-f]{12}/[^/\\]+")  # what Spool.new_file writes, and nothing else
TRUST_SWITCHES = ("data.allow_pipe", "data.allow_pickle", "checkpoint.trust_pickles")


class Untrusted(ValueError):
    """A file someone else may have written asks for something the trust model refuses; the message says what."""


# ---- paths ----------------------------------------------------------------------------------------------------
def inside(root: str | Path, rel: str | Path, what: str = "path") -> Path:
    """`rel` (read from a file) as a path under `root`: relative, no `..`, and still under root once symlinks are
    resolved. Untrusted otherwise."""
    rel_s = str(rel)
    parts = Path(rel_s).parts
    if not rel_s or Path(rel_s).is_absolute() or rel_s.startswith(("/", "\\")) or ".." in parts or "\0" in rel_s:
        raise Untrusted(f"{what} '{rel_s}' is not a plain relative path inside {root}: refused")
    return confined(Path(root) / rel_s, root, what)


def confined(path: str | Path, root: str | Path, what: str = "file") -> Path:
    """`path` resolved (symlinks followed) must lie under `root` resolved; returns the resolved path."""
    real, base = Path(path).resolve(), Path(root).resolve()
    if real != base and base not in real.parents:
        raise Untrusted(f"{what} {path} resolves to {real}, outside {base}: refused (a symlink or path out of the "
                        f"folder; copy the file in if you mean to use it)")
    return real


def read_bytes(path: str | Path, max_bytes: int, root: Optional[str | Path] = None) -> bytes:
    """At most max_bytes of a regular file (Untrusted if bigger, not a file, or outside root)."""
    real = confined(path, root) if root is not None else Path(path)
    with os.fdopen(os.open(real, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:  # a FIFO must not block the open
        st = os.fstat(f.fileno())
        if not (st.st_mode & 0o170000 == 0o100000):
            raise Untrusted(f"{path} is not a regular file: refused")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Untrusted(f"{path} is over {max_bytes:,} bytes: refused (not what ebmscale writes there)")
    return data


def read_json(path: str | Path, max_bytes: int = MAX_JSON, root: Optional[str | Path] = None) -> dict:
    """A JSON object from a file someone else may have written; Untrusted if it is not one."""
    try:
        d = json.loads(read_bytes(path, max_bytes, root))
    except (ValueError, UnicodeDecodeError) as e:
        raise Untrusted(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise Untrusted(f"{path} holds a JSON {type(d).__name__}, not an object")
    return d


# ---- run folders ----------------------------------------------------------------------------------------------
def _interpolated(obj: Any, key: str = "") -> list[str]:
    """The keys of `obj` (a raw, unresolved container) whose string holds an interpolation (`${...}`)."""
    if isinstance(obj, str):
        return [key or "(top)"] if "${" in obj else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    return [k for i, v in items for k in _interpolated(v, f"{key}.{i}" if key else str(i))]


def _no_interpolation(path: Path, data: bytes) -> None:
    """A run folder's config.yaml is written resolved (config.to_yaml): an interpolation in it (`${oc.env:...}`,
    `${oc.decode:...}`, a reference) was put there by hand and would be resolved in the reader's process, e.g.
    putting the reader's environment variables (tokens) into the config that tools show, log and export."""
    try:
        raw = OmegaConf.to_container(OmegaConf.create(data.decode("utf-8")), resolve=False)
    except Exception as e:  # noqa: BLE001 - any parse failure of a file someone else wrote
        raise Untrusted(f"{path} is not a YAML mapping ebmscale wrote: {e}") from None
    bad = _interpolated(raw)
    if bad:
        raise Untrusted(f"{path}: {', '.join(bad[:5])} hold(s) an interpolation (${{...}}); a run folder's config is "
                        f"written resolved, and one there would be resolved with your environment: refused")


def run_config(run: str | Path):
    """A run folder's config.yaml as data: size-capped, inside the folder, validated, and with every trust switch
    (data.allow_pipe, data.allow_pickle, checkpoint.trust_pickles) off and launcher.setup emptied: those come
    from the command line of the tool reading it, never from the folder."""
    path = Path(run) / "config.yaml"
    _no_interpolation(path, read_bytes(path, MAX_YAML, run))
    cfg = from_yaml_file(confined(path, run, "config.yaml"))
    for key in TRUST_SWITCHES:
        OmegaConf.update(cfg, key, False)
    cfg.launcher.setup = []
    return cfg


def has_scheme(spec: str) -> bool:
    """A pipe: or URL (scheme://) part in a data.shards spec, also once its braces are expanded as list_shards
    expands them (`{https:/,x}/host/s.tar` holds no '://' until then)."""
    import braceexpand

    def bad(u: str) -> bool:
        return u.strip().startswith("pipe:") or "://" in u
    parts = [p.strip() for p in str(spec).split("::")]
    return any(bad(p) or any(bad(u) for u in braceexpand.braceexpand(p)) for p in parts)


def run_shards(run: str | Path, cfg) -> str:
    """The data.shards of a run folder's config (run_config), if it names local files only; a pipe: command or
    URL there is refused: the user repeats it on the command line (--shards) to read it."""
    spec = cfg.data.shards
    if has_scheme(spec):
        raise Untrusted(f"{Path(run) / 'config.yaml'} names data.shards '{redact(spec)}', a pipe: command or URL; "
                        f"a run folder's config does not decide what runs or what is fetched: pass the shards on "
                        f"the command line (--shards ...) if you trust them")
    return spec


# ---- exported models ------------------------------------------------------------------------------------------
EXPORT_SECTIONS = ("model", "sampler", "recipe", "ebmscale")


def exported_config(folder: str | Path) -> dict:
    """config.json of an exported model: a size-capped JSON object; only the sections an export writes are
    returned (model and sampler as dicts, recipe a string); anything else in the file is not read."""
    path = Path(folder) / "config.json"
    meta = read_json(path, MAX_JSON, folder)
    out = {}
    for k in EXPORT_SECTIONS:
        if k not in meta:
            continue
        v = meta[k]
        ok = isinstance(v, str) if k == "recipe" else isinstance(v, dict)
        if not ok:
            raise Untrusted(f"{path}: '{k}' is a {type(v).__name__}, not what `ebmscale export` writes")
        out[k] = v
    if "model" not in out:
        raise Untrusted(f"{path} has no 'model' section: not an ebmscale export")
    bad = _interpolated(out)  # the sections are merged into an OmegaConf config, which would resolve ${oc.env:...}
    if bad:
        raise Untrusted(f"{path}: {', '.join(bad[:5])} hold(s) an interpolation (${{...}}); an export writes plain "
                        f"values, and one there would be resolved with your environment: refused")
    return out


# ---- samples (.npz) -------------------------------------------------------------------------------------------
def read_npz(path: str | Path, keys=("images", "labels", "run", "step")) -> dict:
    """The arrays `keys` of an .npz (tools/sample.py's output): no pickle (object arrays refused), no member that
    unpacks past NPZ_RATIO x the file size, the file a regular file (a symlink is followed, then checked as one)."""
    import numpy as np
    path = Path(path)
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:  # a FIFO must not block the open
        st = os.fstat(f.fileno())
        if not (st.st_mode & 0o170000 == 0o100000):
            raise Untrusted(f"{path} is not a regular file: refused")
        size = st.st_size
        try:
            with zipfile.ZipFile(f) as z:
                total = sum(i.file_size for i in z.infolist())
        except zipfile.BadZipFile as e:
            raise Untrusted(f"{path} is not an .npz: {e}") from None
        if total > NPZ_RATIO * size + (1 << 20):
            raise Untrusted(f"{path} unpacks to {total:,} bytes from {size:,}: refused (a zip bomb?)")
        f.seek(0)
        try:
            with np.load(f, allow_pickle=False) as d:  # the same open file that was checked
                return {k: d[k] for k in keys if k in d.files}
        except ValueError as e:
            raise Untrusted(f"{path}: {e} (object arrays need pickle, which ebmscale does not load from a "
                            f"file)") from None


# ---- tracking ---------------------------------------------------------------------------------------------------
def spool_file(spool_root: str | Path, rel: Any) -> Path:
    """The file a spool record names: exactly `files/<12 hex>/<name>` under the spool, nothing else."""
    if not isinstance(rel, str) or not SPOOL_FILE.fullmatch(rel) or rel.split("/")[-1] in (".", ".."):
        raise Untrusted(f"spool record names file {rel!r}, not one the spool wrote (files/<id>/<name>): refused")
    return inside(Path(spool_root), rel, "spool file")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str_dict(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _artifact_path(v) -> bool:
    return isinstance(v, str) and not v.startswith(("/", "\\")) and ".." not in re.split(r"[/\\]", v)


SPOOL_SHAPE = {  # op -> {field: check}; what MlflowTracker writes, nothing else is sent
    "start": {"run_name": lambda v: isinstance(v, str), "ts": _is_num, "params": _str_dict, "tags": _str_dict},
    "metrics": {"m": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_num(x) for k, x in v.items()),
                "step": lambda v: isinstance(v, int) and not isinstance(v, bool), "ts": _is_num},
    "tags": {"tags": _str_dict},
    "image": {"key": lambda v: isinstance(v, str), "step": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "ts": _is_num, "file": lambda v: True},
    "artifact": {"file": lambda v: True, "artifact_path": lambda v: v is None or _artifact_path(v)},
    "text": {"text": lambda v: isinstance(v, str), "artifact_file": _artifact_path},
    "end": {"status": lambda v: v in ("FINISHED", "FAILED", "KILLED"), "ts": _is_num},
}


def spool_record(spool_root: str | Path, record: Any) -> dict:
    """A record of tracking_spool/spool.jsonl checked before it is used: a known op with the fields of the right
    types, and a file (if any) that the spool itself wrote. Untrusted, naming the record, otherwise."""
    op = record.get("op") if isinstance(record, dict) else None
    shape = SPOOL_SHAPE.get(op) if isinstance(op, str) else None
    if shape is None:
        raise Untrusted(f"spool record {str(record)[:200]} has no known op ({', '.join(sorted(SPOOL_SHAPE))})")
    bad = [k for k, ok in shape.items() if k not in ("file", "artifact_path") and k not in record or
           k in record and not ok(record[k])]
    if bad:
        raise Untrusted(f"spool record {str(record)[:200]}: field(s) {', '.join(bad)} missing or malformed")
    if "file" in record or op in ("image", "artifact"):
        spool_file(spool_root, record.get("file"))
    return record


def local_store(run_dir: str | Path) -> str:
    """The default MLflow store of a run: a SQLite file beside its folder (no server, no credentials)."""
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def tracking_target(run_dir: str | Path, saved: dict, named: Optional[str]) -> str:
    """Where to send a run folder's tracking records: the store the user `named` (command line or
    MLFLOW_TRACKING_URI), which must be the one tracking.json records; with none named, only the run's own local
    SQLite store. A tracking.json never decides where credentials go."""
    uri = saved.get("tracking_uri")
    if not isinstance(uri, str):
        raise Untrusted(f"{Path(run_dir) / 'tracking.json'} names no tracking_uri")
    if named:
        if named != uri:
            raise Untrusted(f"{Path(run_dir) / 'tracking.json'} records store {redact(uri)}, you named "
                            f"{redact(named)}: its run id means nothing there. Name the recorded store to send to "
                            f"it (--uri / MLFLOW_TRACKING_URI), if you trust it")
        return named
    if uri != local_store(run_dir):
        raise Untrusted(f"{Path(run_dir) / 'tracking.json'} records store {redact(uri)}; a run folder does not "
                        f"decide where your MLflow credentials go: name it yourself (--uri {redact(uri)}, or "
                        f"MLFLOW_TRACKING_URI) if you trust it")
    return uri


# ---- secrets ----------------------------------------------------------------------------------------------------
SECRET_WORD = (r"(?:password|passwd|pwd|pass|secret|token|signature|sig|credentials?|api[_-]?key|access[_-]?key|"
               r"private[_-]?key|secret[_-]?key|auth|authorization)")
SECRET_NAME = rf"(?:[A-Za-z0-9]+[_-])*{SECRET_WORD}(?:[_-][A-Za-z0-9]+)*"  # a whole _/- separated word says secret
# the password runs to the last @ of the authority (an unencoded @ in it), not into the path, query or fragment
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?P<pw>:[^/?#\s]*)?@")
_QUERY = re.compile(rf"(?P<k>[?&;](?i:{SECRET_NAME}|X-Amz-[A-Za-z-]+|X-Goog-[A-Za-z-]+|key)=)[^&#\s'\"]*")
# a value: a whole quoted string (spaces and all), an auth scheme with its token (Bearer xyz), or one word
_VALUE = r"""(?:(?P<q>['"])(?:(?!(?P=q)).)*(?P=q)|(?i:(?:bearer|basic|digest|token)\s+)?['"]?[^\s'"&]+)"""
_ASSIGN = re.compile(rf"(?P<k>\b(?i:{SECRET_NAME})\s*[=:]\s*){_VALUE}")
_FLAG = re.compile(rf"(?P<k>--(?i:{SECRET_NAME})[ =]){_VALUE}")
MASK = "***"


def redact_text(s: str) -> str:
    """A string with the secrets in it masked: a URI's user:password@ (the user kept), query parameters that sign
    or authorize (X-Amz-*, X-Goog-*, sig, token, key, ...); a user@ with no password (a token) masked whole, NAME=value / --name value where NAME says
    password, secret, token, key, credential or auth."""
    s = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user'] + ':' if m['pw'] else ''}{MASK}@", s)  # no ':': a token
    s = _QUERY.sub(lambda m: f"{m['k']}{MASK}", s)
    s = _FLAG.sub(lambda m: f"{m['k']}{m['q'] or ''}{MASK}{m['q'] or ''}", s)
    return _ASSIGN.sub(lambda m: f"{m['k']}{m['q'] or ''}{MASK}{m['q'] or ''}", s)


def redact(obj: Any) -> Any:
    """`obj` (a str, or dicts/lists of them, e.g. a config container or MLflow params) with every string
    redact_text'ed and the value of every key that names a secret masked; other values as they are."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and re.fullmatch(SECRET_NAME, k.rsplit(".", 1)[-1], re.I)
                    and v not in (None, "", False) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def redacted_yaml(cfg) -> str:
    """A config as YAML with its secrets masked: what a log, an MLflow artifact or a model card shows."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True))))


__all__ = ["ConfigError", "Untrusted", "confined", "exported_config", "inside", "read_bytes", "read_json",
           "read_npz", "redact", "redact_text", "redacted_yaml", "run_config", "run_shards", "spool_file",
           "spool_record", "tracking_target"]
