"""The launcher without a cluster: config errors before submission, --dry-run's sbatch script,
profile/flag precedence, rank detection from fake SLURM / torchrun / submitit environments, the job's
requeue bookkeeping; and (slow) real --local runs through submitit's LocalExecutor."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest
from omegaconf import OmegaConf

from conftest import make_digits_shards
from ebmscale import distributed
from ebmscale.config import CONFIG_DIR, ConfigError
from ebmscale.launch import checks, cli, submit
from ebmscale.launch.job import TrainJob, adjust_for_attempt
from ebmscale.launch.resolve import resolve_config

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(CONFIG_DIR / "digits.yaml")


@pytest.fixture
def no_slurm(monkeypatch, tmp_path):
    """A PATH without sbatch/sinfo/squeue/scontrol, and a launcher that must not submit."""
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    def refuse(*a, **k):
        raise AssertionError("nothing may be submitted here")
    monkeypatch.setattr(submit, "submit_slurm", refuse)
    monkeypatch.setattr(submit, "submit_local", refuse)


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(checks, "check_data", lambda cfg: "data: (not checked in this test)")


def run_cli(argv, capsys):
    rc = cli.launch_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---- errors before submission -------------------------------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("model.arch=bogus", "model.arch"),
    ("model.nonsense=1", "model.nonsense"),
    ("buffer.capacity=8", "buffer.capacity"),
    ("launcher.time_min=1", "launcher.signal_delay_s"),
    ("run.dir=/proc/ebmscale-cannot-write", "run.dir"),
])
def test_config_error_exits_2_before_submission(no_slurm, fake_data, capsys, tmp_path, override, key):
    argv = ["--dry-run", DIGITS, f"run.dir={tmp_path / 'run'}", override]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2
    assert err.startswith("config error: ") and key in err
    assert len(err.strip().splitlines()) == 1, err  # one clear message, no traceback
    assert "#SBATCH" not in out


def test_missing_data_shards_is_a_config_error(no_slurm, capsys, tmp_path):
    rc, out, err = run_cli(["--dry-run", DIGITS, f"run.dir={tmp_path / 'run'}",
                            f"data.shards={tmp_path}/none-{{000000..000003}}.tar"], capsys)
    assert rc == 2 and "data.shards" in err


def test_unbuildable_model_is_a_config_error(no_slurm, fake_data, capsys, tmp_path, monkeypatch):
    import ebmscale.models

    def broken(cfg):
        raise RuntimeError("size mismatch in block 3")
    monkeypatch.setattr(ebmscale.models, "build_model", broken)
    rc, out, err = run_cli(["--dry-run", DIGITS, f"run.dir={tmp_path / 'run'}"], capsys)
    assert rc == 2 and err.startswith("config error: model:") and "size mismatch" in err


def test_slurm_launch_without_sbatch_is_a_clear_error(no_slurm, fake_data, capsys, tmp_path):
    rc, out, err = run_cli([DIGITS, f"run.dir={tmp_path / 'run'}"], capsys)
    assert rc == 2 and "sbatch is not on PATH" in err and "--local" in err


def test_run_folder_in_use_by_a_live_job(no_slurm, fake_data, capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # submitit"])
    try:
        (run / "launch.json").write_text(json.dumps({"executor": "local", "job_id": str(proc.pid),
                                                     "pid": proc.pid}))
        rc, out, err = run_cli(["--dry-run", DIGITS, f"run.dir={run}"], capsys)
        assert rc == 2 and "in use" in err and str(proc.pid) in err
    finally:
        proc.kill()
        proc.wait()
    rc, out, err = run_cli(["--dry-run", DIGITS, f"run.dir={run}"], capsys)
    assert rc == 0, err


# ---- --dry-run -----------------------------------------------------------------------------------
def test_dry_run_prints_sbatch_script_and_config(no_slurm, fake_data, capsys, tmp_path):
    run = tmp_path / "runs" / "r1"
    rc, out, err = run_cli(["--dry-run", "--nodes", "3", "--time", "90", "--partition", "cpu", "--account", "proj",
                            DIGITS, f"run.dir={run}", "launcher.signal_delay_s=150",
                            "launcher.setup=[module load foo]"], capsys)
    assert rc == 0, err
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=USR2@150",
                 "#SBATCH --requeue", "#SBATCH --time=90", "#SBATCH --partition=cpu", "#SBATCH --account=proj",
                 "#SBATCH --open-mode=append", f"#SBATCH --output={run}/logs/submitit/%j_0_log.out",
                 f"#SBATCH --chdir={os.getcwd()}", "module load foo", "export SUBMITIT_EXECUTOR=slurm"):
        assert line in out, line
    assert "--kill-on-bad-exit=1" in out and "-m submitit.core._submit" in out
    assert f"export PATH={Path(sys.executable).parent}" in out  # the venv's ninja first
    cfg = OmegaConf.create(out.split("# ---- resolved config ----", 1)[1])
    assert cfg.launcher.nodes == 3 and cfg.launcher.time_min == 90 and cfg.run.dir == str(run)
    assert not run.exists() and not run.parent.exists()  # a dry run creates nothing


def test_dry_run_gpu_nodes_one_task_per_gpu(no_slurm, fake_data, capsys, tmp_path):
    rc, out, err = run_cli(["--dry-run", "--nodes", "4", str(CONFIG_DIR / "imagenet128.yaml"),
                            f"run.dir={tmp_path / 'in128'}"], capsys)
    assert rc == 0, err
    assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --ntasks-per-node=8" in out
    assert "#SBATCH --nodes=4" in out and "#SBATCH --cpus-per-task=10" in out and "#SBATCH --time=2880" in out
    rc, out, err = run_cli(["--dry-run", "--nproc", "2", str(CONFIG_DIR / "imagenet128.yaml"),
                            f"run.dir={tmp_path / 'in128'}"], capsys)
    assert rc == 2 and "one task per GPU" in err


def test_dry_run_local(no_slurm, fake_data, capsys, tmp_path):
    rc, out, err = run_cli(["--dry-run", "--local", "--nproc", "3", DIGITS, f"run.dir={tmp_path / 'r'}"], capsys)
    assert rc == 0, err
    assert "3 process(es) on this machine" in out and "#SBATCH" not in out
    rc, out, err = run_cli(["--dry-run", "--local", "--nodes", "2", DIGITS, f"run.dir={tmp_path / 'r'}"], capsys)
    assert rc == 2 and "launcher.nodes" in err


def test_rendered_script_is_what_submitit_writes(tmp_path, monkeypatch):
    """--dry-run's script and the one SlurmExecutor submits come from the same parameters."""
    import submitit
    cfg = resolve_config(DIGITS, [f"run.dir={tmp_path}", "launcher.nodes=2"])
    folder = submit.submitit_folder(tmp_path)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    ex = submitit.SlurmExecutor(folder=folder)
    ex.update_parameters(**submit.slurm_parameters(cfg))
    assert ex._make_submission_file_text(ex._submitit_command_str, "x") == submit.render_sbatch(cfg, folder)


