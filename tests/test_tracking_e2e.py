"""The real trainer (2 DeepSpeed ranks over gloo, torchrun) tracked in MLflow, checked over HTTP the way a person
or the UI would: one run with its params, metric histories, pictures and chain GIFs; a tracking-server outage
mid-run; a crashed rank (FAILED), and a relaunch that continues the same run; the UI's own requests on the
store a finished run used."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow_server import MLFLOW, free_port, mlflow_server  # noqa: F401  (the fixture)

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow

# what every log step must carry (train.log_every=1 in TINY)
METRICS = ["batch/loss", "batch/e_pos", "batch/e_neg", "batch/energy_gap", "grad_norm", "lr", "images_per_s",
           "time/sample_s", "time/update_s", "time/data_s", "batch/langevin/energy_start", "batch/langevin/energy_end",
           "batch/langevin/grad_abs", "batch/langevin/step_change", "buffer/fresh_share", "buffer/mean_age",
           "buffer/fill", "data/bad_samples"]
PICTURES = ["negatives", "positives", "energy_histogram"]


def start_train(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2, env: dict | None = None):
    """`conftest.train` without waiting: returns (process, log path); stdout and stderr go to the log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ebmscale.train.main", str(ROOT / "configs" / "digits.yaml"), f"run.dir={run_dir}",
           f"data.shards={shards}/digits-{{000000..000003}}.tar", *TINY, *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.{int(time.time() * 1000)}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: pause or kill it whole
    return proc, log


def finish_train(proc, log: Path, timeout: float = 400, expect_rc=0) -> str:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"trainer did not end in {timeout}s:\n{log.read_text(errors='replace')[-6000:]}") from None
    text = log.read_text(errors="replace")
    if expect_rc is not None and (rc == 0) != (expect_rc == 0):
        raise AssertionError(f"trainer exit code {rc}:\n{text[-6000:]}")
    return text


def logged_steps(run_dir: Path) -> list:
    path = run_dir / "logs" / "metrics.jsonl"
    return [json.loads(l)["step"] for l in path.read_text().splitlines()] if path.exists() else []


