"""What a CPU can show of the GPU path: the accelerator decided where the process runs, device selection that
agrees with DeepSpeed under every GPU binding, collectives on the backend's device, an explicit timeout, fp16
chains that move, bf16 gradients reduced in fp32."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from ebmscale import distributed
from ebmscale.config import load_config
from ebmscale.sampling import langevin, model_energy
from ebmscale.train.ds_config import build_ds_config


def _import_ebmscale_with(env: dict) -> dict:
    """os.environ after `import ebmscale` in a fresh process with `env` (no CUDA here)."""
    code = "import os, json, ebmscale; print(json.dumps({k: os.environ.get(k) for k in " \
           "('DS_ACCELERATOR', 'EBMSCALE_SET_DS_ACCELERATOR')}))"
    base = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "EBMSCALE_SET_DS_ACCELERATOR")}
    res = subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, check=True)
    import json
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_accelerator_is_decided_per_process_and_a_users_choice_is_kept():
    # nothing set: this CPU machine picks cpu, and marks it as ebmscale's own choice
    assert _import_ebmscale_with({}) == {"DS_ACCELERATOR": "cpu", "EBMSCALE_SET_DS_ACCELERATOR": "cpu"}
    # a login node's choice that leaked into a job is decided again where the job runs (here: cpu again)
    leaked = _import_ebmscale_with({"DS_ACCELERATOR": "cpu", "EBMSCALE_SET_DS_ACCELERATOR": "cpu"})
    assert leaked == {"DS_ACCELERATOR": "cpu", "EBMSCALE_SET_DS_ACCELERATOR": "cpu"}
    # the user's own setting (no mark, or a mark that no longer matches) is never touched
    assert _import_ebmscale_with({"DS_ACCELERATOR": "cuda"})["DS_ACCELERATOR"] == "cuda"
    assert _import_ebmscale_with({"DS_ACCELERATOR": "cuda", "EBMSCALE_SET_DS_ACCELERATOR": "cpu"}) == \
        {"DS_ACCELERATOR": "cuda", "EBMSCALE_SET_DS_ACCELERATOR": "cpu"}


def test_the_submitting_environment_loses_only_what_ebmscale_set(monkeypatch):
    from ebmscale.launch.submit import scrubbed_env
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("EBMSCALE_SET_DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("RANK", "3")  # an outer launcher's
    with scrubbed_env():
        assert "DS_ACCELERATOR" not in os.environ and "EBMSCALE_SET_DS_ACCELERATOR" not in os.environ
        assert "RANK" not in os.environ
    assert os.environ["DS_ACCELERATOR"] == "cpu" and "RANK" not in os.environ  # ours back for this process
    monkeypatch.delenv("EBMSCALE_SET_DS_ACCELERATOR")  # now the user's own
    with scrubbed_env():
        assert os.environ["DS_ACCELERATOR"] == "cpu"


# (environment, GPUs the task sees) -> the device index; DeepSpeed reads it from LOCAL_RANK
BINDINGS = [
    # torchrun / srun --gpus-per-node=8: every task sees the node's 8 GPUs
    ({"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}, 8, 5),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "13", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
      "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "MASTER_ADDR": "n1"}, 8, 5),
    # --gpus-per-task=1 / --gpu-bind=single:1: each task sees exactly its own GPU, as index 0
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "13", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
      "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "MASTER_ADDR": "n1", "CUDA_VISIBLE_DEVICES": "5"},
     1, 0),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "3"}, 1, 0),
    # one task on a node of 4 GPUs
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, 4, 0),
]


@pytest.mark.parametrize("env, visible, want", BINDINGS)
def test_device_selection_agrees_with_deepspeed_under_every_binding(env, visible, want):
    d = distributed.detect(env, backend="nccl")
    gpu = distributed.gpu_index(d.local_rank, d.local_world_size, visible)
    assert gpu == want and gpu < visible
    exported: dict = {}
    distributed.export(d, exported, gpu=gpu)
    # DeepSpeed's engine and init_process_group(device_id=...) take int(os.environ["LOCAL_RANK"])
    assert int(exported["LOCAL_RANK"]) == gpu
    assert exported["RANK"] == str(d.rank) and exported["WORLD_SIZE"] == str(d.world_size)


def test_more_tasks_than_visible_gpus_is_a_clear_error():
    with pytest.raises(RuntimeError, match="8 tasks on this node but this task sees 4 GPU"):
        distributed.gpu_index(5, 8, 4)


def test_collectives_use_the_backends_device_and_an_explicit_timeout(monkeypatch):
    assert distributed.collective_device("gloo") == torch.device("cpu")
    monkeypatch.delenv("EBMSCALE_DIST_TIMEOUT_S", raising=False)
    assert distributed.collective_timeout_s(None) == 600.0
    assert distributed.collective_timeout_s(120) == 120.0
    monkeypatch.setenv("EBMSCALE_DIST_TIMEOUT_S", "45")
    assert distributed.collective_timeout_s(120) == 45.0


def test_the_timeout_reaches_the_process_group():
    """A real process group: the default group's timeout is the configured one, not a library default, and so is
    every later group's once `time_out_every_group` ran; DeepSpeed's CPU inference op is not compiled (training
    never uses it)."""
    code = "\n".join([
        "import os, torch",
        "from ebmscale import distributed",
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(distributed.free_port()))",
        "distributed.init(timeout_s=77)",
        "pg = torch.distributed.distributed_c10d._get_default_group()",
        "print('TIMEOUT', pg._get_backend(torch.device('cpu')).options._timeout.total_seconds())",
        "import deepspeed.comm.comm as cc; print('SHM', cc.cdb.shm_comm_op)",
        # a group made later (as DeepSpeed makes ZeRO's data-parallel group) starts at torch's 30 minutes
        "g = torch.distributed.new_group([0])",
        "print('NEW', g._get_backend(torch.device('cpu')).options._timeout.total_seconds())",
        "print('GROUPS', distributed.time_out_every_group(77))",
        "print('AFTER', g._get_backend(torch.device('cpu')).options._timeout.total_seconds())"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    env.pop("EBMSCALE_DIST_TIMEOUT_S", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("TIMEOUT")]
    assert res.returncode == 0 and line, res.stdout + res.stderr
    assert float(line[0].split()[1]) == 77.0
    assert "SHM None" in res.stdout
    assert "NEW 1800.0" in res.stdout and "AFTER 77.0" in res.stdout, res.stdout


def test_selftest_puts_its_collective_tensors_on_the_backends_device():
    text = (ROOT / "ebmscale" / "launch" / "selftest.py").read_text()
    assert "collective_device(d.backend)" in text
    assert text.count("device=dev") == 2  # the stop flag and the all-reduce check


def test_fp16_chains_move_where_unscaled_input_gradients_underflow():
    """A tiny energy whose dE/dx (~3e-10 per pixel) is below fp16's smallest subnormal (6e-8): unscaled, every
    gradient flushes to zero and the chains stand still; with the sampler's input-gradient scaling they move
    as the fp32 chains do."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
    torch.nn.init.constant_(conv.weight, 1e-4)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, y=None):
            return self.conv(x.to(self.conv.weight.dtype)).pow(2).sum((1, 2, 3)) * 1e-4  # casts as EnergyModel

    x0 = torch.full((2, 1, 8, 8), 0.5)
    ref, _ = langevin(model_energy(Tiny(), None, torch.float32), x0, steps=3, step_size=1e8, noise=0.0)
    half = Tiny().half()
    scaled = model_energy(half, None, torch.float16)
    assert float(scaled.grad_scale.scale) > 1
    x16, _ = langevin(scaled, x0, steps=3, step_size=1e8, noise=0.0)
    unscaled = model_energy(half, None, torch.float16)
    unscaled.grad_scale = 1.0
    stuck, _ = langevin(unscaled, x0, steps=3, step_size=1e8, noise=0.0)
    assert torch.equal(stuck, x0)  # what fp16 without scaling does: nothing
    assert (ref - x0).abs().max() > 1e-3
    assert torch.allclose(x16, ref, atol=0.1 * (ref - x0).abs().max().item())