# ---- precedence ----------------------------------------------------------------------------------
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_profile_under_config_under_overrides_under_flags(tmp_path, monkeypatch):
    prof = _write(tmp_path / "site.yaml", "launcher:\n  partition: pprof\n  time_min: 11\n  cpus_per_task: 3\n"
                                          "  account: acct-prof\n  setup: ['module load x']\ntrain:\n  threads: 4\n")
    exp = OmegaConf.load(DIGITS)
    exp.launcher = {"time_min": 22, "cpus_per_task": 5}
    conf = _write(tmp_path / "exp.yaml", OmegaConf.to_yaml(exp))

    cfg = resolve_config(conf, [], {}, prof)
    assert cfg.launcher.partition == "pprof"  # profile fills what the config leaves open
    assert cfg.launcher.time_min == 22 and cfg.launcher.cpus_per_task == 5  # config beats profile
    assert cfg.train.threads == 4 and cfg.launcher.setup == ["module load x"]
    assert cfg.launcher.profile == prof

    cfg = resolve_config(conf, ["launcher.time_min=33", "launcher.partition=pover"], {}, prof)
    assert cfg.launcher.time_min == 33 and cfg.launcher.partition == "pover"  # overrides beat both

    cfg = resolve_config(conf, ["launcher.time_min=33"], {"time": 44, "partition": "pflag", "nodes": 2,
                                                           "account": None}, prof)
    assert (cfg.launcher.time_min, cfg.launcher.partition, cfg.launcher.nodes) == (44, "pflag", 2)  # flags win
    assert cfg.launcher.account == "acct-prof"  # an absent flag changes nothing


