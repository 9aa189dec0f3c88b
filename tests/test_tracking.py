"""The tracker against a real `mlflow server` (one per module, ~10 s to start), checked over its REST API."""
import json
import re
import time

import numpy as np
import pytest
from mlflow_server import mlflow_server  # noqa: F401  (the fixture)

from ebmscale.config import TrackingConfig
from ebmscale.tracking import NullTracker, build_tracker, chain_gif, energy_histogram, image_grid
from ebmscale.tracking.spool import Spool


def config(**kw) -> TrackingConfig:
    return TrackingConfig(**{"retry_s": 0.3, "flush_timeout_s": 60.0, **kw})


def launch(cfg, run_dir, run_id=None, job="1", params=None):
    """What the trainer does at every (re)start."""
    tracker = build_tracker(cfg, run_dir, rank=0, run_id=run_id, run_name_default="ebm-test")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(f"job: {job}\n")
    tracker.start(params or {"model.arch": "resnet32", "optim.lr": 1e-4}, run_dir / "config.yaml",
                  {"slurm_job_id": job, "world_size": 2})
    return tracker


def get_run(server, run_id):
    run = server.api("runs/get", run_id=run_id)["run"]
    return run, {p["key"]: p["value"] for p in run["data"].get("params", [])}, \
        {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.mark.slow  # over 10 s on 2 busy cores
def test_run_lifecycle_and_resume(mlflow_server, tmp_path):
    cfg, run_dir = config(uri=mlflow_server.url, experiment="lifecycle"), tmp_path / "run"
    t = launch(cfg, run_dir, job="100")
    for s in range(1, 6):
        t.log_metrics({"loss": 1 / s, "e_pos": -s}, s)
    t.log_image("samples", image_grid(np.random.rand(4, 3, 8, 8), 2), step=5)
    t.log_image("energy", energy_histogram(np.random.randn(64), np.random.randn(64) + 1), step=5)
    chain_gif([np.random.rand(4, 3, 8, 8) for _ in range(3)], tmp_path / "chain.gif")
    t.log_artifact(tmp_path / "chain.gif", "chains")
    t.log_text("hello", "notes/hello.txt")
    t.record_checkpoint(run_dir / "checkpoints" / "step_5", 5)
    t.close(60)  # preempted: the run stays RUNNING

    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    assert t.state_dict() == {"run_id": run_id, "tracking_uri": mlflow_server.url}
    run, params, tags = get_run(mlflow_server, run_id)
    assert run["info"]["status"] == "RUNNING" and run["info"]["run_name"] == "ebm-test"
    assert params == {"model.arch": "resnet32", "optim.lr": "0.0001"}
    assert (tags["restart_count"], tags["slurm_job_id"], tags["checkpoint.latest_step"]) == ("0", "100", "5")
    assert mlflow_server.metric_steps(run_id, "loss") == [1, 2, 3, 4, 5]
    assert mlflow_server.metric_steps(run_id, "checkpoint.step") == [5]
    assert {"config.yaml", "chains", "images", "notes"} <= set(mlflow_server.artifacts(run_id))
    assert mlflow_server.artifacts(run_id, "chains") == ["chains/chain.gif"]
    images = mlflow_server.artifacts(run_id, "images")
    assert any("samples+step+5+" in p for p in images) and any("energy+step+5+" in p for p in images)

    # requeue 1: same run_dir; the last checkpoint was at step 3, so steps 4..5 are logged again
    t = launch(cfg, run_dir, job="101", params={"model.arch": "resnet32", "optim.lr": 2e-4, "train.steps": 10})
    assert t.run_id == run_id
    for s in range(4, 9):
        t.log_metrics({"loss": 1 / s}, s)
    t.log_image("samples", np.zeros((8, 8, 3), np.uint8), step=5)  # already there: dropped
    t.close(60)
    # requeue 2: a fresh run_dir and only the checkpoint's run id: the server's latest steps keep 7..8 out
    t = launch(cfg, tmp_path / "elsewhere", run_id=run_id, job="102")
    for s in range(7, 11):
        t.log_metrics({"loss": 1 / s}, s)
    t.finish("FINISHED")

    run, params, tags = get_run(mlflow_server, run_id)
    assert run["info"]["status"] == "FINISHED"
    assert params == {"model.arch": "resnet32", "optim.lr": "0.0001", "train.steps": "10"}  # first values kept
    assert (tags["restart_count"], tags["slurm_job_id"]) == ("2", "102")
    assert mlflow_server.metric_steps(run_id, "loss") == list(range(1, 11))
    assert sum("samples+step+5+" in p and p.endswith(".png") for p in mlflow_server.artifacts(run_id, "images")) == 1
    assert mlflow_server.artifacts(run_id, "restarts") == ["restarts/1", "restarts/2"]


@pytest.mark.slow  # over 10 s on 2 busy cores
def test_server_outage_loses_nothing(mlflow_server, tmp_path, capfd):
    cfg = config(uri=mlflow_server.url, experiment="outage")
    a = launch(cfg, tmp_path / "a")
    assert a.flush(60) and a.run_id
    for s in range(1, 6):
        a.log_metrics({"loss": s}, s)
    mlflow_server.stop()  # a crash, while a's sender is still at it
    b = launch(cfg, tmp_path / "b")  # a launch while the store is down
    assert a.describe() == f"MLflow run {a.run_id} at {mlflow_server.url}"  # the start line's words
    assert b.describe() == f"MLflow run: opening at {mlflow_server.url} (its id follows when the store answers)"
    for s in range(6, 16):
        t0 = time.monotonic()
        a.log_metrics({"loss": s}, s)
        b.log_metrics({"loss": s}, s)
        if s == 10:
            a.log_image("samples", np.zeros((8, 8, 3), np.uint8), s)
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.05)
    assert b.run_id is None and not a.flush(0.5)
    mlflow_server.start()
    a.finish("FINISHED")
    b.finish("FINISHED")

    assert json.loads((tmp_path / "b" / "tracking.json").read_text())["run_id"] == b.run_id is not None
    for t, first in ((a, 1), (b, 6)):
        assert mlflow_server.metric_steps(t.run_id, "loss") == list(range(first, 16))
        assert get_run(mlflow_server, t.run_id)[0]["info"]["status"] == "FINISHED"
    assert any("samples+step+10+" in p for p in mlflow_server.artifacts(a.run_id, "images"))
    out, err = capfd.readouterr()
    assert out.count(f"MLflow run {b.run_id} at {mlflow_server.url}") == 1  # the id that followed, once
    assert f"MLflow run {a.run_id}" not in out  # a's start line said it already
    assert err.count("unreachable") == 2 and err.count("is back") == 2  # once per outage per tracker


