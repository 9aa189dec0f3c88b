"""Benchmarks run by tools/bench.py NAME: each module has add_args(parser) and run(args).

Shared by the speed benchmarks: the plain PyTorch loop they are measured against, interleaved timing (every
candidate once per round, so that load from other processes on a shared machine hits all of them alike), the
GEMM peak of the same run. A Trainer built as ebmscale/train/main.py builds it, minus data, tracking and
checkpoints, is bench/_trainer.py (it imports DeepSpeed; the other benchmarks do not need to).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ebmscale.precision import detect_hardware

# nominal dense bf16 peaks (FLOP/s) for MFU on a GPU, by the words of torch.cuda.get_device_name (most specific
# first); CPUs are judged against the GEMM peak measured in the run
BF16_PEAK = (
    (("H200",), 989e12), (("H100", "PCIe"), 756e12), (("H100", "NVL"), 835e12), (("H100",), 989e12),
    (("A100",), 312e12), (("L40S",), 362e12), (("L40",), 181e12), (("A10G",), 70e12), (("A10",), 125e12),
    (("L4",), 121e12),
)


def positive(text: str) -> int:
    """argparse type for counts that must be at least 1 (batch, steps, rounds, ...)."""
    value = int(text)
    if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def set_threads(n: int) -> int:
    """Intra-op threads on CPU (0 = torch's default). 1 by default in the benchmarks: per-core numbers are the
    ones that survive a CPU shared with other jobs, and what 1 rank per core runs at."""
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def nominal_peak(dev: torch.device, name: Optional[str] = None) -> Optional[float]:
    """The bf16 peak of the GPU whose name has all the words of an entry (whole words: "A10" is not "A10G")."""
    if dev.type != "cuda":
        return None
    words = set((name or torch.cuda.get_device_name(dev)).replace("-", " ").split())
    return next((v for keys, v in BF16_PEAK if set(keys) <= words), None)


def hardware_line(dev: torch.device) -> str:
    """What a figure was measured on: the device, the CPU's ISA and whether bf16 is native (ebmscale/precision.py)."""
    return f"measured on {detect_hardware(dev.type).describe()}, {torch.get_num_threads()} thread(s)"


def interleaved(fns: Dict[str, Callable[[], object]], reps: int, dev: torch.device) -> Dict[str, List[float]]:
    """Seconds per call of each fn, `reps` rounds of one call each."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync(dev)
            t = time.perf_counter()
            f()
            sync(dev)
            times[k].append(time.perf_counter() - t)
    return times


def gemm(n: int, dtype: torch.dtype, dev: torch.device, repeat: int = 1):
    """(fn, flops): `repeat` n x n x n matmuls, the peak a convolution net could reach on this machine."""
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)

    def fn():
        for _ in range(repeat):
            torch.mm(a, b)
    return fn, 2.0 * n ** 3 * repeat


def plain_langevin(model: torch.nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], steps: int,
                   step_size: float, noise: float, grad_clip: Optional[float],
                   autocast: Optional[torch.dtype] = None) -> torch.Tensor:
    """The seed's loop as a user writes it in plain PyTorch: the model as it is (fp32, parameters frozen and eval
    mode set by the caller, spectral norm recomputed at every forward), `.backward()` for dE/dx, clamp.
    `autocast`: run the forward under torch.autocast in that dtype."""
    x = x.detach().clone()
    for _ in range(steps):
        x = x + noise * torch.randn_like(x)
        x.requires_grad_(True)
        ctx = torch.autocast(x.device.type, autocast) if autocast else contextlib.nullcontext()
        with ctx:
            e = model(x, y)
        e.sum().backward()
        g = x.grad if grad_clip is None else x.grad.clamp(-grad_clip, grad_clip)
        x = (x.detach() - step_size * g).clamp(0.0, 1.0)
    return x


@contextlib.contextmanager
def plain_frozen(model: torch.nn.Module):
    """What a plain script does around its sampling loop: eval mode, requires_grad off."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")