def test_profile_selection_order(tmp_path, monkeypatch):
    a = _write(tmp_path / "a.yaml", "launcher:\n  partition: from-a\n")
    b = _write(tmp_path / "b.yaml", "launcher:\n  partition: from-b\n")
    c = _write(tmp_path / "c.yaml", "launcher:\n  partition: from-env\n")
    monkeypatch.setenv("EBMSCALE_PROFILE", c)
    assert resolve_config(DIGITS).launcher.partition == "from-env"
    assert resolve_config(DIGITS, [f"launcher.profile={a}"]).launcher.partition == "from-a"
    assert resolve_config(DIGITS, [f"launcher.profile={a}"], profile=b).launcher.partition == "from-b"


def test_shipped_profiles_load_and_unknown_profile_lists_them():
    for name in ("generic-gpu", "local-test", "generic-cpu"):
        assert resolve_config(DIGITS, profile=name).launcher.profile == name
    assert resolve_config(DIGITS, profile="local-test").launcher.partition == "debug"
    with pytest.raises(ConfigError, match="generic-gpu.*local-test|local-test.*generic-gpu"):
        resolve_config(DIGITS, profile="no-such-site")


def test_bad_key_in_profile_names_the_profile(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "launcher:\n  partitoin: x\n")
    with pytest.raises(ConfigError, match="bad.yaml.*partitoin"):
        resolve_config(DIGITS, profile=bad)


# ---- ebmscale.distributed ------------------------------------------------------------------------
def test_detect_slurm_step(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: submitit's node list parser
    env = {"SLURM_JOB_ID": "12345", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
           "SLURM_STEP_NODELIST": "gpu[003-004,007],gpu010", "SLURM_JOB_NODELIST": "gpu[003-004,007],gpu010"}
    d = distributed.detect(env, backend="gloo")
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (3, 8, 1, 2)
    assert (d.master_addr, d.master_port, d.backend) == ("gpu003", 20000 + 12345 % 12000, "gloo")
    assert distributed.source(env) == "slurm" and len(d) == 7
    d = distributed.detect({**env, "MASTER_ADDR": "head", "MASTER_PORT": "29999"}, backend="gloo")
    assert (d.master_addr, d.master_port) == ("head", 29999)  # sbatch_example.sh's exports win
    uneven = {**env, "SLURM_NODEID": "3", "SLURM_STEP_TASKS_PER_NODE": "3(x3),1", "SLURM_STEP_NUM_TASKS": "10"}
    assert distributed.detect(uneven, backend="gloo").local_world_size == 1


def test_detect_order_torchrun_local_single(monkeypatch):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "n1"}
    tr = {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
          "MASTER_PORT": "1234"}
    d = distributed.detect({**slurm, **tr}, backend="gloo")
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port) == (5, 6, 1, "h", 1234)
    assert distributed.source({**slurm, **tr}) == "torchrun"
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
             "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_ID": "4242", "MASTER_PORT": "31000"}
    d = distributed.detect({**slurm, **local}, backend="gloo")  # --local inside an salloc shell
    assert (d.rank, d.world_size, d.local_world_size, d.master_addr, d.master_port) == (1, 2, 2, "127.0.0.1", 31000)
    assert distributed.source({**slurm, **local}) == "submitit-local"
    d = distributed.detect({}, backend="gloo")
    assert (d.rank, d.world_size, d.master_addr) == (0, 1, "127.0.0.1") and d.master_port > 0
    assert distributed.source({}) == "single"


def test_detect_batch_script_is_not_a_step():
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"}
    with pytest.warns(UserWarning, match="not an srun task"):
        d = distributed.detect(env, backend="gloo")
    assert d.world_size == 1


