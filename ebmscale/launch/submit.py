"""Submit a TrainJob through submitit: SLURM (sbatch + srun) or this machine (LocalExecutor)."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from ebmscale.config import ConfigError
from ebmscale.launch.checks import FINAL_STATES, job_alive, slurm_state, tasks_per_node
from ebmscale.launch.job import LOG_NAME, TrainJob
from ebmscale.distributed import free_port
from ebmscale.progress import Console
from ebmscale.train.heartbeat import last_beat, read_beat

# variables of an outer launcher that must not leak into the job (they would override the job's own)
SCRUB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
         "ROLE_RANK", "TORCHELASTIC_RUN_ID")
SUBMITIT_DIR = "logs/submitit"  # under logs/, where tools/status.py looks


def submitit_folder(out: Path) -> Path:
    return out / SUBMITIT_DIR


@contextlib.contextmanager
def scrubbed_env():
    """While submitting: no outer launcher's variables, and nothing ebmscale itself set on this machine
    (DS_ACCELERATOR=cpu on a login node without GPUs): the job decides those where it runs. Our own setting comes
    back afterwards (this process may still import DeepSpeed); the outer launcher's do not."""
    for k in SCRUB:
        os.environ.pop(k, None)
    ours = os.environ.get("EBMSCALE_SET_DS_ACCELERATOR")
    mine = {k: os.environ.pop(k) for k in ("EBMSCALE_SET_DS_ACCELERATOR", "DS_ACCELERATOR")
            if ours and os.environ.get("DS_ACCELERATOR") == ours and k in os.environ}
    try:
        yield
    finally:
        os.environ.update(mine)


def setup_lines(cfg: DictConfig) -> List[str]:
    """Shell lines run before the tasks start: the venv's bin first on PATH (one `ninja` for
    DeepSpeed's op builds, the python that submitted), then the site's launcher.setup."""
    bindir = str(Path(sys.executable).parent)
    return [f"export PATH={shlex.quote(bindir)}:\"$PATH\""] + list(cfg.launcher.setup)


def slurm_parameters(cfg: DictConfig) -> Dict[str, Any]:
    lc = cfg.launcher
    extra = OmegaConf.to_container(lc.additional_parameters, resolve=True) if lc.additional_parameters else {}
    params: Dict[str, Any] = dict(
        job_name=cfg.run.name,
        nodes=lc.nodes,
        ntasks_per_node=tasks_per_node(lc),
        cpus_per_task=lc.cpus_per_task,
        time=lc.time_min,
        signal_delay_s=lc.signal_delay_s,
        stderr_to_stdout=True,
        # srun does not inherit --cpus-per-task from sbatch on Slurm 22.05-23.02 (each rank would get one core, its
        # loader workers included): the flag on submitit's srun line, and SRUN_CPUS_PER_TASK for any other srun
        setup=[f"export SRUN_CPUS_PER_TASK={lc.cpus_per_task}", *setup_lines(cfg)],
        srun_args=["--kill-on-bad-exit=1", f"--cpus-per-task={lc.cpus_per_task}"],
        additional_parameters={"requeue": True, "chdir": os.getcwd(), **extra},
    )
    if lc.gpus_per_node > 0:
        params["gpus_per_node"] = lc.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if lc[key]:
            params[key] = lc[key]
    if lc.mem_gb:
        params["mem"] = f"{int(lc.mem_gb)}GB"
    return params


def submitit_command(folder: Path) -> str:
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(cfg: DictConfig, folder: Path) -> str:
    """The sbatch script submitit will write for this config (same function, same parameters)."""
    from submitit.slurm.slurm import _make_sbatch_string
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **slurm_parameters(cfg))


