"""Who am I in the job: rank, world size, rendezvous address; then `deepspeed.init_distributed`.

`detect()` reads the environment only (no side effects, testable with a fake environ). Sources, first
match wins:

1. torchrun / the DeepSpeed launcher: RANK and WORLD_SIZE (plus LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
2. submitit's local executor (SUBMITIT_EXECUTOR=local): SUBMITIT_LOCAL_GLOBALID / _NTASKS / _LOCALID on
   127.0.0.1. Checked before SLURM so that `tools/launch.py --local` run inside an salloc shell does not
   mistake the allocation's SLURM_* variables for its own.
3. a SLURM job step (srun, or submitit on SLURM): SLURM_PROCID, SLURM_STEP_NUM_TASKS (SLURM_NTASKS),
   SLURM_LOCALID, tasks on this node from SLURM_STEP_TASKS_PER_NODE; master = first host of the step's
   node list (`scontrol show hostnames`), port 20000 + job id % 12000 (MASTER_ADDR / MASTER_PORT in the
   environment win, e.g. set by slurm/sbatch_example.sh).
4. a single process: rank 0 of 1 on 127.0.0.1 and a free port.

`init()` exports RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, selects the
local GPU (`gpu_index`: all GPUs visible or one bound per task; CUDA_VISIBLE_DEVICES is never touched) and calls
`deepspeed.init_distributed` with nccl on CUDA, gloo otherwise (EBMSCALE_DIST_BACKEND overrides), and an explicit
collective timeout.
It is idempotent: a second call returns the first result.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import time
import warnings
from datetime import timedelta
from typing import List, Mapping, MutableMapping, NamedTuple, Optional, Tuple

import torch
import torch.distributed as tdist
from torch.distributed import distributed_c10d as c10d


class Dist(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    backend: str


_current: Optional[Dist] = None


# SLURM job states after which a job holds nothing (launch/submit.py waits for them; train/runlock.py frees a lock)
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "GONE")


def slurm_state(job_id: str) -> Optional[str]:
    """The job's state (sacct, else squeue); GONE when the scheduler answers but does not know it; None when it
    cannot be asked (no command, an error, a timeout): unknown."""
    answered = False
    for cmd in (["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State"], ["squeue", "-h", "-j", str(job_id), "-o", "%T"]):
        if not shutil.which(cmd[0]):
            continue
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        lines = [x.strip() for x in res.stdout.splitlines() if x.strip()]
        if res.returncode == 0 and lines:
            return lines[-1].split()[0]
        if res.returncode == 0 or "Invalid job id" in res.stderr:
            answered = True
    return "GONE" if answered else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_backend() -> str:
    forced = os.environ.get("EBMSCALE_DIST_BACKEND")
    if forced:
        return forced
    return "nccl" if torch.cuda.is_available() else "gloo"


def slurm_port(job_id: str) -> int:
    """A rendezvous port every task of a SLURM job derives alike without talking to the others: 20000-31999, below
    Linux's ephemeral range (32768-60999), where an outgoing connection could already hold it."""
    digits = re.sub(r"\D", "", job_id.split("_")[0]) or "0"
    return 20000 + int(digits) % 12000


def expand_tasks_per_node(spec: str) -> List[int]:
    """SLURM's '2(x3),1' -> [2, 2, 2, 1]."""
    out: List[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse SLURM tasks-per-node spec '{spec}'")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def expand_hostnames(nodelist: str) -> List[str]:
    """First `scontrol show hostnames` (authoritative, local, no RPC); submitit's parser without it."""
    if shutil.which("scontrol"):
        try:
            res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=20)
            hosts = res.stdout.split()
            if res.returncode == 0 and hosts:
                return hosts
        except (OSError, subprocess.SubprocessError):
            pass
    from submitit.slurm.slurm import _parse_node_list
    return _parse_node_list(nodelist)


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    val = env.get(key)
    if val is None or val == "":
        if default is None:
            raise KeyError(key)
        return default
    try:
        return int(val)
    except ValueError:
        raise ValueError(f"environment variable {key}={val!r} is not an integer") from None


def detect(environ: Optional[Mapping[str, str]] = None, backend: Optional[str] = None) -> Dist:
    """Rank and rendezvous from the environment (see the module doc for the order)."""
    return _detect(environ, backend)[0]


def source(environ: Optional[Mapping[str, str]] = None) -> str:
    """Which source detect() uses: torchrun | submitit-local | slurm | single."""
    return _detect(environ, "gloo")[1]