def test_export_never_touches_cuda_visible_devices():
    env = {"CUDA_VISIBLE_DEVICES": "3,4"}
    distributed.export(distributed.Dist(1, 2, 1, 2, "h", 1234, "nccl"), env)
    assert env["CUDA_VISIBLE_DEVICES"] == "3,4"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("1", "2", "1", "h", "1234")


def test_tasks_per_node_spec():
    assert distributed.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert distributed.expand_tasks_per_node("8") == [8]


# ---- the job object --------------------------------------------------------------------------------
def test_job_pickles_and_checkpoint_only_describes_the_resubmission(tmp_path):
    cfg = resolve_config(DIGITS, [f"run.dir={tmp_path}"])
    job = cloudpickle.loads(cloudpickle.dumps(TrainJob(cfg)))
    assert job.cfg["run"]["dir"] == str(tmp_path) and job.requeues == 0
    before = sorted(tmp_path.iterdir())
    again = job.checkpoint()
    assert isinstance(again.function, TrainJob) and again.function.requeues == 1
    assert again.function.cfg == job.cfg
    assert sorted(tmp_path.iterdir()) == before  # no I/O


def test_requeued_attempt_continues_its_own_run(tmp_path):
    cfg = resolve_config(DIGITS, [f"run.dir={tmp_path}", "run.overwrite=true", "checkpoint.resume=never"])
    assert adjust_for_attempt(cfg, 0).run.overwrite is True
    a = adjust_for_attempt(cfg, 1)
    assert a.run.overwrite is False and a.checkpoint.resume == "never"  # nothing saved yet: as configured
    (tmp_path / "checkpoints" / "step_000000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000000010" / "COMMITTED").touch()
    assert adjust_for_attempt(cfg, 1).checkpoint.resume == "auto"


def test_train_cli_arguments():
    assert cli.parse_train_args(["c.yaml", "a=1", "b.c=2"]) == ("c.yaml", ["a=1", "b.c=2"])
    rc = cli.train_main([DIGITS, "model.arch=bogus"], entry=lambda cfg: None)
    assert rc == 2


# ---- real local runs (slow) ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    pytest.importorskip("sklearn")
    out = make_digits_shards(ROOT / "data" / "digits")
    return f"data.shards={out}/digits-{{000000..000003}}.tar"