def sbatch_test_only(script: str) -> str:
    """`sbatch --test-only`: SLURM checks partition, account, sizes and limits; nothing is queued."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(script)
    try:
        res = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"note: sbatch --test-only did not run ({e})"
    finally:
        os.unlink(f.name)
    msg = (res.stderr + res.stdout).strip()
    if res.returncode != 0:
        reason = msg.replace("sbatch: error: ", "").splitlines()
        raise ConfigError(f"launcher: SLURM refuses this job (sbatch --test-only): {'; '.join(reason)}; check "
                          f"launcher.partition / account / qos / time_min / nodes / cpus_per_task / gpus_per_node")
    return f"slurm: {msg.replace('sbatch: ', '')}"


def local_nproc(nproc: Optional[int]) -> Tuple[int, int]:
    """(processes, GPUs) for --local: --nproc, else one per visible GPU, else 2 CPU processes."""
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if nproc is not None:
        if nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {nproc}")
        if ngpu and nproc > ngpu:
            raise ConfigError(f"--nproc {nproc}: this machine has {ngpu} GPU(s) and ebmscale runs one process "
                              f"per GPU")
        return nproc, (nproc if ngpu else 0)
    return (ngpu, ngpu) if ngpu else (2, 0)


def _visible_gpus() -> Tuple[int, ...]:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    parts = [p.strip() for p in vis.split(",") if p.strip()]
    return tuple(int(p) for p in parts) if parts and all(p.isdigit() for p in parts) else ()


def write_launch_info(out: Path, info: Dict[str, Any]) -> None:
    """RUN/launch.json names the job that writes the folder (status, stop, the next launch's check). A launch that
    lost a race to another one still alive (both passed the check in the same second) writes launch.<job>.json
    instead: its job will be refused by the writer lock, and launch.json keeps naming the winner."""
    info = {**info, "submitted": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "cwd": os.getcwd(), "command": sys.argv}
    path = out / "launch.json"
    try:
        current = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        current = {}
    if isinstance(current, dict) and str(current.get("job_id")) != str(info["job_id"]) and job_alive(current):
        path = out / f"launch.{info['job_id']}.json"
        print(f"[launch] warning: {out / 'launch.json'} names {current.get('executor')} job {current.get('job_id')}, "
              f"still alive: this job will find the folder in use; its record is {path.name}", file=sys.stderr)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, path)


def submit_slurm(cfg: DictConfig):
    import submitit
    out = Path(cfg.run.dir)
    folder = submitit_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=max(cfg.launcher.max_requeues, 1))
    ex.update_parameters(**slurm_parameters(cfg))
    with scrubbed_env():
        job = ex.submit(TrainJob(cfg))
    write_launch_info(out, {"executor": "slurm", "job_id": job.job_id, "submitit_folder": str(folder),
                            "ntasks": cfg.launcher.nodes * tasks_per_node(cfg.launcher),
                            "log": str(folder / f"{job.job_id}_0_log.out")})
    return job


def submit_local(cfg: DictConfig, nproc: int, ngpu: int):
    import submitit
    out = Path(cfg.run.dir)
    folder = submitit_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=max(cfg.launcher.max_requeues, 1))
    # no `setup` lines here: they would put a shell between us and submitit's controller, and
    # launcher.setup is for cluster nodes; the venv's bin goes first on PATH through our environment
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    params: Dict[str, Any] = dict(timeout_min=cfg.launcher.time_min, tasks_per_node=nproc,
                                  gpus_per_node=ngpu, signal_delay_s=cfg.launcher.signal_delay_s,
                                  stderr_to_stdout=True)
    if ngpu and _visible_gpus():
        params["visible_gpus"] = _visible_gpus()
    ex.update_parameters(**params)
    # submitit's controller must outlive a Ctrl-C (it would kill the tasks at once): it and the tasks start with
    # SIGINT ignored, and the tasks turn it into a stop request (job.TrainJob, stop.install_interrupt_handler)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with scrubbed_env():
            os.environ["MASTER_ADDR"] = "127.0.0.1"  # one rendezvous for this launch: the tasks get our environment
            os.environ["MASTER_PORT"] = str(free_port())
            job = ex.submit(TrainJob(cfg))
    finally:
        signal.signal(signal.SIGINT, previous)
        for k in ("MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
    write_launch_info(out, {"executor": "local", "job_id": job.job_id, "pid": job.job_id, "ntasks": nproc,
                            "submitit_folder": str(folder), "log": str(folder / f"{job.job_id}_0_log.out")})
    return job


# ---- waiting and reporting ----------------------------------------------------------------------
def _log_path(folder: Path, job_id: str, rank: int) -> Path:
    from submitit.core.utils import JobPaths
    return JobPaths(folder, job_id=job_id, task_id=rank).stdout


def task_result(folder: Path, job_id: str, rank: int) -> Tuple[Optional[str], Any]:
    from submitit.core.utils import JobPaths, pickle_load
    path = JobPaths(folder, job_id=job_id, task_id=rank).result_pickle
    if not path.exists():
        return None, None
    try:
        return pickle_load(path)
    except Exception as e:  # pragma: no cover
        return "error", f"unreadable result {path}: {e}"


def tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


class LogFollower:
    """Prints what a log file gains (the rank-0 log while waiting), line by line through progress.Console: plain
    lines in a file or pipe, a live progress bar in a terminal."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.pos, self.enabled, self.console = path, 0, enabled, Console()

    def poll(self) -> None:
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        if data:
            cut = data.rfind(b"\n") + 1  # whole lines only
            if cut:
                for line in data[:cut].decode(errors="replace").splitlines():
                    self.console.line(line)
                self.pos += cut

    def close(self) -> None:
        self.poll()
        self.console.close()


_PEER_ERRORS = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timeout", "NCCL",
                "Broken pipe", "ProcessGroup")