def _detect(environ: Optional[Mapping[str, str]], backend: Optional[str]) -> Tuple[Dist, str]:
    env = os.environ if environ is None else environ
    backend = backend or default_backend()

    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        return Dist(_int(env, "RANK"), world, _int(env, "LOCAL_RANK", _int(env, "RANK") % local_world),
                    local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                    _int(env, "MASTER_PORT", 29500), backend), "torchrun"

    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        world = _int(env, "SUBMITIT_LOCAL_NTASKS", 1)
        port = env.get("MASTER_PORT") or str(slurm_port(env.get("SUBMITIT_LOCAL_JOB_ID", "0")))
        return Dist(_int(env, "SUBMITIT_LOCAL_GLOBALID"), world, _int(env, "SUBMITIT_LOCAL_LOCALID", 0), world,
                    env.get("MASTER_ADDR", "127.0.0.1"), int(port), backend), "submitit-local"

    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        step_tasks = env.get("SLURM_STEP_NUM_TASKS")
        if step_tasks is None:
            # the batch script itself or an salloc shell: not a task of an srun step
            if _int(env, "SLURM_NTASKS", 1) > 1:
                warnings.warn(f"SLURM job {env['SLURM_JOB_ID']} has {env['SLURM_NTASKS']} tasks but this process "
                              f"is not an srun task; running as a single process (start it with srun)")
        else:
            world = int(step_tasks)
            rank = _int(env, "SLURM_PROCID")
            node = _int(env, "SLURM_NODEID", 0)
            spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
            per_node = expand_tasks_per_node(spec) if spec else []
            if node < len(per_node):
                local_world = per_node[node]
            else:
                local_world = _int(env, "SLURM_NTASKS_PER_NODE", world)
            addr = env.get("MASTER_ADDR")
            if not addr:
                nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
                addr = expand_hostnames(nodelist)[0] if nodelist else "127.0.0.1"
            port = _int(env, "MASTER_PORT", slurm_port(env["SLURM_JOB_ID"]))
            return Dist(rank, world, _int(env, "SLURM_LOCALID", 0), local_world, addr, port, backend), "slurm"

    port = _int(env, "MASTER_PORT", 0) or free_port()
    return Dist(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), port, backend), "single"


def gpu_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """Which of the GPUs this process sees it drives. All of a node's GPUs visible to every task (torchrun,
    --gpus-per-node): its local rank. One GPU per task (--gpus-per-task=1, --gpu-bind, a site's default): 0.
    Anything else cannot be mapped without guessing, so it is an error that says how to fix the binding."""
    if visible >= local_world_size:
        return local_rank
    if visible == 1:
        return 0
    raise RuntimeError(f"{local_world_size} tasks on this node but this task sees {visible} GPU(s) "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give one GPU per "
                       f"task (launcher.gpus_per_node = tasks per node, or --gpus-per-task=1)")


def export(d: Dist, environ: Optional[MutableMapping[str, str]] = None, gpu: Optional[int] = None) -> None:
    """Write the torch env:// variables (never CUDA_VISIBLE_DEVICES). On a GPU, LOCAL_RANK is the index of this
    process's GPU among those it sees (`gpu_index`): DeepSpeed takes its device from LOCAL_RANK (the engine and
    init_process_group's device_id), so with one GPU bound per task it must read 0, not the task's local rank."""
    env = os.environ if environ is None else environ
    env.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank if gpu is None else gpu),
               LOCAL_WORLD_SIZE=str(d.local_world_size), MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port))


def setup_env() -> Dist:
    """detect() + export(), no process group: what the launcher's job does before calling the trainer."""
    d = detect()
    export(d)
    return d


DEFAULT_TIMEOUT_S = 600.0


def collective_timeout_s(configured: Optional[float] = None, environ: Optional[Mapping[str, str]] = None) -> float:
    """How long a collective may wait for a peer before the job fails: $EBMSCALE_DIST_TIMEOUT_S, else the config's
    train.collective_timeout_s, else 10 minutes. Always explicit: never a library's default by accident."""
    env = os.environ if environ is None else environ
    if env.get("EBMSCALE_DIST_TIMEOUT_S"):
        return float(env["EBMSCALE_DIST_TIMEOUT_S"])
    return float(configured) if configured else DEFAULT_TIMEOUT_S


