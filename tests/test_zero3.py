"""ZeRO-3 whatever stage3_param_persistence_threshold keeps whole (issue 24): at 0 every parameter, the stem's bias
and the energy head included, is partitioned, so the model must read each inside its module's call; and the
finite-weights check of a commit must see the whole weights, not this rank's partition."""
import json

import pytest
import torch

from conftest import train
from ebmscale.eval.loading import load_energy_model
from ebmscale.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

ZERO3 = ["train.zero_stage=3", "train.zero3_persistence_threshold=0", "train.precision=fp32", "checkpoint.every=3",
         "tracking.enabled=false", "guard.enabled=false"]


def committed(run, step):
    return json.loads((run / "checkpoints" / f"step_{step:09d}" / "COMMITTED").read_text())


def test_zero3_at_persistence_threshold_0_trains_samples_commits_and_sees_a_nan_in_one_partition(tmp_path,
                                                                                                  digits_shards):
    run = tmp_path / "run"
    res = train(run, digits_shards, "train.steps=3", *ZERO3)
    assert committed(run, 3)["finite"] is True
    model, cfg, ck, step = load_energy_model(run)  # the consolidated weights: trained, finite
    assert step == 3 and torch.isfinite(model(torch.rand(2, 1, 16, 16), torch.tensor([0, 1]))).all()
    assert "placement: rank 1/2" in res.stdout  # every rank says where it runs
    last = json.loads((run / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["time/langevin_share"] < 1 and last["time/step_s"] >= last["time/sample_s"] + last["time/update_s"]

    bad = tmp_path / "bad"  # one NaN in rank 1's partition: rank 0's own partition is clean
    res = train(bad, digits_shards, "train.steps=3", *ZERO3, env={"EBMSCALE_FAULT": "nan_weight:3:1"})
    assert "fault injection: nan_weight at step 3 on rank 1" in res.stderr
    assert committed(bad, 3)["finite"] is False  # rank 0 writes COMMITTED: it saw rank 1's NaN
    assert [p.name for p in list_checkpoints(bad / "checkpoints")] == ["step_000000003"]