_ABORTED_IN_COLLECTIVE = ("Watchdog caught collective operation timeout", "ProcessGroupNCCL's watchdog")


def aborted_waiting(log_text: str) -> bool:
    """Whether a rank's log says it was aborted while waiting in a collective: NCCL's watchdog message, or the Python
    stacks that faulthandler writes on SIGABRT (train/main.py enables it) passing through a collective."""
    if any(m in log_text for m in _ABORTED_IN_COLLECTIVE):
        return True
    i = log_text.rfind("Fatal Python error: Aborted")
    return i >= 0 and any(m in log_text[i:] for m in ("torch/distributed/", "deepspeed/comm/"))


_SRUN_TASK_ERROR = re.compile(r"srun: error: \S+: tasks? (\d+)[^:]*: (Killed|Aborted|Segmentation fault|Terminated|"
                              r"Exited with exit code \d+)")


def first_failed_task(batch_log: str) -> Optional[tuple]:
    """(rank, how) of the first task srun reported dead in the batch script's output ("srun: error: n2: task 7:
    Killed"), before --kill-on-bad-exit stopped the rest; None if srun reported none."""
    m = _SRUN_TASK_ERROR.search(batch_log)
    return (int(m.group(1)), m.group(2)) if m else None


def _log_text(folder: Path, job_id: str, rank: int) -> str:
    from submitit.core.utils import JobPaths
    paths = JobPaths(folder, job_id=job_id, task_id=rank)
    return "".join(p.read_text(errors="replace") for p in (paths.stdout, paths.stderr) if p.exists())


def hung_among_aborted(folder: Path, job_id: str, silent: list, out: Path) -> Optional[int]:
    """No rank left a Python result (NCCL aborts a timed-out rank with SIGABRT): the hung rank is the silent one that
    was not aborted waiting in a collective, or else the one whose heartbeat is furthest behind (lower step, then
    older). None when nothing tells them apart."""
    waiting = {r for r in silent if aborted_waiting(_log_text(folder, job_id, r))}
    others = [r for r in silent if r not in waiting]
    if waiting and len(others) == 1:
        return others[0]
    beats = {r: read_beat(out, r) for r in silent}
    if waiting and all(beats.values()):
        order = sorted(silent, key=lambda r: (beats[r]["step"], beats[r]["time"]))
        if beats[order[0]]["step"] < beats[order[1]]["step"]:
            return order[0]
    return None


EXIT_HUNG = 4  # a rank stopped answering and the others failed waiting for it (cli.py's docstring lists the codes)