def test_default_sqlite_store(tmp_path):
    from mlflow.tracking import MlflowClient
    t = launch(config(experiment="local"), tmp_path / "runs" / "a")
    t.log_metrics({"loss": 0.5}, 1)
    t.log_image("samples", np.zeros((8, 8, 3), np.uint8), 1)
    t.finish("FINISHED")
    assert t.tracking_uri == f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}"
    client = MlflowClient(t.tracking_uri)
    assert client.get_run(t.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(t.run_id, "loss")] == [1]
    artifacts = tmp_path / "runs" / "mlartifacts"
    assert list(artifacts.rglob("config.yaml")) and list(artifacts.rglob("samples+step+1+*.png"))


def test_resume_offline_drops_logged_steps_and_never_blocks(tmp_path):
    from mlflow_server import free_port
    cfg = config(uri=f"http://127.0.0.1:{free_port()}", experiment="nobody")  # nothing listens there
    t0 = time.monotonic()
    t = launch(cfg, tmp_path / "run")
    for s in range(1, 6):
        t.log_metrics({"loss": s}, s)
    t.close(0)
    t = launch(cfg, tmp_path / "run")
    for s in range(3, 8):
        t.log_metrics({"loss": s}, s)
    t.close(0)
    assert time.monotonic() - t0 < 10
    records = [r for _, r in Spool(tmp_path / "run" / "tracking_spool").records()]
    assert [r["op"] for r in records].count("start") == 2
    assert [r["step"] for r in records if r["op"] == "metrics"] == [1, 2, 3, 4, 5, 6, 7]
    (tmp_path / "run" / "tracking.json").unlink()  # run.overwrite moved it aside: a new run, the spool goes too
    t = launch(cfg, tmp_path / "run")
    t.log_metrics({"loss": 1}, 1)
    t.close(0)
    records = [r for _, r in Spool(tmp_path / "run" / "tracking_spool").records()]
    assert [r["op"] for r in records] == ["start", "metrics"] and list(tmp_path.glob("run/tracking_spool.orphaned-*"))


