"""The sampler's fast paths compute the same maths as the plain loop they replace (ebmscale/bench/__init__.py:
plain_langevin): bit for bit in fp32, within bf16 rounding in bf16; spectral norms once per call, dE/dx only,
no host sync in the loop; and the benchmarks run."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT
from ebmscale.bench import plain_frozen, plain_langevin
from ebmscale.models.resnet import EnergyModel
from ebmscale.sampling import frozen, langevin, model_energy

STEPS, NOISE = 5, 0.005


def make(seed=0):
    torch.manual_seed(seed)
    model = EnergyModel("resnet32", filters=8, in_channels=3, resolution=16, num_classes=10)
    with torch.no_grad():  # conditioning away from its identity init, so that labels matter
        for name, p in model.named_parameters():
            if "bias" in name and p.dim() == 2:
                p.normal_(0, 0.3)
            elif "gain" in name:
                p.uniform_(0.5, 1.5)
    return model, torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))


def plain(model, x0, y, step_size, clip):
    torch.manual_seed(1)
    with plain_frozen(model):
        return plain_langevin(model, x0, y, STEPS, step_size, NOISE, clip)


def ours(model, x0, y, step_size, clip, dtype=torch.float32, channels_last=False, compile=False):
    torch.manual_seed(1)
    with frozen(model, channels_last) as m:
        return langevin(model_energy(m, y, dtype, channels_last, compile), x0, STEPS, step_size, NOISE, clip)[0]


@pytest.mark.parametrize("step_size,clip", [(10.0, 0.01), (1.0, None)])
def test_fp32_sampler_is_bitwise_the_plain_loop(step_size, clip):
    model, x0, y = make()
    ref = plain(model, x0, y, step_size, clip)
    assert not torch.equal(ref, x0)
    assert torch.equal(ours(model, x0, y, step_size, clip), ref)
    # channels_last only reorders the convolutions' sums
    torch.testing.assert_close(ours(model, x0, y, step_size, clip, channels_last=True), ref, atol=1e-5, rtol=0)


def test_bf16_sampler_within_bf16_rounding_of_fp32():
    model, x0, y = make()
    ref = plain(model, x0, y, 1.0, None)
    fast = ours(copy.deepcopy(model).to(torch.bfloat16), x0, y, 1.0, None, torch.bfloat16, channels_last=True)
    assert fast.dtype == torch.float32
    err, move = (fast - ref).norm(), (ref - x0).norm()
    assert err < 0.04 * move  # measured 1-2%: bf16's 2^-8 through the net's depth
    assert (fast - ref).abs().max() < 0.01


def count_sn_calls(model):
    calls = []
    for mod in model.modules():
        if hasattr(mod, "parametrizations"):
            for plist in mod.parametrizations.values():
                plist[0].register_forward_hook(lambda *a: calls.append(1))
    return calls


def check_spectral_norm_once_per_call(compile):
    model, x0, y = make()
    calls = count_sn_calls(model)
    n_sn = sum(len(m.parametrizations) for m in model.modules() if hasattr(m, "parametrizations"))
    ref = ours(model, x0, y, 10.0, 0.01, compile=compile)
    assert len(calls) == n_sn  # not n_sn * STEPS
    ours(model, x0, y, 10.0, 0.01, compile=compile)
    assert len(calls) == 2 * n_sn  # and again per call: the weights change between training steps
    return model, x0, y, ref


def test_spectral_norm_once_per_sampling_call():
    check_spectral_norm_once_per_call(compile=False)


class Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func, args))
        return func(*args, **(kwargs or {}))


def test_input_gradient_only_and_no_sync_in_the_loop():
    model, x0, y = make()
    with Record() as rec:
        ours(model, x0, y, 10.0, 0.01)
    names = [str(f) for f, _ in rec.ops]
    assert not any("_local_scalar_dense" in n or "item" in n for n in names)  # .item(), bool(tensor): a sync
    masks = [a[-1] for f, a in rec.ops if f is torch.ops.aten.convolution_backward.default]
    assert masks and all(list(m) == [True, False, False] for m in masks)  # dE/dx only: no weight or bias grads
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())


def _bench_args(module, argv):
    """The arguments tools/bench.py would parse for `module` from argv."""
    import argparse
    parser = argparse.ArgumentParser()
    module.add_args(parser)
    return parser.parse_args(argv)


def test_langevin_and_buffer_benchmarks_run(tmp_path):
    from ebmscale.bench import buffer, langevin as bench_langevin
    out = bench_langevin.run(_bench_args(bench_langevin, [
        "--config", "configs/digits.yaml", "--override", "model.filters=8", "--batch", "2", "--steps", "1",
        "--reps", "1", "--gemm-size", "128", "--json", str(tmp_path / "l.json")]))
    rows = {r["sampler"]: r for r in out["rows"]}
    assert rows["ebmscale fp32"]["max_abs_diff_vs_plain_fp32"] == 0.0
    assert all(r["img_steps_per_s"] > 0 and r["share_bf16_gemm"] > 0 for r in rows.values())
    assert json.loads((tmp_path / "l.json").read_text())["filters"] == 8  # the override reached the network
    out = buffer.run(_bench_args(buffer, ["--capacities", "16", "64", "--size", "8", "--dtypes", "uint8",
                                          "--batch", "8", "--reps", "2", "--json", str(tmp_path / "b.json")]))
    assert [r["bytes_per_sample"] for r in out["rows"]] == [3 * 8 * 8 + 16] * 2


@pytest.mark.slow  # over 10 s on 2 busy cores
def test_bench_cli_lists_benchmarks_and_rejects_bad_input():
    def bench(*argv):
        return subprocess.run([sys.executable, "tools/bench.py", *argv], cwd=ROOT, capture_output=True, text=True,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    listing = bench("--help")
    assert listing.returncode == 0
    assert all(n in listing.stdout for n in ("langevin", "train-step", "scaling", "buffer", "checkpoint", "data"))
    assert "unknown benchmark 'nope'" in bench("nope").stderr
    bad = bench("langevin", "--batch", "0")
    assert bad.returncode == 2 and "--batch: must be at least 1" in bad.stderr
    bad = bench("langevin", "--override", "sampler.stepz=3")
    assert bad.returncode == 1 and "config error" in bad.stderr and "sampler.stepz" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_train_step_benchmark_samples_in_bf16_channels_last_under_deepspeed(tmp_path):
    """The real Trainer over a DeepSpeed engine in bf16 (asked explicitly: `auto` is fp32 on a CPU without native
    bf16): its sampler's convolutions run bf16 on NHWC input, all but the stem, which reads the fp32 chain."""
    out = tmp_path / "ts.json"
    tiny = ["model.filters=8", "sampler.steps=2", "data.batch_size=4", "buffer.capacity=16", "train.precision=bf16"]
    subprocess.run([sys.executable, "tools/bench.py", "train-step", "--archs", "resnet32", "--reps", "1",
                    "--no-autocast", "--json", str(out), "--override", *tiny], cwd=ROOT, check=True,
                   capture_output=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    arch = json.loads(out.read_text())["archs"][0]
    assert arch["engine_param_dtype"] == "torch.bfloat16"
    assert arch["sampler_convolutions"] == [["torch.bfloat16", "torch.bfloat16", True, True],  # NHWC weights too
                                            ["torch.float32", "torch.float32", True, True]]  # the fp32 stem
    assert {r["row"] for r in arch["rows"]} == {"plain fp32", "ebmscale bf16=bf16"}


@pytest.mark.slow
def test_compiled_energy_equals_eager():
    model, x0, y, compiled = check_spectral_norm_once_per_call(compile=True)  # reads the cached weights
    torch.testing.assert_close(compiled, ours(model, x0, y, 10.0, 0.01), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(model, x0, y, 1.0, None, compile=True), ours(model, x0, y, 1.0, None),
                               atol=1e-5, rtol=0)
    mb = copy.deepcopy(model).to(torch.bfloat16)
    eager = ours(mb, x0, y, 1.0, None, torch.bfloat16, True)
    compiled = ours(mb, x0, y, 1.0, None, torch.bfloat16, True, compile=True)
    assert (compiled - eager).norm() < 0.04 * (eager - x0).norm()  # fusion skips bf16 roundings eager makes


def test_speed_switches_in_config():
    from ebmscale.config import ConfigError, load_config
    cfg = load_config("configs/cifar10.yaml")
    assert cfg.sampler.channels_last is True and cfg.sampler.compile is False  # what wins on CPU (bench/README.md)
    with pytest.raises(ConfigError, match="sampler.compile.*zero_stage"):
        load_config("configs/cifar10.yaml", ["sampler.compile=true", "train.zero_stage=3"])
