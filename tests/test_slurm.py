"""End to end on a real SLURM cluster: the local 2-3 node test cluster of slurm/local-cluster/up.sh.

Trains the digits config (tiny) on 2 nodes x 1 task through tools/launch.py; preempts it with
SLURM's own signals (the time-limit warning SIGUSR2, `scontrol requeue`, a real time limit) and
checks that it saves, is requeued, resumes in the same run folder and MLflow run, and finishes at
train.steps; checks that config errors and --dry-run submit nothing; runs slurm/sbatch_example.sh.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import make_digits_shards

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "configs" / "digits.yaml")
PROFILE = ["--profile", "local-test"]
TINY = ["model.filters=8", "sampler.steps=5", "train.threads=1", "train.log_every=5",
        "checkpoint.every=1000"]


def _controller_reachable() -> str:
    if not shutil.which("sinfo"):
        return "sinfo is not on PATH (no SLURM client); install and start the local test cluster: " \
               "bash slurm/local-cluster/up.sh (root)"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed ({e})"
    if res.returncode != 0:
        return f"sinfo cannot reach a SLURM controller ({res.stderr.strip()}); start the local test cluster: " \
               f"bash slurm/local-cluster/up.sh (root)"
    if sum(int(x) for x in res.stdout.split() if x.isdigit()) < 2:
        return "the SLURM cluster has fewer than 2 nodes"
    return ""


_why = _controller_reachable()
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(bool(_why), reason=_why or "-")]
needs_trainer = pytest.mark.skipif(not (ROOT / "ebmscale" / "train" / "main.py").exists(),
                                   reason="the trainer (ebmscale/train/main.py) is not there yet")


@pytest.fixture(scope="module")
def shards():
    pytest.importorskip("sklearn")
    out = make_digits_shards(ROOT / "data" / "digits")
    return f"data.shards={out}/digits-{{000000..000003}}.tar"


def launch(*args, timeout=600, env=None):
    e = {**os.environ, "EBMSCALE_SELFTEST_STEP_S": "0.2", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "launch.py"), *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def job_id(run: Path) -> str:
    return json.loads((run / "launch.json").read_text())["job_id"]


def state(jid: str) -> str:
    res = subprocess.run(["sacct", "-n", "-P", "-X", "-j", jid, "-o", "State"], capture_output=True, text=True)
    lines = res.stdout.split()
    return lines[-1] if lines else "?"


def wait_final(jid: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = state(jid)
        if s.startswith(("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")):
            return s
        time.sleep(2)
    subprocess.run(["scancel", jid])
    raise AssertionError(f"job {jid} did not finish within {timeout} s (last state {state(jid)})")


def wait_for(pred, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def jobs_named(name: str) -> str:
    q = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.strip()
    a = subprocess.run(["sacct", "-n", "-X", "-P", "--name", name, "-S", "now-1hour", "-o", "JobID"],
                       capture_output=True, text=True).stdout.strip()
    return (q + " " + a).strip()


def mlflow_runs(run: Path, name: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run.parent / 'mlflow.db'}")
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    return runs


def tracked_run(run: Path):
    """The MLflow run id the tracker keeps in RUN_DIR/tracking.json (None until the run exists)."""
    try:
        return json.loads(text(run / "tracking.json")).get("run_id")
    except ValueError:
        return None


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@needs_trainer
def test_two_nodes_train_checkpoint_and_track(tmp_path, shards):
    run, name = tmp_path / "run", unique("t2n")
    res = launch(*PROFILE, "--nodes", "2", "--wait", "--quiet", DIGITS, f"run.dir={run}", f"run.name={name}",
                 shards, *TINY, "train.steps=12", "checkpoint.every=6")
    assert res.returncode == 0, res.stdout + res.stderr
    jid = job_id(run)
    assert f"submitted SLURM job {jid}: 2 node(s) x 1 task(s)" in res.stdout
    assert f"squeue -j {jid}" in res.stdout and "mlflow ui --backend-store-uri sqlite:///" in res.stdout
    assert "COMPLETED" in res.stdout and state(jid) == "COMPLETED"
    log = text(run / "launcher.log")
    assert "2 tasks (1/node) on n" in log and "COMPLETED: train.steps=12" in log, log
    hosts = log.split(" on ", 1)[1].split(",", 2)
    assert len({hosts[0], hosts[1].split()[0]}) == 2  # really two nodes
    for step in (6, 12):
        assert (run / "checkpoints" / f"step_{step:09d}" / "COMMITTED").exists()
    run_id = tracked_run(run)
    runs = mlflow_runs(run, name)
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"


@needs_trainer
def test_preempt_save_requeue_resume_one_mlflow_run(tmp_path, shards):
    """SIGUSR2 (what --signal=USR2@delay sends before the time limit) -> save, rank 0 requeues;
    then `scontrol requeue` (SIGTERM, SLURM requeues) -> save; the job ends at train.steps in one
    MLflow run."""
    run, name = tmp_path / "run", unique("rq")
    res = launch(*PROFILE, "--nodes", "2", DIGITS, f"run.dir={run}", f"run.name={name}", shards, *TINY,
                 "train.steps=120")
    assert res.returncode == 0, res.stdout + res.stderr
    jid = job_id(run)
    rank0 = run / "logs" / "submitit" / f"{jid}_0_log.out"
    wait_for(lambda: "progress step" in text(rank0) and tracked_run(run), "training to start", 300)
    first_run_id = tracked_run(run)
    subprocess.run(["scancel", "--signal=USR2", jid], check=True)
    wait_for(lambda: text(rank0).count("resumed step") >= 1 and "attempt 2 started" in text(run / "launcher.log"),
             "the requeued job to resume", 300)
    wait_for(lambda: "progress step" in text(rank0).rsplit("resumed step", 1)[1], "the resumed job to train", 300)
    subprocess.run(["scontrol", "requeue", jid], check=True)
    assert wait_final(jid) == "COMPLETED"

    log = text(run / "launcher.log")
    assert "PREEMPTED by SIGUSR2" in log and "requeued (1/5)" in log, log
    assert "STOPPED by SIGTERM" in log and "attempt 3 started" in log, log
    assert log.strip().splitlines()[-1].split(" ", 1)[1].startswith(f"job {jid} COMPLETED: train.steps=120"), log
    assert (run / "checkpoints" / "step_000000120" / "COMMITTED").exists()
    assert text(rank0).count("resumed step") == 2
    assert tracked_run(run) == first_run_id
    runs = mlflow_runs(run, name)
    assert [r.info.run_id for r in runs] == [first_run_id] and runs[0].info.status == "FINISHED"


def test_time_limit_requeues_then_stops_at_max_requeues(tmp_path, shards):
    """A real time limit: SLURM sends SIGUSR2 signal_delay_s before it; the stand-in trainer saves,
    the job is requeued once (launcher.max_requeues=1), and the second time it stops for good."""
    run = tmp_path / "run"
    res = launch(*PROFILE, "--nodes", "2", "--time", "2", "--wait", "--quiet", DIGITS, f"run.dir={run}",
                 f"run.name={unique('tl')}", shards, "train.steps=100000", "launcher.signal_delay_s=70",
                 "launcher.max_requeues=1", "launcher.entry=ebmscale.launch.selftest:main", timeout=900)
    jid = job_id(run)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "RequeueLimitReached" in res.stderr and state(jid) == "FAILED"
    log = text(run / "launcher.log")
    assert "PREEMPTED by SIGUSR2" in log and "requeued (1/1)" in log, log
    assert "STOPPED: SIGUSR2" in log and "launcher.max_requeues=1" in log, log
    st = json.loads(text(run / "selftest.json"))
    assert len(st["attempts"]) == 2 and st["attempts"][1]["start_step"] > 0
    assert st["outcome"] == "preempted" and st["step"] > st["attempts"][1]["start_step"]


@pytest.mark.parametrize("args,key", [
    (["model.arch=bogus"], "model.arch"),
    (["data.shards=/nonexistent/x-{000000..000003}.tar"], "data.shards"),
    (["--nodes", "9"], "launcher.nodes"),
    (["launcher.cpus_per_task=64"], "launcher.cpus_per_task"),
    (["--gpus-per-node", "1"], "launcher.gpus_per_node"),  # the test cluster's nodes have no GPUs
    (["--partition", "nosuchpart"], "launcher.partition"),
])
def test_config_error_reported_before_any_job_exists(tmp_path, shards, args, key):
    name = unique("err")
    res = launch(*PROFILE, DIGITS, f"run.dir={tmp_path / 'run'}", f"run.name={name}", shards, *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("config error: ") and key in res.stderr, res.stderr
    assert "submitted" not in res.stdout
    assert jobs_named(name) == ""


def test_dry_run_submits_nothing(tmp_path, shards):
    name = unique("dry")
    run = tmp_path / "run"
    res = launch(*PROFILE, "--nodes", "2", "--dry-run", DIGITS, f"run.dir={run}", f"run.name={name}", shards)
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --nodes=2" in res.stdout and "#SBATCH --requeue" in res.stdout
    assert "#SBATCH --signal=USR2@60" in res.stdout and "#SBATCH --partition=debug" in res.stdout
    assert "slurm: Job" in res.stdout  # sbatch --test-only accepted it
    assert jobs_named(name) == "" and not run.exists()


@needs_trainer
def test_sbatch_example_without_submitit(tmp_path, shards):
    """slurm/sbatch_example.sh: plain srun of `python -m ebmscale.train.main`; SIGUSR1 -> exit 3 -> the
    batch script requeues -> resumes -> completes."""
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = tmp_path / "job-%j.out"
    res = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                          "--gpus-per-node=0", "--time=15", f"--output={out}", f"--chdir={ROOT}",
                          str(ROOT / "slurm" / "sbatch_example.sh"), DIGITS, f"run.dir={run}", shards, *TINY,
                          "train.steps=60"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    jid = res.stdout.strip().split(";")[0]
    log = Path(str(out).replace("%j", jid))
    wait_for(lambda: "progress step" in text(log), "training to start", 300)
    subprocess.run(["scancel", "--signal=USR1", jid], check=True)
    assert wait_final(jid) == "COMPLETED", text(log)[-3000:]
    t = text(log)
    assert "attempt 2" in t and "requeueing" in t and "resumed step" in t, t[-3000:]
    assert (run / "checkpoints" / "step_000000060" / "COMMITTED").exists()


@pytest.mark.parametrize("user_set", [False, True])
def test_the_job_decides_its_accelerator_where_it_runs(tmp_path, shards, user_set):
    """The launcher imports ebmscale on the login node, which sets DS_ACCELERATOR=cpu there when it has no GPU;
    sbatch exports the submitting environment, so without the scrub a GPU node would obey it. The job's own
    environment (dumped by the batch script before anything of ours runs) has it only when the user set it."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "EBMSCALE_SET_DS_ACCELERATOR")}
    if user_set:
        env["DS_ACCELERATOR"] = "cpu"
    dump = tmp_path / "job_env.txt"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "launch.py"), *PROFILE, "--nodes", "1", "--wait",
                          "--quiet", DIGITS, f"run.dir={run}", f"run.name={unique('acc')}", shards, "train.steps=3",
                          "launcher.entry=ebmscale.launch.selftest:main", f"launcher.setup=['env > {dump}']"],
                         cwd=ROOT, env={**env, "EBMSCALE_SELFTEST_STEP_S": "0.05"}, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    job_env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert "SLURM_JOB_ID" in job_env  # really the job's environment
    assert "EBMSCALE_SET_DS_ACCELERATOR" not in job_env
    assert job_env.get("DS_ACCELERATOR") == ("cpu" if user_set else None)


