"""One MLflow run per training run, across any number of SLURM requeues, and never a reason to stop training.

Rank 0 gets an `MlflowTracker`, every other rank a `NullTracker` with the same methods. A tracker call only
appends to the local spool (spool.py) and returns; one background thread sends the spool in order. When
the store does not answer, the thread warns once, retries at most every `tracking.retry_s` seconds and sends
the backlog when it is back. `finish()` waits up to `tracking.flush_timeout_s` for it (main passes 5 s for a
preemption: the grace time is for the checkpoint); what is still unsent is sent by the next tracker opened on
the same run_dir, or by `python -m ebmscale.tracking RUN_DIR [--uri STORE]` (the store named by you, not by the folder). If the store is down at `start()` the run is
created when it is back.

Status. FINISHED when training completed; FAILED when it raised (a crashed peer rank shows on rank 0 as a
failed collective); KILLED when it stopped early on a signal (preemption, scancel, Ctrl-C, torchrun's SIGTERM
after another rank died): a relaunch on the same run_dir sets it RUNNING again. RUNNING therefore means a
launch is alive, except after a SIGKILL of rank 0 itself (OOM killer, node loss), which leaves RUNNING until
the next launch. If a stop was requested (stop.py's flag, set by the signal handlers) and the process has neither
finished, closed the tracker, logged anything (a checkpoint counts) nor beaten its heartbeat (train/heartbeat.py) for
its patience (`killed_after_s`, 15 s, or 1.5 x the trainer's own step time if longer), e.g. because it hangs in a collective with a
dead peer (NCCL does not fail those, gloo does), the tracker marks the run KILLED itself before torchrun's
SIGKILL (30 s after its SIGTERM).

Stores. `tracking.uri: null` means `sqlite:///<run_dir.parent>/mlflow.db` with artifacts in
<run_dir.parent>/mlartifacts: right for a few runs on a local disk (MLflow 3 has no file store). Many
concurrent runs on a shared filesystem (NFS, Lustre, GPFS: SQLite locking there is unreliable and slow) should
share a tracking server instead, `tracking.uri: http://host:port`, started once with
`mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:///<local disk>/mlflow.db (or postgresql://...)
--artifacts-destination <dir>`; only the server then touches the database.

Resuming. The run id is kept in run_dir/tracking.json and in the checkpoint (`state_dict()`); a new launch
continues that run, increments its `restart_count` tag and logs its config as restarts/<n>/config.yaml.
Metric steps at or below the last step already logged for a key are dropped (checked against the spool's
record and the server's latest steps), so a run that goes back to its last checkpoint never logs a step twice.
(The history keeps the first values of a replayed step, also after a stability-guard rollback.)

System metrics (`tracking.system_metrics`) are not sampled here: the trainer gathers them from every node at
its log steps (system.py) and logs them as ordinary metrics.
"""
import functools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from PIL import Image

from ebmscale.log import get_logger
from ebmscale.tracking.spool import Spool, SpoolFull, _write_atomic
from ebmscale.train import stop
from ebmscale.train.heartbeat import stale
from ebmscale.trust import Untrusted, local_store, read_json, redact, redact_text, spool_record

log = get_logger(__name__)

PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
             "BAD_REQUEST"}  # the store answered and said no: retrying would not help, so the record is dropped
MAX_BATCH = 1000  # MLflow's log_batch limit on metrics (params and tags: 100)
KILLED_AFTER_S = 15.0  # see "Status" above; under torchrun's 30 s from SIGTERM to SIGKILL


# MLflow 3 keeps an experiment's kind in this tag: "custom_model_development" is its "Model training" view (the
# other kinds are GenAI ones). MLflow 3.17's UI decides by its own workflow switch instead (the "GenAI / Model
# training" toggle, remembered by the browser, or ?workflowType=machine_learning in the page's address).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _warn(msg: str) -> None:
    log.warning(f"[tracking] {msg}")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _permanent(e: Exception) -> bool:
    from mlflow.exceptions import MlflowException
    if isinstance(e, MlflowException):
        return e.error_code in PERMANENT
    return isinstance(e, (ValueError, TypeError, KeyError, FileNotFoundError))