def wait_for(cond, timeout: float, what: str, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-4000:] if log else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def get_run(base_url: str, run_id: str, api: str = "api") -> tuple:
    r = requests.get(f"{base_url}/{api}/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=10)
    r.raise_for_status()
    run = r.json()["run"]
    return (run["info"], {p["key"]: p["value"] for p in run["data"].get("params", [])},
            {t["key"]: t["value"] for t in run["data"].get("tags", [])})


def image_steps(files: list, key: str) -> list:
    """Steps of the images logged with log_image(key, step=...): images/<key>+step+<n>+timestamp+<ms>+<uuid>.png"""
    return sorted(int(m.group(1)) for f in files
                  if (m := re.fullmatch(rf"images/{re.escape(key)}\+step\+(\d+)\+timestamp\+\d+\+[-\w]+\.png", f)))


def rank_process(proc, rank: int):
    """The worker process of `rank` under torchrun `proc` (found by its RANK environment variable)."""
    import psutil
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "ebmscale.train.main" in child.cmdline():
                return child
        except psutil.Error:
            pass
    raise AssertionError(f"no rank {rank} under pid {proc.pid}")


def test_run_tracked_through_a_server_outage(mlflow_server, tmp_path, digits_shards):
    """One run: the params, every metric at every step, the pictures and GIFs, FINISHED. The server is killed
    (SIGKILL) after 3 steps; training goes on without it; it comes back on the same port before training ends
    and the spooled backlog arrives: no metric lost, none twice. To make "before training ends" independent of
    how fast the tiny steps are, rank 1 is paused (SIGSTOP) while the server boots (10-20 s here): rank 0 then
    waits in a collective, as it would on a slow step, while its sender thread carries on."""
    steps, run_dir = 30, tmp_path / "run"
    proc, log = start_train(run_dir, digits_shards, f"train.steps={steps}", "checkpoint.every=15", "train.precision=auto",
                            f"tracking.uri={mlflow_server.url}", "tracking.experiment=e2e", "tracking.retry_s=1")
    rank1 = None
    try:
        wait_for(lambda: len(logged_steps(run_dir)) >= 3, 400, "3 training steps", proc, log)
        run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
        assert run_id  # created while the server was up
        mlflow_server.stop()  # SIGKILL, like a crash
        down_at = max(logged_steps(run_dir))
        wait_for(lambda: max(logged_steps(run_dir)) >= down_at + 3, 60, "steps without the server", proc, log)
        rank1 = rank_process(proc, 1)
        rank1.suspend()
        paused_at = max(logged_steps(run_dir))
        assert paused_at < steps, "too fast: training ended before the pause"
        mlflow_server.start()
        wait_for(lambda: "is back" in log.read_text(errors="replace"), 60, "the backlog", proc, log)
        on_server = mlflow_server.metric_steps(run_id, "batch/loss")
        assert on_server == list(range(1, max(logged_steps(run_dir)) + 1)), on_server  # all, while training waits
        assert proc.poll() is None and max(logged_steps(run_dir)) < steps
    finally:
        if mlflow_server.proc is None:
            mlflow_server.start()
        if rank1 is not None:
            rank1.resume()
    text = finish_train(proc, log)
    assert text.count("unreachable; training goes on") == 1 and text.count("is back") == 1, text[-4000:]

    info, params, tags = get_run(mlflow_server.url, run_id)
    assert info["status"] == "FINISHED" and info["end_time"]
    exp = mlflow_server.api("experiments/get-by-name", experiment_name="e2e")["experiment"]
    found = requests.post(f"{mlflow_server.url}/api/2.0/mlflow/runs/search",
                          json={"experiment_ids": [exp["experiment_id"]]}, timeout=10).json()["runs"]
    assert [r["info"]["run_id"] for r in found] == [run_id]  # exactly one run
    assert (params["model.arch"], params["model.filters"], params["sampler.steps"], params["train.steps"]) == \
        ("resnet32", "8", "4", str(steps))
    assert params["deepspeed.train_batch_size"] == "16" and params["deepspeed.zero_optimization.stage"] == "2"
    from ebmscale.precision import detect_hardware, resolve
    resolved = resolve("auto", detect_hardware("cpu")).precision  # bf16 only on a CPU with native bf16
    assert params["train.precision"] == resolved and params["precision.requested"] == "auto"
    assert params.get("deepspeed.bf16.enabled") == ("True" if resolved == "bf16" else None)
    assert tags["precision"] == resolved and "native bf16" in tags["precision_reason"]
    assert (tags["restart_count"], tags["world_size"], tags["end_reason"]) == ("0", "2", "completed")
    assert tags["checkpoint.latest_step"] == str(steps)

    for key in METRICS:
        assert mlflow_server.metric_steps(run_id, key) == list(range(1, steps + 1)), key
    system = sorted(k for k in json.loads((run_dir / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
                    if k.startswith("system/"))
    hosts = {k.split("/")[1] for k in system}
    assert len(hosts) == 1 and f"system/{hosts.pop()}/cpu_utilization_percentage" in system, system
    for key in system:  # one node: local rank 0 of the only node samples it
        assert mlflow_server.metric_steps(run_id, key) == list(range(1, steps + 1)), key

    images = mlflow_server.artifacts(run_id, "images")
    for key in PICTURES:  # train.sample_every=5
        assert image_steps(images, key) == list(range(5, steps + 1, 5)), (key, images)
    assert mlflow_server.artifacts(run_id, "chains") == [f"chains/chains_{s:09d}.gif" for s in range(5, steps + 1, 5)]
    assert "config.yaml" in mlflow_server.artifacts(run_id)
    gif = requests.get(f"{mlflow_server.url}/get-artifact", timeout=10,
                       params={"path": "chains/chains_000000020.gif", "run_uuid": run_id})
    from PIL import Image
    assert gif.ok and Image.open(io.BytesIO(gif.content)).n_frames > 1


def test_crash_fails_the_run_and_relaunch_continues_it_in_the_ui(tmp_path, digits_shards):
    """Default store (SQLite next to the run folder). Rank 1 is SIGKILLed after step 3: the run ends FAILED.
    A relaunch resumes from step 2 and continues the same run (RUNNING again, restart_count 1) without logging
    step 3 twice, and ends FINISHED. Then `mlflow ui`, started with the command tools/status.py prints, serves
    what the UI asks for: the run, the image list, the PNGs and the GIF."""
    from mlflow.tracking import MlflowClient
    run_dir, steps = tmp_path / "runs" / "crash", 6
    args = (f"train.steps={steps}", "checkpoint.every=2", "tracking.experiment=crash")
    proc, log = start_train(run_dir, digits_shards, *args, env={"EBMSCALE_FAULT": "kill_at_step:3:1"})
    text = finish_train(proc, log, expect_rc=1)
    assert "fault injection: kill_at_step at step 3 on rank 1" in text
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    uri = f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED", (run.info.status, text[-4000:])
    assert [m.step for m in client.get_metric_history(run_id, "batch/loss")] == [1, 2, 3]

    text = finish_train(*start_train(run_dir, digits_shards, *args))
    assert "resumed step 2" in text
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["restart_count"] == "1"
    assert run.data.tags["end_reason"] == "completed"
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    for key in ("batch/loss", "batch/e_neg", "grad_norm", "checkpoint.step"):
        history = [m.step for m in client.get_metric_history(run_id, key)]
        assert history == sorted(set(history)) and history[-1] == steps, (key, history)  # no step twice
    assert [m.step for m in client.get_metric_history(run_id, "batch/loss")] == list(range(1, steps + 1))

    status = subprocess.run([sys.executable, str(ROOT / "tools" / "status.py"), str(run_dir)], capture_output=True,
                            text=True, check=True).stdout
    command = re.search(r"open: (mlflow ui .*)", status).group(1).split()
    assert command == ["mlflow", "ui", "--backend-store-uri", uri], status
    port = free_port()
    ui = subprocess.Popen([str(MLFLOW), *command[1:], "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                          env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), 120, "mlflow ui", ui)
        assert "<html" in requests.get(url, timeout=10).text.lower()  # the UI itself
        info, params, tags = get_run(url, run_id, api="ajax-api")
        assert info["status"] == "FINISHED" and tags["mlflow.loggedImages"] == "True"
        listing = requests.get(f"{url}/ajax-api/2.0/mlflow/artifacts/list", timeout=10,
                               params={"run_uuid": run_id, "path": "images"}).json()["files"]
        images = [f["path"] for f in listing]
        for key in PICTURES:
            assert image_steps(images, key) == [5, 6], (key, images)
        from PIL import Image
        for path in [p for p in images if p.endswith(".png")] + ["chains/chains_000000005.gif"]:
            r = requests.get(f"{url}/get-artifact", params={"path": path, "run_uuid": run_id}, timeout=10)
            assert r.ok, (path, r.status_code, r.text[:300])
            im = Image.open(io.BytesIO(r.content))
            assert im.format == ("GIF" if path.endswith(".gif") else "PNG") and min(im.size) > 16, path
        assert Image.open(io.BytesIO(r.content)).n_frames > 1
        history = requests.get(f"{url}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval", timeout=10,
                               params={"run_ids": run_id, "metric_key": "batch/loss", "max_results": 320}).json()
        assert [m["step"] for m in history["metrics"]] == list(range(1, steps + 1))
    finally:
        os.killpg(ui.pid, signal.SIGKILL)
        ui.wait()


def _up(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=1).ok
    except requests.RequestException:
        return False


def test_stuck_after_a_stop_request_is_marked_killed(mlflow_server, tmp_path):
    """A rank blocked in a collective after a peer died (NCCL) never returns to finish(): once a stop has been
    requested (torchrun's SIGTERM) and nothing ends the tracker for killed_after_s, the run becomes KILLED."""
    from ebmscale.config import TrackingConfig
    from ebmscale.tracking import build_tracker
    from ebmscale.train import stop
    t = build_tracker(TrackingConfig(uri=mlflow_server.url, experiment="stuck", retry_s=0.3), tmp_path / "run", 0)
    t.killed_after_s = 1.0
    t.start({"a": 1}, None, {})
    t.log_metrics({"loss": 1.0}, 1)
    try:
        stop.request_stop("SIGTERM")
        for step in range(2, 10):  # a slow but live stop (saving a checkpoint, logging) is not stuck
            time.sleep(0.3)
            t.log_metrics({"loss": 1.0}, step)
        t.flush(10)
        assert get_run(mlflow_server.url, t.run_id)[0]["status"] == "RUNNING"
        wait_for(lambda: t.run_id and get_run(mlflow_server.url, t.run_id)[0]["status"] == "KILLED", 30, "KILLED")
    finally:
        stop.clear()
    info, _, tags = get_run(mlflow_server.url, t.run_id)
    assert "stop request (SIGTERM)" in tags["end_reason"] and mlflow_server.metric_steps(t.run_id, "loss") == list(range(1, 10))
    t.close(5)


def test_preempted_run_is_killed_until_a_relaunch_continues_it(mlflow_server, tmp_path):
    """What main does on a preemption (finish KILLED with the reason), then on the requeued launch."""
    from ebmscale.config import TrackingConfig
    from ebmscale.tracking import build_tracker
    cfg, run_dir = TrackingConfig(uri=mlflow_server.url, experiment="preempt", retry_s=0.3), tmp_path / "run"
    t = build_tracker(cfg, run_dir, 0)
    t.start({"a": 1}, None, {})
    t.log_metrics({"loss": 1.0}, 1)
    t.finish("KILLED", timeout_s=30, reason="stopped (SIGTERM) at step 1; relaunch to continue")
    info, _, tags = get_run(mlflow_server.url, t.run_id)
    assert info["status"] == "KILLED" and tags["end_reason"].startswith("stopped (SIGTERM)")
    t = build_tracker(cfg, run_dir, 0)
    t.start({"a": 1}, None, {})
    assert t.flush(30)
    info, _, tags = get_run(mlflow_server.url, t.run_id)
    assert info["status"] == "RUNNING" and "end_reason" not in tags and tags["restart_count"] == "1"
    t.log_metrics({"loss": 0.5}, 2)
    t.finish("FINISHED")
    info, _, tags = get_run(mlflow_server.url, t.run_id)
    assert info["status"] == "FINISHED" and tags["end_reason"] == "completed"
    assert mlflow_server.metric_steps(t.run_id, "loss") == [1, 2]