def report(folder: Path, job_id: str, ntasks: int, out: Path, state: str) -> int:
    """Print the outcome from the tasks' result files; 0 completed, 3 stopped/preempted, 4 a rank hung or died
    silently (the others failed waiting for it), 1 failed."""
    results = {r: task_result(folder, job_id, r) for r in range(ntasks)}
    errors = {r: v for r, (kind, v) in results.items() if kind == "error"}
    silent = [r for r, (kind, _) in results.items() if kind is None]
    kind0, val0 = results[0]
    if not errors and kind0 == "success" and isinstance(val0, dict):
        outcome = val0.get("outcome")
        if outcome == "completed":
            print(f"COMPLETED: job {job_id} finished training (attempt {val0.get('attempt')}).")
            print(f"run folder: {out}")
            return 0
        print(f"STOPPED: job {job_id} ended with outcome '{outcome}' ({val0.get('reason') or 'stop request'}); a "
              f"committed checkpoint is in {out}/checkpoints. Relaunch the same command to resume.")
        print(f"run folder: {out}")
        return 3
    code = 1

    def peer_error(rank: int) -> bool:  # lost its peers (gloo says "Timed out"); a stuck loader is its own cause
        text = str(errors[rank])
        return "LoaderTimeout" not in text and any(p.lower() in text.lower() for p in _PEER_ERRORS)
    if errors and silent and all(peer_error(r) for r in errors):
        bad, code = silent[0], EXIT_HUNG
        first = first_failed_task(_log_text(folder, job_id, 0))  # SLURM: srun saw it die (SIGKILL, OOM, a segfault)
        bad, what = (first[0], f"died ({first[1]}, says srun)") if first and first[0] in silent else (bad, "stopped answering")
        print(f"HUNG: job {job_id}, rank {bad} {last_beat(out, bad) or '(no heartbeat file)'}, {what}; "
              f"rank(s) {', '.join(map(str, sorted(errors)))} failed waiting for it in a collective "
              f"(train.collective_timeout_s).", file=sys.stderr)
        for r in silent[1:]:
            print(f"  also silent: rank {r} {last_beat(out, r) or '(no heartbeat file)'}", file=sys.stderr)
    elif errors:
        # the root cause is usually the rank whose error is not about losing its peers
        bad = sorted(errors, key=lambda r: (peer_error(r), r))[0]
        last = [x for x in str(errors[bad]).strip().splitlines() if x.strip()]
        print(f"FAILED: job {job_id}, rank {bad} raised: {last[-1] if last else '?'}", file=sys.stderr)
        if len(errors) > 1:
            print(f"(ranks with errors: {', '.join(map(str, sorted(errors)))})", file=sys.stderr)
    elif len(silent) > 1 and (hung := hung_among_aborted(folder, job_id, silent, out)) is not None:
        bad, code = hung, EXIT_HUNG
        waited = [r for r in silent if r != bad]
        print(f"HUNG: job {job_id}, rank {bad} {last_beat(out, bad) or '(no heartbeat file)'}, stopped answering; "
              f"rank(s) {', '.join(map(str, waited))} were aborted waiting for it in a collective (NCCL's watchdog "
              f"after train.collective_timeout_s: SIGABRT, no Python result).", file=sys.stderr)
    elif silent and (first := first_failed_task(_log_text(folder, job_id, 0))) and first[0] in silent:
        bad, how = first
        where = last_beat(out, bad)
        print(f"FAILED: job {job_id}: rank {bad}{' ' + where if where else ''} died first ({how}: no Python result; "
              f"killed, out of memory or a node failure?); srun then stopped the other ranks", file=sys.stderr)
    else:
        bad = silent[0] if silent else 0
        print(f"FAILED: job {job_id} ended ({state}) without a result from rank {bad} "
              f"{last_beat(out, bad) or ''} (killed, out of memory, time limit or node failure?)", file=sys.stderr)
    log = _log_path(folder, job_id, bad)
    print(f"--- last lines of rank {bad}'s log {log} ---", file=sys.stderr)
    print(tail(log), file=sys.stderr)
    print("---", file=sys.stderr)
    print(f"run folder: {out}  (events: {out / LOG_NAME}; relaunching the same command resumes from the last "
          f"committed checkpoint)", file=sys.stderr)
    return code


def stop_now(job, grace_s: float = 0.0) -> None:
    """SIGKILL the tasks of a --local job, then its controller (the second Ctrl-C). With grace_s, first give the
    tasks that long to end by themselves (a terminal's Ctrl-C reached them too: rank 0 records INTERRUPTED)."""
    proc = getattr(job, "_process", None)
    if proc is None or proc.poll() is not None:
        return
    try:
        controller = psutil.Process(proc.pid)
        tasks = controller.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    if grace_s:
        _, tasks = psutil.wait_procs(tasks, timeout=grace_s)
    tree = tasks + [controller]
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, PermissionError, FileNotFoundError):
        return False
    except OSError:
        return True