def _launch(args, env=None, **kw):
    env = {**os.environ, "EBMSCALE_SELFTEST_STEP_S": "0.1", **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / "launch.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _task_pids(folder: Path):
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"submitit.core._submit" in cmd and str(folder).encode() in cmd:
                pids.append(int(p.name))
    return pids


@pytest.mark.slow
def test_local_launch_preempt_requeue_resume(tmp_path, digits_shards):
    """--local: SIGUSR2 to every task -> stop at a step boundary, save, rank 0 requeues (exit 144),
    submitit's controller restarts the tasks, they resume from the saved step and complete."""
    run = tmp_path / "run"
    proc = _launch(["--local", "--nproc", "2", DIGITS, f"run.dir={run}", digits_shards, "train.steps=150",
                    "checkpoint.every=1000", "train.log_every=10", "launcher.entry=ebmscale.launch.selftest:main"])
    state = run / "selftest.json"
    deadline = time.time() + 240

    def training() -> bool:
        logs = list(run.glob("logs/submitit/*_0_log.out"))
        return bool(logs) and "[selftest] step 10/" in logs[0].read_text(errors="replace")
    while not training():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the local job did not start training:\n{proc.communicate()[0]}")
        time.sleep(0.2)
    pids = _task_pids(run / "logs" / "submitit")
    assert len(pids) == 2, pids
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "COMPLETED" in out and f"run folder: {run}" in out
    log = (run / "launcher.log").read_text()
    assert "PREEMPTED by SIGUSR2" in log and "requeued (1/" in log and "attempt 2 started" in log, log
    assert "COMPLETED" in log.splitlines()[-1]
    s = json.loads(state.read_text())
    assert s["step"] == 150 and s["outcome"] == "completed"
    assert len(s["attempts"]) == 2 and 0 < s["attempts"][1]["start_step"] < 150


@pytest.mark.slow


def wait_for_selftest_step(proc, run: Path, step: int = 10, timeout_s: float = 240) -> None:
    """Until rank 0 of a local selftest job logs `step`; the launcher's output in the error if it never does."""
    deadline = time.time() + timeout_s
    while f"[selftest] step {step}/" not in "".join(p.read_text(errors="replace")
                                                   for p in run.glob("logs/submitit/*_0_log.out")):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the local job did not start training:\n{proc.communicate()[0]}")
        time.sleep(0.2)


def test_local_launch_sigterm_stops_gracefully(tmp_path, digits_shards):
    """SIGTERM to the launcher (a CI timeout, `kill`): the tasks checkpoint and stop; no orphans."""
    run = tmp_path / "run"
    proc = _launch(["--local", "--nproc", "2", DIGITS, f"run.dir={run}", digits_shards, "train.steps=100000",
                    "train.log_every=10", "launcher.entry=ebmscale.launch.selftest:main"])
    wait_for_selftest_step(proc, run)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    assert "STOPPED" in out and "Relaunch the same command to resume" in out
    assert "STOPPED by SIGTERM" in (run / "launcher.log").read_text()
    s = json.loads((run / "selftest.json").read_text())
    assert s["outcome"] == "preempted" and s["step"] >= 10
    assert _task_pids(run / "logs" / "submitit") == []


@pytest.mark.slow
def test_local_launch_failing_rank_is_reported(tmp_path, digits_shards):
    run = tmp_path / "run"
    proc = _launch(["--local", "--nproc", "2", "--quiet", DIGITS, f"run.dir={run}", digits_shards,
                    "launcher.entry=ebmscale.launch.no_such_module:main"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "FAILED" in out and "ModuleNotFoundError" in out and "last lines of rank" in out
    assert "FAILED on rank 0" in (run / "launcher.log").read_text()


def _results(folder: Path, job_id: str, per_rank: dict) -> None:
    from submitit.core.utils import JobPaths, cloudpickle_dump
    for rank, result in per_rank.items():
        path = JobPaths(folder, job_id=job_id, task_id=rank).result_pickle
        path.parent.mkdir(parents=True, exist_ok=True)
        cloudpickle_dump(result, path)


def test_report_names_a_silent_rank_as_hung_but_not_a_stuck_loader(tmp_path, capsys):
    from ebmscale.train.heartbeat import Heartbeat
    folder = tmp_path / "logs"
    Heartbeat(tmp_path, 1).beat(17)
    gloo = "RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation"
    _results(folder, "7", {0: ("error", gloo)})  # rank 1 left no result
    assert submit.report(folder, "7", 2, tmp_path, "FAILED") == 4
    err = capsys.readouterr().err
    assert f"HUNG: job 7, rank 1 on {os.uname().nodename} (pid {os.getpid()}), last heard at step 17" in err
    assert "rank(s) 0 failed waiting for it" in err
    loader = "ebmscale.data.stream.LoaderTimeout: rank 0 on h: no batch ... data.loader_timeout_s=600 s"
    _results(folder, "8", {0: ("error", loader), 1: ("error", gloo)})
    assert submit.report(folder, "8", 2, tmp_path, "FAILED") == 1
    assert "FAILED: job 8, rank 0 raised: ebmscale.data.stream.LoaderTimeout" in capsys.readouterr().err


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_named_with_exit_code_4(tmp_path, digits_shards):
    """Rank 1 stops answering (SIGSTOP: a stuck driver, a frozen NFS read): rank 0 gives up in its next collective
    after the collective timeout, the launcher kills what is left and names rank 1, its host and its last step."""
    run = tmp_path / "run"
    proc = _launch(["--local", "--nproc", "2", DIGITS, f"run.dir={run}", digits_shards, "model.filters=8",
                    "sampler.steps=5", "train.steps=100000", "train.log_every=5", "train.threads=1",
                    "tracking.enabled=false"], env={"EBMSCALE_DIST_TIMEOUT_S": "30"})
    beat, deadline = run / "heartbeat" / "rank_00001.json", time.time() + 400
    try:
        while not (beat.exists() and (json.loads(beat.read_text() or "{}").get("step") or 0) >= 5):
            assert proc.poll() is None and time.time() < deadline, "the job did not start training"
            time.sleep(0.5)
        hung = json.loads(beat.read_text())["pid"]
        os.kill(hung, signal.SIGSTOP)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _task_pids(run / "logs" / "submitit"):  # a failed run must not leave a stopped rank behind
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 4, out
    assert re.search(rf"HUNG: job \S+, rank 1 on \S+ \(pid {hung}\), last heard at step \d+", out), out
    assert "rank(s) 0 failed waiting for it in a collective" in out
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
    assert _task_pids(run / "logs" / "submitit") == []


def test_report_names_the_hung_rank_when_nccl_aborted_the_others_without_a_result(tmp_path, capsys):
    """NCCL's watchdog aborts a timed-out rank (SIGABRT): no Python result anywhere. The rank aborted inside a
    collective is the victim (its faulthandler stacks say so); the other silent one hung."""
    from submitit.core.utils import JobPaths
    from ebmscale.train.heartbeat import Heartbeat
    folder = tmp_path / "logs"
    Heartbeat(tmp_path, 1).beat(17)
    stacks = ('Fatal Python error: Aborted\n\nThread 0x1 (most recent call first):\n  File "/v/torch/distributed/'
              'distributed_c10d.py", line 2806 in all_reduce\n  File "/e/ebmscale/train/guard.py", line 97 in check\n')
    for r, text in ((0, stacks), (1, "training step 17\n")):
        paths = JobPaths(folder, job_id="9", task_id=r)
        paths.stderr.parent.mkdir(parents=True, exist_ok=True)
        paths.stderr.write_text(text)
    assert submit.report(folder, "9", 2, tmp_path, "FAILED") == 4
    err = capsys.readouterr().err
    assert f"HUNG: job 9, rank 1 on {os.uname().nodename} (pid {os.getpid()}), last heard at step 17" in err
    assert "rank(s) 0 were aborted waiting for it in a collective" in err
    JobPaths(folder, job_id="9", task_id=1).stderr.write_text(stacks)  # both aborted, same step: no verdict
    Heartbeat(tmp_path, 0).beat(17)
    assert submit.report(folder, "9", 2, tmp_path, "FAILED") == 1


def test_report_names_the_task_srun_saw_die_first(tmp_path, capsys):
    """SLURM: a rank killed outright (SIGKILL, out of memory) leaves no result, and srun --kill-on-bad-exit stops the
    others without one either; srun's own first error line names it."""
    from submitit.core.utils import JobPaths
    folder = tmp_path / "logs"
    paths = JobPaths(folder, job_id="5", task_id=0)
    paths.stdout.parent.mkdir(parents=True)
    paths.stdout.write_text("step 24\nsrun: error: n2: task 7: Killed\nsrun: Job step aborted\n"
                            "srun: error: n1: tasks 0-3: Killed\n")
    assert submit.first_failed_task(paths.stdout.read_text()) == (7, "Killed")
    assert submit.report(folder, "5", 16, tmp_path, "FAILED") == 1
    assert "FAILED: job 5: rank 7 died first (Killed" in capsys.readouterr().err


@pytest.mark.slow
def test_a_rank_aborted_in_a_collective_names_the_hung_rank(tmp_path, digits_shards):
    """What NCCL does, on CPU: rank 1 hangs (SIGSTOP), rank 0 is aborted while waiting for it (SIGABRT, as NCCL's
    watchdog aborts a timed-out rank: no Python exception, no result). The report names rank 1 with exit 4."""
    run = tmp_path / "run"
    proc = _launch(["--local", "--nproc", "2", DIGITS, f"run.dir={run}", digits_shards, "model.filters=8",
                    "sampler.steps=5", "train.steps=100000", "train.log_every=5", "train.threads=1",
                    "tracking.enabled=false"], env={"EBMSCALE_DIST_TIMEOUT_S": "300"})
    beats, deadline = run / "heartbeat", time.time() + 400
    try:
        while not ((beats / "rank_00001.json").exists() and (beats / "rank_00000.json").exists() and
                   (json.loads((beats / "rank_00001.json").read_text() or "{}").get("step") or 0) >= 5):
            assert proc.poll() is None and time.time() < deadline, "the job did not start training"
            time.sleep(0.5)
        hung = json.loads((beats / "rank_00001.json").read_text())["pid"]
        os.kill(hung, signal.SIGSTOP)
        time.sleep(5)  # rank 0 reaches the next collective and waits in it
        os.kill(json.loads((beats / "rank_00000.json").read_text())["pid"], signal.SIGABRT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _task_pids(run / "logs" / "submitit"):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 4, out
    assert re.search(rf"HUNG: job \S+, rank 1 on \S+ \(pid {hung}\), last heard at step \d+", out), out
    assert "rank(s) 0 were aborted waiting for it in a collective" in out


@pytest.mark.slow
def test_local_launch_trains_digits(tmp_path, digits_shards):
    """The CPU demo path with the real trainer: 2 processes, DeepSpeed over gloo."""
    if not (ROOT / "ebmscale" / "train" / "main.py").exists():
        pytest.skip("the trainer (ebmscale/train/main.py) is not there yet")
    run = tmp_path / "run"
    proc = _launch(["--local", "--quiet", DIGITS, f"run.dir={run}", digits_shards, "model.filters=8",
                    "sampler.steps=5", "train.steps=12", "checkpoint.every=6", "train.log_every=4",
                    "train.threads=1"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"run folder: {run}" in out
    assert (run / "checkpoints" / "step_000000012" / "COMMITTED").exists()
    assert json.loads((run / "tracking.json").read_text())["run_id"]


@pytest.mark.slow
def test_a_finished_job_exits_while_its_data_stream_is_still_referenced(tmp_path, digits_shards):
    """digits.yaml reads with a loader worker, and loader workers block SIGTERM (shield_helper_processes), so
    multiprocessing's exit handler cannot stop them: main must close its stream, or a job that finished training
    hangs at exit (seen once in the demo; certain here, where the entry keeps the stream referenced)."""
    run = tmp_path / "run"
    proc = _launch(["--local", "--quiet", DIGITS, f"run.dir={run}", digits_shards, "model.filters=8",
                    "sampler.steps=5", "train.steps=6", "checkpoint.every=6", "train.threads=1",
                    "launcher.entry=keep_stream_entry:main"],
                   env={"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])})
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        for pid in _task_pids(run / "logs" / "submitit"):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        raise AssertionError(f"the job did not exit after training:\n{proc.communicate()[0][-3000:]}") from None
    assert proc.returncode == 0, out
    assert (run / "checkpoints" / "step_000000006" / "COMMITTED").exists()


def test_gres_gpus_reads_sinfos_gpu_counts():
    from ebmscale.launch.checks import gres_gpus
    assert gres_gpus("gpu:8") == 8 and gres_gpus("gpu:a100:4(S:0-1)") == 4
    assert gres_gpus("gpu:a100:4(S:0-1),gpu:v100:2") == 6 and gres_gpus("(null)") == 0
    assert gres_gpus("craynetwork:4,gpu:h100:8(S:0-1)") == 8


def test_a_launch_that_lost_the_race_does_not_overwrite_the_winners_launch_json(tmp_path, monkeypatch):
    from ebmscale.launch import checks, submit
    monkeypatch.setattr(checks, "slurm_state", lambda job: "RUNNING" if job == "100" else "GONE")
    submit.write_launch_info(tmp_path, {"executor": "slurm", "job_id": "100"})
    submit.write_launch_info(tmp_path, {"executor": "slurm", "job_id": "101"})  # both passed the check at once
    assert json.loads((tmp_path / "launch.json").read_text())["job_id"] == "100"
    assert json.loads((tmp_path / "launch.101.json").read_text())["job_id"] == "101"
    monkeypatch.setattr(checks, "slurm_state", lambda job: "COMPLETED")  # the winner ended: the next launch is named
    submit.write_launch_info(tmp_path, {"executor": "slurm", "job_id": "102"})
    assert json.loads((tmp_path / "launch.json").read_text())["job_id"] == "102"