def test_fp16_input_gradient_scale_backs_off_on_overflow():
    from ebmscale.sampling.langevin import energy_and_input_grad

    def energy(x):  # dE/dx = 1000 per pixel: times 2^14 it overflows fp16 (max 65504)
        return (x.half() * 1000).sum((1, 2, 3))
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    _, g, scale = energy_and_input_grad(energy, x, 2.0 ** 14)
    assert torch.allclose(g, torch.full_like(g, 1000.0)) and scale <= 64


def test_fp16_sampling_takes_no_host_sync_and_carries_its_scale_from_call_to_call(monkeypatch):
    """The scale lives on the device: an overflow halves it there (that step moves by its noise only), and the next
    call starts where the last one ended. No tensor is read by the host inside the call (bool/item/tolist raise)."""
    from ebmscale.sampling.langevin import InputGradScale

    class Steep(torch.nn.Module):  # dE/dx = 1000 per pixel: times 2^14 it overflows fp16 (max 65504)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float16))

        def forward(self, x, y=None):
            return (x.half() * 1000 * self.w).sum((1, 2, 3))

    scale = InputGradScale("cpu")
    energy = model_energy(Steep(), None, torch.float16, grad_scale=scale)
    x0 = torch.full((2, 1, 4, 4), 0.5)

    def no_sync(*a, **k):
        raise AssertionError("host sync inside the Langevin call")
    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    x1, _ = langevin(energy, x0, steps=10, step_size=1e-5, noise=0.0, clamp=False)
    monkeypatch.undo()
    assert float(scale.scale) <= 64 and float(scale.overflows) == 8  # 2^14 -> 2^6, once per overflowed step
    assert torch.allclose(x0 - x1, torch.full_like(x0, 2e-2), rtol=0.05)  # the last 2 of 10 steps took dE/dx = 1000
    x2, _ = langevin(model_energy(Steep(), None, torch.float16, grad_scale=scale), x0, steps=4, step_size=1e-5,
                     noise=0.0, clamp=False)
    assert torch.allclose(x0 - x2, torch.full_like(x0, 4e-2), rtol=0.05)  # carried: no overflow, every step moves