def _safe(fn):
    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # tracking never stops training
            if (fn.__name__, type(e)) not in self._failures:  # once, not every step
                self._failures.add((fn.__name__, type(e)))
                _warn(f"{fn.__name__} failed and was skipped (said once): {e!r}")
    return call


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db')}"


class NullTracker:
    """What ranks > 0 (and tracking.enabled: false) get."""
    run_id = None
    tracking_uri = ""

    def start(self, params, config_yaml_path, tags): pass
    def log_metrics(self, metrics, step): pass
    def log_image(self, key, image, step): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_text(self, text, artifact_file): pass
    def set_tags(self, tags): pass
    def record_checkpoint(self, path, step): pass
    def flush(self, timeout_s=None): return True
    def close(self, timeout_s=5.0): pass
    def finish(self, status="FINISHED", timeout_s=None, reason=None): pass
    def state_dict(self): return {"run_id": None, "tracking_uri": None}
    def describe(self): return "MLflow off (tracking.enabled=false)"


class MlflowTracker:
    def __init__(self, cfg, run_dir: Path, run_id: Optional[str], run_name: str):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # we retry ourselves, from the spool
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow  # noqa: F401  (slow; only rank 0 pays, here rather than in the sender thread)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database
        # tables...", "Updating database tables": a new sqlite store's first open, nothing for the user to do
        self.cfg, self.run_dir, self.run_name = cfg, Path(run_dir), run_name
        self.tracking_uri = cfg.uri or default_uri(self.run_dir)
        saved = self._load()
        spool_dir = self.run_dir / "tracking_spool"
        self._copied_from = None
        if saved.get("run_dir") not in (None, str(self.run_dir.resolve())):  # its checkpoints' run id is the original's
            _warn(f"{self.run_dir} was copied or moved from {saved['run_dir']}: a new MLflow run (tag copied_from="
                  f"{saved.get('run_id')}), so the original's run is neither continued nor reopened")
            self._copied_from, saved, run_id = saved.get("run_id"), {}, None
        if saved.get("tracking_uri") not in (None, self.tracking_uri):
            _warn(f"{self.run_dir}/tracking.json is for {saved['tracking_uri']}, now {self.tracking_uri}: new run")
            saved = {}
        if run_id and saved.get("run_id") not in (None, run_id):
            _warn(f"checkpoint run id {run_id} != tracking.json's {saved['run_id']}; continuing {run_id}")
            saved = {}
        if not saved and spool_dir.exists():  # start() writes tracking.json before it spools anything
            _warn(f"{spool_dir} belongs to another run or store; moved aside")
            spool_dir.rename(spool_dir.with_name(f"tracking_spool.orphaned-{int(time.time())}"))
        self._run_id = run_id or saved.get("run_id")
        self.spool = Spool(spool_dir, int(getattr(cfg, "spool_max_mb", 0) or 0) << 20)
        self.steps: Dict[str, int] = self.spool.state.setdefault("steps", {})  # last step enqueued, per key
        self._dropped = 0
        for _, r in self.spool.records(start=0):
            if not self._valid(r, warn=False):
                continue
            for k in list(r.get("m", ())) + ([f"image:{r['key']}"] if r.get("op") == "image" else []):
                self.steps[k] = max(self.steps.get(k, -1), r["step"])
        self._server_steps: Dict[str, int] = {}  # the run's latest steps as the store had them when (re)opened
        self._wake, self._stop, self._closed = threading.Event(), threading.Event(), threading.Event()
        self.killed_after_s = KILLED_AFTER_S
        self._last_put = 0.0  # monotonic time of the last record: activity the stop watchdog sees
        self.heartbeat = None  # the trainer's (train/heartbeat.py), set by main: the watchdog judges by its pace
        self._thread = self._client = None
        self._started, self._failures = False, set()
        self._down = False
        self._id_lock, self._described = threading.Lock(), False  # the start line said the id, or that it follows
        self._retry_at, self._sent, self._dropped = 0.0, 0, 0

    @property
    def run_id(self) -> Optional[str]:
        return self._run_id

    def state_dict(self) -> dict:
        return {"run_id": self._run_id, "tracking_uri": self.tracking_uri}

    def describe(self) -> str:
        """For the start line: the run id, or that it follows (logged by the sender once the store made the run)."""
        with self._id_lock:
            self._described = self._run_id or True
            if self._run_id:
                return f"MLflow run {self._run_id} at {self.tracking_uri}"
            return f"MLflow run: opening at {self.tracking_uri} (its id follows when the store answers)"

    # --- the training side: append to the spool, never touch the network

    def _put(self, record: dict) -> None:
        if not self._started and self._run_id is None:
            raise RuntimeError("call start() first")  # else the record would wait forever for a run
        self.spool.append(record)
        self._last_put = time.monotonic()
        self._wake.set()

    @_safe
    def start(self, params: dict, config_yaml_path: Path, tags: dict) -> None:
        """Params, tags and the config artifact go out with their secrets masked (trust.redact): passwords in
        URIs, presigned URLs' signatures, tokens in launcher.setup lines."""
        self._save()
        self._started = True
        config = None
        if config_yaml_path and Path(config_yaml_path).exists():
            path = self.spool.new_file(Path(config_yaml_path).name)
            path.write_text(redact_text(Path(config_yaml_path).read_text()))
            try:
                self.spool.admit(path)
                config = str(path.relative_to(self.spool.root))
            except SpoolFull as e:
                self._drop(f"artifact {e}")
        self._put({"op": "start", "run_name": self.run_name, "ts": _now_ms(),
                   "params": {k: str(v)[:6000] for k, v in redact(params).items()},
                   "tags": {k: str(v)[:8000] for k, v in redact({**tags, **({"copied_from": self._copied_from}
                                                                           if self._copied_from else {})}).items()},
                   **({"file": config} if config else {})})
        self._start_sender()
        self._closed.clear()
        deadline = time.monotonic() + 3.0  # a moment for the run id (the launch log prints it), never more
        while self._run_id is None and not self._down and time.monotonic() < deadline:
            time.sleep(0.02)
        threading.Thread(target=self._watchdog, daemon=True, name="tracking-watchdog").start()

    @_safe
    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        step = int(step)
        with self.spool.lock:
            m = {k: float(v) for k, v in metrics.items() if self._fresh(k, step)}
            if m:
                self._put({"op": "metrics", "m": m, "step": step, "ts": _now_ms()})

    def _fresh(self, key: str, step: int) -> bool:
        """True (and remembered) if `step` is past the last one logged for `key`."""
        with self.spool.lock:
            if step <= self.steps.get(key, -1):
                return False
            self.steps[key] = step
            return True

    @_safe
    def log_image(self, key: str, image, step: int) -> None:
        image = np.asarray(image)
        if not self._fresh(f"image:{key}", int(step)):
            return
        path = self.spool.new_file("image.png")
        Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(path)
        try:
            self.spool.admit(path)
        except SpoolFull as e:
            return self._drop(f"image {key} step {step}: {e}")
        self._put({"op": "image", "key": key, "step": int(step), "ts": _now_ms(),
                   "file": str(path.relative_to(self.spool.root))})

    @_safe
    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        rel = self._stash(path)
        if rel:
            self._put({"op": "artifact", "file": rel, "artifact_path": artifact_path})

    def _stash(self, path) -> Optional[str]:
        try:
            return self.spool.stash(path)
        except SpoolFull as e:
            return self._drop(f"artifact {e}")

    def _drop(self, what: str) -> None:
        """The spool is at tracking.spool_max_mb: an image or artifact is dropped (metrics and tags never are)."""
        self._dropped_files = getattr(self, "_dropped_files", 0) + 1
        if self._dropped_files == 1 or self._dropped_files % 100 == 0:
            _warn(f"tracking spool {self.spool.root} is at its cap tracking.spool_max_mb="
                  f"{self.spool.max_bytes >> 20} while {self.tracking_uri} does not take the backlog: dropped "
                  f"{what} ({self._dropped_files} so far). Metrics and tags are still kept; images and artifacts "
                  f"are dropped until the backlog is sent (raise tracking.spool_max_mb, or bring the store back)")
        return None

    @_safe
    def log_text(self, text: str, artifact_file: str) -> None:
        self._put({"op": "text", "text": text, "artifact_file": artifact_file})

    @_safe
    def set_tags(self, tags: dict) -> None:
        self._put({"op": "tags", "tags": {k: str(v)[:8000] for k, v in tags.items()}})

    @_safe
    def record_checkpoint(self, path: Path, step: int) -> None:
        """Called once the checkpoint is committed (trainer.commit), never for a save still in flight."""
        self.set_tags({"checkpoint.latest": str(Path(path).resolve()), "checkpoint.latest_step": int(step)})
        self.log_metrics({"checkpoint.step": step}, step)
        if self.cfg.upload_checkpoints:
            self.log_artifact(path, "checkpoints")

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait until the spool is sent (retrying every second meanwhile); False if it is not after timeout_s."""
        self._start_sender()
        deadline = time.monotonic() + (self.cfg.flush_timeout_s if timeout_s is None else timeout_s)
        while self.spool.pending() and time.monotonic() < deadline:
            self._retry_at = min(self._retry_at, time.monotonic() + 1.0)
            self._wake.set()
            time.sleep(0.05)
        return not self.spool.pending()

    @_safe
    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is spooled (up to timeout_s) and stop; the run's status stays as it is (finish() sets it).
        Short by default: the preemption grace time is for the checkpoint, and the next launch sends the rest."""
        self._closed.set()
        if not self.flush(timeout_s):
            _warn(f"{self.spool.pending()} bytes of tracking records unsent, kept in {self.spool.root}; the next "
                  f"launch sends them, or: python -m ebmscale.tracking {self.run_dir}"
                  f"{'' if self.tracking_uri == local_store(self.run_dir) else ' --uri ' + self.tracking_uri}")
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=1.0)
        self.spool.compact()

    @_safe
    def finish(self, status: str = "FINISHED", timeout_s: Optional[float] = None, reason: Optional[str] = None) -> None:
        """This launch ended: FINISHED, FAILED or KILLED (preempted: a relaunch sets it RUNNING again). Waits up
        to timeout_s (default tracking.flush_timeout_s) for the backlog. `reason` goes into the `end_reason` tag."""
        assert status in ("FINISHED", "FAILED", "KILLED"), status
        self._closed.set()
        self.set_tags({"end_reason": reason or {"FINISHED": "completed", "FAILED": "failed: see the log",
                                                "KILLED": "killed"}[status]})
        self._put({"op": "end", "status": status, "ts": _now_ms()})
        self.close(self.cfg.flush_timeout_s if timeout_s is None else timeout_s)

    def _watchdog(self) -> None:
        """KILLED if a stop was requested and the trainer then neither ended, logged anything (a checkpoint saved
        counts) nor beat its heartbeat for its patience (killed_after_s, or 1.5 x its step time if longer). If it
        was only slow, its finish() sets the final status anyway."""
        while not self._closed.wait(0.5):
            if stop.stop_requested():
                quiet_since, hb = time.monotonic(), self.heartbeat
                while not self._closed.wait(0.5):
                    quiet_since = max(quiet_since, self._last_put, hb.last if hb else 0.0)
                    patience = hb.patience(self.killed_after_s) if hb else self.killed_after_s
                    if time.monotonic() - quiet_since > patience:
                        break
                else:
                    return
                where = "; ".join(stale(self.run_dir, patience)) or "a dead peer rank?"
                _warn(f"stop requested ({stop.stop_reason() or 'by a peer'}) and nothing from the trainer for "
                      f"{patience:g}s: marking run {self._run_id} KILLED before a SIGKILL can come ({where})")
                with self.spool.lock:
                    self._put({"op": "tags", "tags": {"end_reason": f"no progress {patience:g}s after a "
                                                                    f"stop request ({stop.stop_reason()}); {where}"}})
                    self._put({"op": "end", "status": "KILLED", "ts": _now_ms()})
                return

    # --- the sender thread

    def _start_sender(self) -> None:
        self._stop.clear()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True, name="tracking-sender")
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(max(0.0, self._retry_at - time.monotonic()) if self._down else None)
            self._wake.clear()
            if self._down and time.monotonic() < self._retry_at:
                continue
            try:
                self._drain()
            except Exception as e:
                if not self._down:
                    _warn(f"{self.tracking_uri} unreachable; training goes on, spooling to {self.spool.root} and "
                          f"retrying every {self.cfg.retry_s:g}s. ({type(e).__name__}: {str(e)[:200]})")
                self._down, self._sent = True, 0
                self._retry_at = time.monotonic() + self.cfg.retry_s
                continue
            if self._down:
                _warn(f"{self.tracking_uri} is back; sent {self._sent} spooled records")
            self._down = False

    def _valid(self, r: dict, warn: bool = True) -> bool:
        """trust.spool_record: a record this tracker could have written; else refused by name and dropped (a
        received run folder's spool may hold anything; nothing outside tracking_spool/files is read or removed)."""
        try:
            spool_record(self.spool.root, r)
            return True
        except Untrusted as e:
            if r and warn:  # an empty {} is a torn line, already the spool's to skip
                self._dropped += 1
                _warn(f"{e}; record dropped, not sent")
            return False

    def _drain(self) -> None:
        while batch := self.spool.records(limit=256):
            last, batch = batch[-1][0], [(end, r) for end, r in batch if self._valid(r)]
            i = 0
            while i < len(batch):  # consecutive metrics records go as one log_batch
                j, n = i + 1, len(batch[i][1].get("m", ()))
                while (batch[i][1].get("op") == "metrics" and j < len(batch) and batch[j][1].get("op") == "metrics"
                       and n + len(batch[j][1]["m"]) <= MAX_BATCH):
                    n, j = n + len(batch[j][1]["m"]), j + 1
                records = [r for _, r in batch[i:j]]
                try:
                    self._send(records)
                except Exception as e:
                    if not _permanent(e):
                        raise
                    self._dropped += 1
                    if self._dropped <= 10 or self._dropped % 100 == 0:
                        _warn(f"store rejected {records[0].get('op')} record (dropped #{self._dropped}): {e}")
                for r in records:
                    if "file" in r:
                        self.spool.discard(r["file"])
                self.spool.ack(batch[j - 1][0])
                self._sent += len(records)
                i = j
            if self.spool.cursor < last:  # refused records at the end of the stretch
                self.spool.ack(last)

    def _send(self, records: list) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient
        c = self._client = self._client or MlflowClient(self.tracking_uri)
        r, op = records[0], records[0].get("op")
        if op == "start":
            return self._open_run(c, r)
        if self._run_id is None:
            raise RuntimeError("no run yet")  # a spool whose start record went missing; keep it and retry
        if op == "metrics":
            ms = [Metric(k, v, q["ts"], q["step"]) for q in records for k, v in q["m"].items()
                  if q["step"] > self._server_steps.get(k, -1)]
            for i in range(0, len(ms), MAX_BATCH):
                c.log_batch(self._run_id, metrics=ms[i:i + MAX_BATCH])
        elif op == "tags":
            tags = [RunTag(k, v) for k, v in r["tags"].items()]
            for i in range(0, len(tags), 100):
                c.log_batch(self._run_id, tags=tags[i:i + 100])
        elif op == "image":
            with Image.open(self.spool.file(r["file"])) as im:
                c.log_image(self._run_id, im.convert("RGB"), key=r["key"], step=r["step"], timestamp=r["ts"])
        elif op == "artifact":
            path = self.spool.file(r["file"])
            if path.is_dir():
                dest = f"{r['artifact_path']}/{path.name}" if r["artifact_path"] else path.name
                c.log_artifacts(self._run_id, str(path), dest)
            else:
                c.log_artifact(self._run_id, str(path), r["artifact_path"])
        elif op == "text":
            c.log_text(self._run_id, r["text"], r["artifact_file"])
        elif op == "end":
            c.set_terminated(self._run_id, r["status"], end_time=r["ts"])
        else:
            raise ValueError(f"unknown spool record {r}")

    def _open_run(self, c, r: dict) -> None:
        """Create the run, or continue it; safe to repeat after a failure part-way (restart_count is set last)."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        run = None
        if self._run_id:
            try:
                run = c.get_run(self._run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                _warn(f"run {self._run_id} is not in {self.tracking_uri}; starting a new run")
        if run is None:
            run = c.create_run(self._experiment_id(c), start_time=r["ts"], run_name=r["run_name"])
            with self._id_lock:
                self._run_id, old, restarts = run.info.run_id, {}, 0
                said = self._described not in (False, self._run_id)  # the start line said "opening" or another id
            self._save()
            if said:
                log.info(f"MLflow run {self._run_id} at {self.tracking_uri}")
        else:
            if run.info.status != "RUNNING":
                c.update_run(self._run_id, status="RUNNING")
            if "end_reason" in run.data.tags:  # the previous launch's
                c.delete_tag(self._run_id, "end_reason")
            old, restarts = run.data.params, int(run.data.tags.get("restart_count", -1)) + 1
        self._server_steps = self._latest_steps(c, run)
        changed = sorted(k for k, v in r["params"].items() if k in old and old[k] != v)
        if changed:
            _warn(f"params changed on resume, MLflow keeps the first values (see restarts/{restarts}/config.yaml): "
                  f"{', '.join(changed)}")
        params = [Param(k, v) for k, v in r["params"].items() if k not in old]
        tags = [RunTag(k, v) for k, v in r["tags"].items()]
        for i in range(0, max(len(params), len(tags)), 100):
            c.log_batch(self._run_id, params=params[i:i + 100], tags=tags[i:i + 100])
        if r.get("file"):
            c.log_artifact(self._run_id, str(self.spool.file(r["file"])), f"restarts/{restarts}" if restarts else None)
        c.set_tag(self._run_id, "restart_count", str(restarts))

    @staticmethod
    def _latest_steps(c, run) -> Dict[str, int]:
        """The newest step the server holds for each metric of `run`. run.data._metric_objs (private; MLflow 3.17)
        has them in one call; without it, one public get_metric_history call per metric key."""
        objs = getattr(run.data, "_metric_objs", None)
        if objs is not None:
            return {m.key: m.step for m in objs}
        return {k: max((m.step for m in c.get_metric_history(run.info.run_id, k)), default=0) for k in run.data.metrics}

    def _experiment_id(self, c) -> str:
        from mlflow.exceptions import MlflowException
        exp = c.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                c.restore_experiment(exp.experiment_id)
            if EXPERIMENT_KIND[0] not in exp.tags:  # made by an older ebmscale, or by hand: say what it holds
                c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return exp.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:///"):  # else artifacts would land in ./mlruns of the cwd
            location = (Path(self.tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        try:
            return c.create_experiment(self.cfg.experiment, artifact_location=location,
                                       tags=dict([EXPERIMENT_KIND]))
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another run created it first
                raise
            return c.get_experiment_by_name(self.cfg.experiment).experiment_id

    # --- run_dir/tracking.json

    def _load(self) -> dict:
        path = self.run_dir / "tracking.json"
        return read_json(path, root=self.run_dir) if path.exists() else {}

    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.run_dir / "tracking.json",  # never through a link planted as tracking.json.tmp
                      json.dumps({"run_id": self._run_id, "tracking_uri": self.tracking_uri,
                                  "experiment": self.cfg.experiment, "run_dir": str(self.run_dir.resolve())},
                                 indent=1) + "\n")


def build_tracker(cfg, run_dir: Path, rank: int, run_id: Optional[str] = None, run_name_default: str = "ebm"):
    """cfg is the `tracking` config section; run_id comes from the checkpoint's `state_dict()` when resuming."""
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    try:
        return MlflowTracker(cfg, run_dir, run_id, cfg.run_name or run_name_default)
    except Exception as e:
        _warn(f"tracking off for this launch, could not set it up: {e!r}")
        return NullTracker()