def skip_cpu_inference_op() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory op (C++, about a minute on 2 cores) at the first
    init_distributed on a machine; only its inference all-reduce uses it, never training. Marking it unavailable
    saves that compile on a fresh machine and the hang of a build lock left by an interrupted first launch."""
    import deepspeed.ops
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict) and os.environ.get("DS_ACCELERATOR") == "cpu":
        compatible["deepspeed_shm_comm"] = False


def collective_device(backend: str):
    """Where tensors for a collective must live: the current GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def init(timeout_s: Optional[float] = None) -> Dist:
    """Set up torch.distributed through DeepSpeed with an explicit collective timeout (`collective_timeout_s`);
    idempotent. Returns the `Dist` in force."""
    global _current
    if _current is not None and tdist.is_initialized():
        return _current
    d = detect()
    gpu = None
    if d.backend == "nccl" and torch.cuda.is_available():
        gpu = gpu_index(d.local_rank, d.local_world_size, torch.cuda.device_count())
        torch.cuda.set_device(gpu)
    export(d, gpu=gpu)
    import deepspeed
    skip_cpu_inference_op()
    deepspeed.init_distributed(dist_backend=d.backend, auto_mpi_discovery=False, verbose=d.rank == 0,
                               timeout=timedelta(seconds=collective_timeout_s(timeout_s)))
    atexit.unregister(shutdown)
    atexit.register(shutdown)
    _current = d
    return d


def time_out_every_group(timeout_s: Optional[float] = None) -> int:
    """Give every process group the collective timeout; returns how many. torch gives a group made with
    `new_group` its backend's default (30 min for gloo), not the world's, and DeepSpeed makes its own (ZeRO's
    data-parallel group is a clone of the world): call this after `deepspeed.initialize`."""
    groups = list(c10d._world.pg_map)
    for group in groups:
        c10d._set_pg_timeout(timedelta(seconds=collective_timeout_s(timeout_s)), group)
    return len(groups)


def shutdown() -> None:
    """Let gloo's threads finish, then destroy the process group; registered with atexit by `init()`.
    A gloo worker thread may still hold the last collective's temporaries (all_gather_object's tensors) when the
    caller moves on. Dropping them takes the GIL; if Python is finalizing by then, the thread is killed inside C++
    and the rank dies with "terminate called without an active exception" (SIGABRT, about 1 exit in 7 here).
    Sleeping releases the GIL so that they go first."""
    global _current
    if tdist.is_initialized():
        time.sleep(0.25)
        tdist.destroy_process_group()
    _current = None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (SLURM's binding, taskset), capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def cpu_threads(local_world_size: int, loader_workers: int, environ: Optional[Mapping[str, str]] = None,
                cpus: Optional[int] = None) -> int:
    """Intra-op threads for one rank: its share of the usable CPUs less its loader workers, at least 1.
    Under SLURM with --cpus-per-task each task's mask is already its own share; otherwise (torchrun, the local
    executor) the ranks of a node share one mask. Oversubscribing a core costs more than an idle one."""
    env = os.environ if environ is None else environ
    cpus = usable_cpus() if cpus is None else cpus
    per_task = env.get("SLURM_CPUS_PER_TASK")
    share = min(cpus, int(per_task)) if per_task and per_task.isdigit() and "SLURM_STEP_ID" in env \
        else cpus // max(1, local_world_size)
    return max(1, share - loader_workers)


def _ranges(cpus) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, cpus = [], sorted(cpus)
    for c in cpus:
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in out)


def placement(d: Dist) -> str:
    """Where this rank runs: host, CPU affinity (the mask srun or taskset gave it), torch threads, GPU. Every rank
    prints it at start (tests/test_slurm.py reads it in a SLURM job)."""
    import torch
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = list(range(os.cpu_count() or 1))
    gpu = "none"
    if d.backend == "nccl" and torch.cuda.is_available():
        i = torch.cuda.current_device()
        gpu = f"cuda:{i} {torch.cuda.get_device_name(i)} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'all')})"
    return (f"placement: rank {d.rank}/{d.world_size} local {d.local_rank}/{d.local_world_size} on "
            f"{socket.gethostname()}: cpus {_ranges(cpus)} ({len(cpus)}; SLURM_CPUS_PER_TASK="
            f"{os.environ.get('SLURM_CPUS_PER_TASK', '-')}), torch threads {torch.get_num_threads()}, gpu {gpu}")


def current() -> Optional[Dist]:
    return _current


def is_main() -> bool:
    return (_current.rank if _current else int(os.environ.get("RANK", "0"))) == 0


__all__ = ["Dist", "detect", "source", "export", "setup_env", "init", "shutdown", "current", "is_main", "free_port",
           "usable_cpus", "cpu_threads", "placement"]