def died_without_result(folder: Path, job_id: str, nproc: int, out: Path, since: float, log_from: int = 0) -> bool:
    """A --local rank of this job whose process is gone without a result (SIGABRT from NCCL's watchdog, SIGKILL,
    the OOM killer): the others would wait for it in a collective. Judged by the pid in its heartbeat (this host,
    beaten since `since`). Not after a requeue (launcher.log past byte `log_from`): requeued ranks exit without a
    result by design, and their successors beat only once they train."""
    try:
        with open(out / LOG_NAME, "rb") as f:
            f.seek(log_from)
            if b"requeued (" in f.read():
                return False
    except OSError:
        pass
    for r in range(nproc):
        b = read_beat(out, r)
        if b and b.get("time", 0) >= since and b.get("host") == socket.gethostname() and not _alive(int(b["pid"])) \
                and task_result(folder, job_id, r)[0] is None:
            return True
    return False


def wait_local(job, nproc: int, out: Path, follow: bool = True, peer_grace_s: float = 30.0) -> int:
    """Wait for a --local job. SIGTERM to the launcher, or a first Ctrl-C, stops the job gracefully (submitit's
    controller forwards SIGTERM to every task: they checkpoint at the next step boundary and exit); a second
    Ctrl-C stops it at once."""
    folder = submitit_folder(out)
    follower = LogFollower(_log_path(folder, job.job_id, 0), follow)
    first_error: Optional[float] = None

    def forward_term(signum, frame):
        print("[launch] SIGTERM: asking the tasks to checkpoint and stop", file=sys.stderr, flush=True)
        proc = getattr(job, "_process", None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, forward_term)
    interrupted, started = False, time.time()
    log_from = (out / LOG_NAME).stat().st_size if (out / LOG_NAME).exists() else 0
    try:
        while True:
            try:
                if job.done():
                    break
                follower.poll()
                # a crashed rank leaves the others blocked in a collective: stop the job after a grace period
                if any(task_result(folder, job.job_id, r)[0] == "error" for r in range(nproc)) or \
                        died_without_result(folder, job.job_id, nproc, out, started, log_from):
                    first_error = first_error or time.time()
                    if time.time() - first_error > peer_grace_s:
                        stop_now(job)  # what still runs is stuck (hung, SIGSTOPped): it would ignore a cancel
                        break
                time.sleep(0.5)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                print("\n[launch] Ctrl-C: stopping at the next step boundary, saving a checkpoint (Ctrl-C again "
                      "to stop now)", file=sys.stderr, flush=True)
                forward_term(signal.SIGTERM, None)  # the tasks had it from the terminal too, unless sent to us alone
    except KeyboardInterrupt:
        follower.close()
        stop_now(job, grace_s=5.0)
        print(f"\ninterrupted: the local job was stopped now. Relaunch the same command to resume from the last "
              f"committed checkpoint in {out}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    follower.close()
    return report(folder, job.job_id, nproc, out, job.state)


def wait_slurm(job_id: str, ntasks: int, out: Path, follow: bool = True, poll_s: float = 5.0) -> int:
    folder = submitit_folder(out)
    follower = LogFollower(_log_path(folder, job_id, 0), follow)
    last, t0 = None, time.time()
    try:
        while True:
            state = slurm_state(job_id) or "UNKNOWN"
            if state == "GONE" and time.time() - t0 < 30:
                state = "PENDING"  # accounting lags a fresh submission
            follower.poll()
            if state != last:
                print(f"[launch] job {job_id}: {state}", flush=True)
                last = state
            if state.startswith(FINAL_STATES) or state == "GONE":  # GONE past 30 s: the scheduler forgot it
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job_id} keeps running (scancel {job_id} to stop it)", file=sys.stderr)
        return 130
    time.sleep(1)
    follower.close()
    return report(folder, job_id, ntasks, out, state)