def test_bf16_gradients_are_reduced_in_fp32_by_default():
    cfg = load_config(ROOT / "configs" / "digits.yaml", ["train.precision=bf16"])
    assert build_ds_config(cfg, 2)["communication_data_type"] == "fp32"
    cfg = load_config(ROOT / "configs" / "digits.yaml", ["train.precision=bf16", "train.grad_reduce_fp32=false"])
    assert "communication_data_type" not in build_ds_config(cfg, 2)


def test_bf16_overflow_check_is_left_to_the_guard_only_where_the_guard_covers_it():
    """DeepSpeed 0.19's bf16.check_grad_overflow (ZeRO-1/2: an all-reduce and a host sync per step) is off when the
    guard skips, rolls back or stops on non-finite gradients; kept when the guard is off or only warns."""
    digits = ROOT / "configs" / "digits.yaml"
    assert build_ds_config(load_config(digits, ["train.precision=bf16"]), 2)["bf16"] == \
        {"enabled": True, "check_grad_overflow": False}
    for off in (["guard.enabled=false"], ["guard.on_nonfinite=warn"]):
        assert build_ds_config(load_config(digits, ["train.precision=bf16", *off]), 2)["bf16"] == {"enabled": True}
    zero3 = build_ds_config(load_config(digits, ["recipe=ebmscale", "model.scales=1", "train.zero_stage=3",
                                                 "train.zero3_persistence_threshold=0"]), 2)
    assert zero3["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}


def test_gpu_speed_switches_are_off_by_default_and_change_no_maths():
    from ebmscale.models import build_model
    cfg = load_config(ROOT / "configs" / "digits.yaml", ["model.filters=8"])
    assert not cfg.train.cudnn_benchmark and not cfg.train.channels_last_update
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x, y = torch.rand(4, 1, 16, 16), torch.arange(4)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(model(x, y), model(nhwc, y), atol=1e-5)


def test_the_deterministic_switch_sets_what_cuda_needs_for_bit_exact_runs(monkeypatch):
    from ebmscale.train.main import set_deterministic
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_deterministic()
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32 and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = before[1:]
