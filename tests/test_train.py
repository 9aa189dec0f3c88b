"""The real trainer, 2 DeepSpeed processes over gloo on CPU: train, checkpoint, resume, MLflow."""
import json
import sqlite3

import pytest
import torch

from conftest import train
from ebmscale.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow


def metrics(run):
    rows = [json.loads(l) for l in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}  # the last record of a step wins


def test_two_ranks_train_checkpoint_resume_and_track(tmp_path, digits_shards):
    run = tmp_path / "run"
    res = train(run, digits_shards, "train.steps=6", "checkpoint.every=3", "train.zero_stage=2",
                "train.precision=bf16")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_000000003", "step_000000006"]
    ck = run / "checkpoints" / "step_000000006"
    assert (ck / "rank_00000.pt").exists() and (ck / "rank_00001.pt").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == ck.name
    assert (run / "config.yaml").exists() and list((run / "samples").glob("negatives_*.png"))
    m = metrics(run)
    assert sorted(m) == [1, 2, 3, 4, 5, 6] and all(abs(r["batch/loss"]) < 1e3 for r in m.values())
    run_id = json.loads((run / "tracking.json").read_text())["run_id"]
    assert run_id

    res = train(run, digits_shards, "train.steps=9", "checkpoint.every=3", "train.zero_stage=2",
                "train.precision=bf16")
    assert "resumed step 6" in res.stdout + res.stderr
    assert json.loads((run / "tracking.json").read_text())["run_id"] == run_id
    assert list_checkpoints(run / "checkpoints")[-1].name == "step_000000009"
    db = sqlite3.connect(tmp_path / "mlflow.db")
    runs = db.execute("select run_uuid, status from runs").fetchall()
    assert runs == [(run_id, "FINISHED")]
    steps = [s for (s,) in db.execute("select step from metrics where key='batch/loss' and run_uuid=? order by step",
                                      (run_id,))]
    assert steps == list(range(1, 10))  # one continuous history, no step twice


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_train(tmp_path, digits_shards, stage):
    run = tmp_path / "run"
    train(run, digits_shards, "train.steps=3", "checkpoint.every=3", f"train.zero_stage={stage}",
          "train.precision=fp32", "tracking.enabled=false")
    assert list_checkpoints(run / "checkpoints")[-1].name == "step_000000003"
    from ebmscale.eval.loading import load_energy_model
    model, cfg, ck, step = load_energy_model(run)
    assert step == 3 and torch.isfinite(model(torch.rand(2, 1, 16, 16), torch.tensor([0, 1]))).all()