def test_null_tracker_for_other_ranks(tmp_path):
    t = build_tracker(config(), tmp_path, rank=1)
    assert isinstance(t, NullTracker) and t.run_id is None
    t.start({}, tmp_path / "config.yaml", {})
    t.log_metrics({"loss": 1.0}, 1)
    t.finish("FINISHED")
    assert not list(tmp_path.iterdir())


def test_spool_torn_tail_cursor_and_compaction(tmp_path):
    s = Spool(tmp_path)
    s.append({"a": 1})
    s.append({"a": 2})
    s.close()
    with open(tmp_path / "spool.jsonl", "ab") as f:
        f.write(b'{"a": 3')  # a crash mid-append
    s = Spool(tmp_path)
    s.ack(s.records()[0][0])
    s.close()
    s = Spool(tmp_path)
    assert [r for _, r in s.records()] == [{"a": 2}]
    s.state["x"] = 1
    s.ack(s.records()[-1][0])
    s.compact()
    assert s.pending() == 0 and (tmp_path / "spool.jsonl").stat().st_size == 0
    s.close()
    assert Spool(tmp_path).state == {"x": 1}


def test_pictures(tmp_path):
    import torch
    from PIL import Image
    grid = image_grid(torch.rand(5, 1, 8, 8), nrow=2)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 10 + 2, 2 * 10 + 2, 3)
    path = chain_gif([np.random.rand(4, 3, 8, 8) for _ in range(4)], tmp_path / "chain.gif", nrow=2)
    assert Image.open(path).n_frames == 4
    hist = energy_histogram(torch.randn(100), np.r_[np.random.randn(100), np.inf])
    assert hist.dtype == np.uint8 and hist.ndim == 3 and hist.shape[2] == 3


def test_experiment_opens_in_the_model_training_view(tmp_path):
    """MLflow 3 reads an experiment's kind from the `mlflow.experimentKind` tag; ebmscale's are model training.
    An experiment made without it (by hand, or an older ebmscale) gets it on the next run."""
    from mlflow.tracking import MlflowClient
    t = launch(config(experiment="kind"), tmp_path / "runs" / "a")
    t.finish("FINISHED")
    client = MlflowClient(t.tracking_uri)
    assert client.get_experiment_by_name("kind").tags["mlflow.experimentKind"] == "custom_model_development"
    bare = client.create_experiment("bare")
    launch(config(experiment="bare"), tmp_path / "runs" / "b").finish("FINISHED")
    assert client.get_experiment(bare).tags["mlflow.experimentKind"] == "custom_model_development"


def mlflow_chart_sections(keys) -> list:
    """[(section, [key, ...]), ...] as MLflow 3's UI lays out the charts of these metric keys, on the run page's
    "Model metrics" tab and in the experiment's chart view alike (RunsChartsCardConfig.extractChartSectionName and
    getBaseChartAndSectionConfigs, mlflow/server/js/src/experiment-tracking/components/runs-charts/runs-charts.types.ts):
    a key's section is its part before the last "/" ("" is "Model metrics", "system" is "System metrics"); the named
    sections come sorted, then "Model metrics", then "System metrics"; a section's charts are sorted by key."""
    sections = {}
    for key in sorted(keys):
        name = key.rpartition("/")[0]
        sections.setdefault({"": "Model metrics", "system": "System metrics"}.get(name, name), []).append(key)
    last = ["Model metrics", "System metrics"]
    return [(name, sections[name]) for name in sorted(set(sections) - set(last)) + last if name in sections]


