"""train.precision=auto on every kind of hardware (the probe's answer injected), threads per rank, and a real
2-rank run that resolves once and records why."""
import json

import pytest
import torch

from ebmscale import distributed
from ebmscale.precision import Hardware, compute_dtype, detect_hardware, resolve

H100 = Hardware("cuda", "NVIDIA H100 80GB HBM3", cuda_capability=(9, 0))
V100 = Hardware("cuda", "Tesla V100-SXM2-32GB", cuda_capability=(7, 0))
SAPPHIRE = Hardware("cpu", "Intel Xeon Platinum 8480+", isa="AVX512", cpu_bf16_flag=True,
                    gemm_gflops={"fp32": 60.0, "bf16": 180.0})
ZEN3 = Hardware("cpu", "AMD EPYC 7B13", isa="AVX2", cpu_bf16_flag=False, gemm_gflops={"fp32": 33.4, "bf16": 1.0})
# the flag says bf16 but the probe says emulated (a hypervisor hiding AMX state, an old oneDNN): trust the probe
LYING_FLAG = Hardware("cpu", "Some CPU", isa="AVX512", cpu_bf16_flag=True, gemm_gflops={"fp32": 40.0, "bf16": 2.0})


@pytest.mark.parametrize("hw, want", [(H100, "bf16"), (V100, "fp16"), (SAPPHIRE, "bf16"), (ZEN3, "fp32"),
                                      (LYING_FLAG, "fp32")])
def test_auto_picks_what_the_hardware_runs_natively(hw, want):
    res = resolve("auto", hw)
    assert res.precision == want and res.requested == "auto" and res.warning is None
    assert hw.name in res.reason


def test_auto_on_an_emulating_cpu_says_why_with_the_measured_gemm_rates():
    res = resolve("auto", ZEN3)
    assert "without native bf16" in res.reason and "1.0" in res.reason and "33.4" in res.reason


@pytest.mark.parametrize("hw, requested", [(ZEN3, "bf16"), (ZEN3, "fp16"), (V100, "bf16")])
def test_explicit_emulated_precision_runs_with_a_loud_warning(hw, requested):
    res = resolve(requested, hw)
    assert res.precision == requested
    assert res.warning and "auto" in res.warning
    if hw is ZEN3:
        assert "33x slower" in res.warning


@pytest.mark.parametrize("hw", [H100, SAPPHIRE])
def test_explicit_native_or_fp32_choices_are_kept_silently(hw):
    for p in ("fp32", "bf16"):
        res = resolve(p, hw)
        assert res.precision == p and res.warning is None


def test_a_resumed_run_keeps_its_checkpoints_precision_unless_overridden():
    kept = resolve("auto", SAPPHIRE, checkpoint="fp32")
    assert kept.precision == "fp32" and "checkpoint" in kept.reason
    assert resolve("bf16", SAPPHIRE, checkpoint="fp32").precision == "bf16"  # an explicit choice wins
    moved = resolve("auto", ZEN3, checkpoint="bf16")  # a bf16 run resumed on a CPU that emulates it
    assert moved.precision == "bf16" and moved.warning


def test_unknown_or_unresolved_precisions_are_refused_by_name():
    with pytest.raises(ValueError, match="train.precision"):
        resolve("fp8", ZEN3)
    with pytest.raises(ValueError, match="not resolved"):
        compute_dtype("auto")


def test_the_probe_on_this_machine_is_fast_and_consistent_with_torch():
    import time
    t = time.process_time()  # CPU time (the probe runs on 1 thread): a busy machine stretches the wall clock only
    hw = detect_hardware("cpu")
    assert time.process_time() - t < 1.0
    assert hw.gemm_gflops["fp32"] > 0 and hw.gemm_gflops["bf16"] > 0
    flag = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert hw.cpu_bf16_flag == flag
    if not flag:
        assert resolve("auto", hw).precision == "fp32"


@pytest.mark.parametrize("env, cpus, local, workers, want", [
    ({}, 2, 2, 1, 1),  # the demo: 2 ranks on 2 cores, a loader worker each: never 0
    ({}, 2, 1, 0, 2),
    ({}, 16, 2, 2, 6),  # torchrun: the ranks share one mask
    ({"SLURM_CPUS_PER_TASK": "10", "SLURM_STEP_ID": "0"}, 10, 8, 6, 4),  # srun: each task's mask is its own
    ({"SLURM_CPUS_PER_TASK": "10", "SLURM_STEP_ID": "0"}, 10, 8, 0, 10),
])
def test_threads_per_rank_never_oversubscribe_the_cores(env, cpus, local, workers, want):
    assert distributed.cpu_threads(local, workers, environ=env, cpus=cpus) == want


def test_usable_cpus_follows_the_affinity_mask():
    import os
    assert 1 <= distributed.usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.slow
def test_a_run_resolves_auto_once_and_records_it(tmp_path, digits_shards):
    from conftest import train
    run = tmp_path / "run"
    res = train(run, digits_shards, "train.steps=2", "checkpoint.every=2", "tracking.enabled=false", "train.precision=auto")
    hw = detect_hardware("cpu")
    want = resolve("auto", hw).precision
    record = json.loads((run / "precision.json").read_text())
    assert record["precision"] == want and record["requested"] == "auto" and "native bf16" in record["reason"]
    from ebmscale.config import from_yaml_file
    assert from_yaml_file(run / "config.yaml").train.precision == want
    assert f"precision {want} (train.precision=auto)" in res.stdout + res.stderr
    state = json.loads(next(run.glob("checkpoints/step_*/trainer.json")).read_text())
    assert state["precision"] == want
    from ebmscale.run_status import run_status
    assert run_status(run)["precision"] == want and run_status(run)["precision_reason"] == record["reason"]
