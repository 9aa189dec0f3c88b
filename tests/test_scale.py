"""The scale drill (issue 24), on the local SLURM cluster as 4 nodes x 4 tasks: 16 gloo ranks train a tiny digits
net; rank 7 is killed after step 25 (the last commit: step 20) and the report names it; the run is relaunched on 3
nodes (12 ranks) and resumes from step 20 through DeepSpeed's universal conversion to step 30. Checked: every
buffer sample of the 16 shards lands on exactly one of the 12 ranks (none lost, none twice), the optimizer's Adam
moments come through the conversion, one MLflow run with one history.

Not in the default run (markers slow, slurm, scale); one command, CPU-heavy (16 processes on this machine):
    tools/scale_drill.sh            # = nice pytest -m scale tests/test_scale.py -s
It grows the shared test cluster to 4 nodes x 4 CPUs when it is smaller (never shrinks or stops it).
"""
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_digits_shards
from ebmscale.buffer import reshard

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.scale]
NODES, TASKS = 4, 4
DRILL = ["model.filters=4", "sampler.steps=2", "data.batch_size=4", "buffer.capacity=128", "data.workers=0",
         "train.threads=1", "train.log_every=5", "train.sample_every=1000", "tracking.chain_gif_every=1000",
         "checkpoint.every=10", "train.steps=30", "launcher.cpus_per_task=1", f"launcher.tasks_per_node={TASKS}",
         "tracking.system_metrics=false", "launcher.time_min=30"]


def grow_cluster(nodes: int, cpus: int) -> None:
    """The shared test cluster with at least `nodes` nodes of `cpus` CPUs: up.sh only when it is smaller."""
    res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], capture_output=True, text=True)
    have = [line.split() for line in res.stdout.splitlines() if line.strip()] if res.returncode == 0 else []
    n, c = len(have), min((int(x[1]) for x in have), default=0)
    if n >= nodes and c >= cpus:
        return
    env = {**os.environ, "EBMSCALE_SLURM_NODES": str(max(n, nodes)), "EBMSCALE_SLURM_CPUS": str(max(c, cpus))}
    subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster" / "up.sh")], env=env, check=True, timeout=300)


def launch(run: Path, nodes: int, env: dict, timeout: int = 1500) -> subprocess.CompletedProcess:
    shards = make_digits_shards(ROOT / "data" / "digits")
    cmd = [sys.executable, str(ROOT / "tools" / "launch.py"), "--profile", "local-test", "--nodes", str(nodes),
           "--wait", "--quiet", str(ROOT / "configs" / "digits.yaml"), f"run.dir={run}", f"run.name=drill-{run.name}",
           f"data.shards={shards}/digits-{{000000..000003}}.tar", *DRILL]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "EBMSCALE_LOG_RANKS": "all", **env}, capture_output=True,
                         text=True, timeout=timeout)
    res.seconds = time.perf_counter() - t
    return res


def test_16_ranks_killed_rank_named_requeued_on_12_resumed(tmp_path):
    grow_cluster(NODES, TASKS)
    run = tmp_path / f"r{uuid.uuid4().hex[:6]}"
    a = launch(run, NODES, {"EBMSCALE_FAULT": "kill_at_step:25:7", "EBMSCALE_DIST_TIMEOUT_S": "60"})
    out_a = a.stdout + a.stderr
    assert a.returncode != 0, out_a[-3000:]
    assert re.search(r"rank 7\b.*(died|stopped answering|without a result from rank 7)", out_a), out_a[-3000:]
    ck = run / "checkpoints" / "step_000000020"
    assert (ck / "COMMITTED").exists() and json.loads((ck / "trainer.json").read_text())["world_size"] == 16

    b = launch(run, NODES - 1, {})
    out_b = b.stdout + b.stderr
    assert b.returncode == 0, out_b[-3000:]
    assert (run / "checkpoints" / "step_000000030" / "COMMITTED").exists()
    logs = "".join(p.read_text(errors="replace") for p in (run / "logs").rglob("*.out"))
    here = {int(r): int(n) for r, n in re.findall(r"rank (\d+): resumed step 20 from \S+ written by 16 ranks on 12: "
                                                  r"buffer re-sharded \((\d+) samples here", logs)}
    assert sorted(here) == list(range(12)), logs[-3000:]

    # the buffer: the 12 shares the resume took (the same function, the same files) hold each sample exactly once
    shards = [torch.load(ck / f"rank_{r:05d}.pt", weights_only=False)["buffer"] for r in range(16)]
    shares = [reshard(shards, 12, r, 128)[0] for r in range(12)]  # 16 x 80 samples fit 12 x 128
    assert [len(s["born"]) for s in shares] == [here[r] for r in range(12)]

    def rows(parts):
        return sorted((int(b), bytes(i.flatten().tolist())) for p in parts for b, i in zip(p["born"], p["images"]))
    assert rows(shares) == rows(shards) and sum(here.values()) == sum(len(s["born"]) for s in shards)

    # the optimizer: Adam's moments through ds_to_universal (every parameter's, non-zero)
    uni = run / "checkpoints" / "step_000000020_universal" / "zero"
    moments = [torch.load(f, weights_only=False) for f in sorted(uni.rglob("exp_avg_sq.pt"))]
    moments = [m["param"] if isinstance(m, dict) else m for m in moments]
    assert moments and all(m.abs().sum() > 0 for m in moments)

    # one MLflow run: the resumed job continued it
    db = sqlite3.connect(run.parent / "mlflow.db")
    runs = db.execute("select run_uuid, status from runs where name = ?", (f"drill-{run.name}",)).fetchall()
    assert len(runs) == 1 and runs[0][1] == "FINISHED", runs
    steps = [s for (s,) in db.execute("select step from metrics where key='batch/loss' and run_uuid=? order by step",
                                      (runs[0][0],))]
    assert steps == list(range(5, 31, 5)), steps  # one history: step 25, logged before the kill, not twice
    print(f"\ndrill: 16 ranks to the kill {a.seconds:.0f} s, 12 ranks resumed to step 30 {b.seconds:.0f} s")