def test_loss_energies_and_langevin_are_the_first_charts_in_mlflow():
    """The keys of one training log step (the trainer's metrics with ICD on, and the guard's), through MLflow's
    rule: the loss and the energies are the first section, the Langevin diagnostics the second, the rest after."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf

    from ebmscale.buffer import ReplayBuffer
    from ebmscale.config import GuardConfig, load_config
    from ebmscale.models import build_model
    from ebmscale.sampling.langevin import LangevinStats
    from ebmscale.train.guard import Guard
    from ebmscale.train.icd import ICD
    from ebmscale.train.timing import Marks
    from ebmscale.train.trainer import Trainer

    cfg = load_config("configs/digits.yaml", ["model.filters=4", "icd.enabled=true", "icd.kl_steps=1",
                                              "icd.entropy_bank=8", "icd.entropy_compare=4", "tracking.enabled=false"])
    icd = ICD(cfg, (1, 16, 16), "cpu")
    icd.remember(torch.rand(8, 1, 16, 16), step=0)
    model, y = build_model(cfg.model), torch.randint(0, 10, (4,))
    _, icd_stats = icd.loss(model, icd.last_steps(model, torch.rand(4, 1, 16, 16), y, torch.float32), y, torch.float32)
    zero = torch.tensor(0.0)
    marks = Marks("cpu")
    for point in ("start", "sampled", "backward", "update", "updated"):
        marks.mark(point)
    out = {"loss": zero, "e_pos": zero, "e_neg": zero, "langevin": LangevinStats(zero, zero, zero, zero),
           "fresh": zero, "age": zero, "marks": marks, "icd": icd_stats}
    trainer = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), world_size=1, stream=None,
                              buffer=ReplayBuffer(4, (1, 16, 16)),
                              engine=SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"lr": 1e-4}])))
    guard = Guard(OmegaConf.structured(GuardConfig()), {"optim.lr": 1e-4}, world_size=1, device=torch.device("cpu"))
    keys = {**Trainer.metrics(trainer, out, 10.0, 0.01), **guard.judge(1, [0.0] * 9).metrics, **guard.counters()}
    assert all(re.fullmatch(r"[a-z0-9_/]+", k) for k in keys), keys  # plain sort == the UI's localeCompare

    sections = mlflow_chart_sections(keys)
    assert sections[0] == ("batch", ["batch/e_neg", "batch/e_pos", "batch/energy_gap", "batch/loss"])
    assert sections[1] == ("batch/langevin", ["batch/langevin/energy_end", "batch/langevin/energy_start",
                                              "batch/langevin/grad_abs", "batch/langevin/step_change"])
    assert [name for name, _ in sections[2:]] == ["buffer", "data", "guard", "icd", "memory", "time", "Model metrics"]
    assert sections[-1][1] == ["grad_norm", "images_per_s", "lr"]
    # the rule itself: unprefixed keys come after every named section, "system/" last
    assert [n for n, _ in mlflow_chart_sections(["loss", "zeta/a", "system/cpu", "a/b/c"])] == \
        ["a/b", "zeta", "Model metrics", "System metrics"]


@pytest.mark.slow  # a sqlite store opened twice: ~15 s on 2 busy cores
def test_a_copied_run_folder_gets_its_own_mlflow_run(tmp_path):
    """A run folder copied beside the original resumes its checkpoints (which carry the original's run id) but logs
    to a new MLflow run tagged copied_from; the original's run is neither continued nor reopened."""
    import shutil
    from mlflow.tracking import MlflowClient
    first = launch(config(experiment="copies"), tmp_path / "runs" / "a")
    first.log_metrics({"loss": 0.5}, 1)
    first.finish("FINISHED")
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / "b")
    copy = launch(config(experiment="copies"), tmp_path / "runs" / "b", run_id=first.run_id)  # the checkpoint's id
    copy.log_metrics({"loss": 0.25}, 2)
    copy.finish("FINISHED")
    client = MlflowClient(copy.tracking_uri)
    assert copy.run_id != first.run_id
    assert client.get_run(copy.run_id).data.tags["copied_from"] == first.run_id
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1]  # the original untouched
    assert client.get_run(first.run_id).data.tags["restart_count"] == "0"
    again = launch(config(experiment="copies"), tmp_path / "runs" / "b", run_id=copy.run_id)  # the copy resumes its own
    again.finish("FINISHED")
    assert again.run_id == copy.run_id
