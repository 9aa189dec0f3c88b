"""The ICD recipe in the real trainer (2 DeepSpeed ranks over gloo): its state is saved and a resume after a kill
continues exactly as the uninterrupted run."""
import json
import re

import pytest
import torch

from conftest import train
from ebmscale.train.checkpoint import list_checkpoints
from ebmscale.train.main import fingerprint

pytestmark = pytest.mark.slow
LAUNCH_S = 900  # per launch: ICD's double-backward steps make these runs slower than the others

ICD = ["icd.enabled=true", "icd.kl_steps=2", "icd.entropy_bank=16", "icd.entropy_compare=8", "icd.flip=false",
       "model.scales=2", "train.precision=fp32", "checkpoint.every=2", "tracking.enabled=false"]


def losses(run):
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def test_icd_kill_then_resume_continues_exactly(tmp_path, digits_shards):
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, digits_shards, "train.steps=6", *ICD, timeout=LAUNCH_S)
    res = train(b, digits_shards, "train.steps=6", *ICD, env={"EBMSCALE_FAULT": "kill_at_step:5:1"}, check=False,
                timeout=LAUNCH_S)
    assert res.returncode != 0
    assert list_checkpoints(b / "checkpoints")[-1].name == "step_000000004"
    files = {r: torch.load(b / "checkpoints" / "step_000000004" / f"rank_{r:05d}.pt", weights_only=False) for r in range(2)}
    for f in files.values():
        assert f["buffer"]["seen"] == 4 * 8  # the reservoir's count: 4 steps of 8 chains
        assert len(f["icd"]["bank"]["born"]) == 16  # the entropy bank, full
    res = train(b, digits_shards, "train.steps=6", *ICD, timeout=LAUNCH_S)
    out = res.stdout + res.stderr
    for r, f in files.items():
        m = re.search(rf"rank {r}: resumed step 4 .* sha (\w+); rng sha (\w+); icd sha (\w+)", out)
        assert m, out[-3000:]
        assert m.groups() == (fingerprint(f["buffer"]), fingerprint(f["rng"]), fingerprint({"bank": f["icd"]["bank"]}))
    la, lb = losses(a), losses(b)
    assert la[4]["batch/loss"] == lb[4]["batch/loss"] and la[4]["icd/entropy"] != 0.0  # the entropy term is live
    for step in (5, 6):
        for key in ("batch/loss", "icd/kl", "icd/entropy", "batch/e_neg"):
            assert la[step][key] == pytest.approx(lb[step][key], rel=1e-6, abs=1e-7), (step, key)


def test_icd_state_follows_a_new_world_size(tmp_path, digits_shards):
    run = tmp_path / "run"
    common = [*ICD, "checkpoint.every=3", "train.zero_stage=2"]
    train(run, digits_shards, "train.steps=3", *common, nproc=2, timeout=LAUNCH_S)
    before = [torch.load(run / "checkpoints" / "step_000000003" / f"rank_{r:05d}.pt", weights_only=False) for r in range(2)]
    res = train(run, digits_shards, "train.steps=4", *common, "checkpoint.every=1", nproc=1, timeout=LAUNCH_S)
    assert "written by 2 ranks on 1" in res.stdout + res.stderr
    after = torch.load(run / "checkpoints" / "step_000000004" / "rank_00000.pt", weights_only=False)
    assert after["buffer"]["seen"] == sum(b["buffer"]["seen"] for b in before) + 8  # split over 1 rank, then one step
    born = after["icd"]["bank"]["born"]
    assert len(born) == 16 and (born == 3).sum() == 8 and (born == 2).sum() == 8  # the newest old rows, then step 4's
