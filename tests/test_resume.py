"""Checkpoints that lose nothing: kills mid-training and mid-save, exact resume, new world sizes."""
import json
import re

import pytest
import torch

from conftest import train
from ebmscale.train.checkpoint import list_checkpoints
from ebmscale.train.main import fingerprint

pytestmark = pytest.mark.slow


def losses(run):
    rows = [json.loads(l) for l in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["batch/loss"] for r in rows}


def rank_file(run, step, rank):
    return torch.load(run / "checkpoints" / f"step_{step:09d}" / f"rank_{rank:05d}.pt", weights_only=False)


def test_kill_one_rank_then_resume_identical_state(tmp_path, digits_shards):
    run = tmp_path / "run"
    res = train(run, digits_shards, "train.steps=8", "checkpoint.every=2", "tracking.enabled=false",
                env={"EBMSCALE_FAULT": "kill_at_step:5:1"}, check=False)
    assert res.returncode != 0
    assert list_checkpoints(run / "checkpoints")[-1].name == "step_000000004"
    expected = {r: (fingerprint(rank_file(run, 4, r)["buffer"]), fingerprint(rank_file(run, 4, r)["rng"]))
                for r in range(2)}
    res = train(run, digits_shards, "train.steps=8", "checkpoint.every=2", "tracking.enabled=false")
    out = res.stdout + res.stderr
    for r in range(2):
        m = re.search(rf"rank {r}: resumed step 4 .* sha (\w+); rng sha (\w+)", out)
        assert m, out[-3000:]
        assert (m.group(1), m.group(2)) == expected[r]
    assert list_checkpoints(run / "checkpoints")[-1].name == "step_000000008"


def test_kill_during_save_resumes_previous_and_cleans_partial(tmp_path, digits_shards):
    run = tmp_path / "run"
    res = train(run, digits_shards, "train.steps=6", "checkpoint.every=2", "tracking.enabled=false",
                env={"EBMSCALE_FAULT": "kill_in_save:4:0"}, check=False)
    assert res.returncode != 0
    partial = run / "checkpoints" / "step_000000004"
    assert partial.exists() and not (partial / "COMMITTED").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000000002"
    res = train(run, digits_shards, "train.steps=6", "checkpoint.every=2", "tracking.enabled=false")
    out = res.stdout + res.stderr
    assert "moving partial checkpoint" in out and "resumed step 2" in out
    assert [p.name for p in list_checkpoints(run / "checkpoints")][-1] == "step_000000006"


def test_stop_and_resume_gives_the_same_loss_as_uninterrupted(tmp_path, digits_shards):
    common = ["checkpoint.every=3", "tracking.enabled=false", "train.precision=fp32", "train.zero_stage=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, digits_shards, "train.steps=5", *common)
    train(b, digits_shards, "train.steps=3", *common)
    train(b, digits_shards, "train.steps=5", *common)
    la, lb = losses(a), losses(b)
    assert la[3] == lb[3]
    assert la[4] == pytest.approx(lb[4], rel=1e-6, abs=1e-7)
    assert la[5] == pytest.approx(lb[5], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_new_world_size_keeps_every_buffer_sample_once(tmp_path, digits_shards, before, after):
    run = tmp_path / "run"
    common = ["checkpoint.every=3", "tracking.enabled=false", "buffer.capacity=64", "train.zero_stage=2"]
    train(run, digits_shards, "train.steps=3", *common, nproc=before)
    saved = [rank_file(run, 3, r)["buffer"] for r in range(before)]
    keys = sorted(tuple(x.flatten().tolist()) + (int(y), int(b)) for s in saved
                  for x, y, b in zip(s["images"], s["labels"], s["born"]))
    res = train(run, digits_shards, "train.steps=4", *common, "checkpoint.resume=auto", nproc=after,
                env={"EBMSCALE_DUMP_BUFFER_ON_RESUME": str(tmp_path / "dump")})
    assert f"written by {before} ranks on {after}" in res.stdout + res.stderr
    got = []
    for r in range(after):
        s = torch.load(tmp_path / "dump" / f"rank_{r}.pt", weights_only=False)
        got += [tuple(x.flatten().tolist()) + (int(y), int(b)) for x, y, b in zip(s["images"], s["labels"], s["born"])]
    assert sorted(got) == keys