@needs_trainer
def test_srun_gives_each_task_its_cpus(tmp_path, shards):
    """Slurm 22.05-23.02's srun does not inherit --cpus-per-task from sbatch: without it on the srun line (or
    SRUN_CPUS_PER_TASK) the step gets 1 CPU per task. The job step's allocation (sacct) and the rank's own view
    (its placement line: the affinity mask and SLURM_CPUS_PER_TASK) show the task's 2 CPUs."""
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "launch.py"), *PROFILE, "--nodes", "1", "--wait",
                          "--quiet", DIGITS, f"run.dir={run}", f"run.name={unique('cpus')}", shards, *TINY,
                          "train.steps=2", "launcher.cpus_per_task=2", "data.workers=0", "tracking.enabled=false"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    jid = job_id(run)
    steps = subprocess.run(["sacct", "-n", "-P", "-j", jid, "-o", "JobID,AllocCPUS"], capture_output=True,
                           text=True).stdout.split()
    assert f"{jid}.0|2" in steps, steps  # the srun step: 2 CPUs for its one task
    text = "".join(p.read_text(errors="replace") for p in (run / "logs").rglob("*.out"))
    line = next(x for x in text.splitlines() if "placement: rank 0/1" in x)
    assert "SLURM_CPUS_PER_TASK=2)" in line and "gpu none" in line, line
