"""`train.precision: auto`: the compute precision this hardware runs fastest without losing the maths.

- CUDA: bf16 where the GPU computes it natively (compute capability >= 8.0), else fp16 with DeepSpeed's
  dynamic loss scaling.
- CPU: bf16 only where the CPU has native bf16 (avx512_bf16 or AMX, as torch reports it), confirmed by a
  probe of a few milliseconds that times a bf16 against an fp32 GEMM; else fp32. Without native support torch
  emulates bf16 about 30x slower than fp32 (AMD Zen 3: GEMM 1.0 vs 33 GFLOP/s per thread).

`resolve()` is pure given a `Hardware` (the tests inject one per branch); `detect_hardware()` looks at the
machine. The trainer resolves once, on rank 0, and broadcasts the answer so every rank agrees. An explicit
precision is kept, with a loud warning when the hardware emulates it.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ebmscale.config import PRECISIONS

# a native bf16 GEMM runs at least this share of the fp32 one; emulation runs at ~1/30
NATIVE_BF16_MIN_RATIO = 0.5


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" | "cpu"
    name: str  # GPU name or CPU model
    isa: str = ""  # CPU: torch's capability (AVX2, AVX512, ...)
    cuda_capability: Optional[tuple] = None  # (major, minor) on CUDA
    cpu_bf16_flag: bool = False  # CPU: avx512_bf16 or AMX tiles, as torch reports
    gemm_gflops: Optional[dict] = None  # CPU probe: {"fp32": x, "bf16": y} per thread

    @property
    def native_bf16(self) -> bool:
        if self.device == "cuda":
            return bool(self.cuda_capability and self.cuda_capability[0] >= 8)
        if not self.cpu_bf16_flag:
            return False
        g = self.gemm_gflops
        return g is None or g["bf16"] >= NATIVE_BF16_MIN_RATIO * g["fp32"]

    def describe(self) -> str:
        if self.device == "cuda":
            return f"{self.name} (compute capability {'.'.join(map(str, self.cuda_capability or ()))})"
        return f"{self.name} ({self.isa or 'unknown ISA'}, bf16 {'native' if self.native_bf16 else 'emulated'})"


@dataclass(frozen=True)
class Resolution:
    precision: str  # fp32 | bf16 | fp16
    requested: str
    reason: str
    warning: Optional[str] = None  # set when an explicit choice runs emulated


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_gflops(dtype: torch.dtype, n: int = 128, reps: int = 3) -> float:
    """Single-thread GEMM throughput; best of `reps` (the first call warms up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return 2 * n ** 3 / max(best, 1e-9) / 1e9


def cpu_bf16_flag() -> bool:
    """Whether the CPU has native bf16 (AVX512-BF16 or AMX). torch's probes are private (torch.cpu._is_*_supported,
    torch 2.3-2.13); without them, the flags Linux lists in /proc/cpuinfo; else False (fp32 is the safe answer)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(p) for p in probes):
        return bool(any(p() for p in probes))
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_tile" in flags


def detect_hardware(device: Optional[str] = None) -> Hardware:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        index = torch.cuda.current_device()
        return Hardware("cuda", torch.cuda.get_device_name(index),
                        cuda_capability=tuple(torch.cuda.get_device_capability(index)))
    flag = cpu_bf16_flag()
    gflops = {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16)}
    return Hardware("cpu", cpu_model(), isa=torch.backends.cpu.get_cpu_capability(), cpu_bf16_flag=flag,
                    gemm_gflops=gflops)


def _gemm_note(hw: Hardware) -> str:
    g = hw.gemm_gflops
    return f"bf16 GEMM {g['bf16']:.1f} vs fp32 {g['fp32']:.1f} GFLOP/s" if g else "no GEMM probe"


def resolve(requested: str, hw: Hardware, checkpoint: Optional[str] = None) -> Resolution:
    """`requested` is a train.precision value, `checkpoint` the precision of the checkpoint being resumed (kept
    under auto); returns the concrete precision and why."""
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision: unknown '{requested}'; allowed: {', '.join(PRECISIONS)}")
    if requested == "auto" and checkpoint in ("fp32", "bf16", "fp16"):
        kept = resolve(checkpoint, hw)
        return Resolution(checkpoint, requested, f"kept from the checkpoint being resumed on {hw.describe()} "
                                                 f"(train.precision=fp32|bf16|fp16 overrides it)", kept.warning)
    if requested == "auto":
        if hw.device == "cuda":
            if hw.native_bf16:
                return Resolution("bf16", requested, f"GPU with native bf16: {hw.describe()}")
            return Resolution("fp16", requested, f"GPU without native bf16: {hw.describe()}; fp16 with dynamic "
                                                 f"loss scaling")
        if hw.native_bf16:
            return Resolution("bf16", requested, f"CPU with native bf16: {hw.describe()}, {_gemm_note(hw)}")
        return Resolution("fp32", requested, f"CPU without native bf16: {hw.describe()}, {_gemm_note(hw)}")
    warning = None
    if hw.device == "cuda" and requested == "bf16" and not hw.native_bf16:
        warning = (f"train.precision=bf16 on {hw.describe()}, which has no native bf16: expect it several times "
                   f"slower than fp16; use train.precision=auto (fp16 here)")
    elif hw.device == "cpu" and requested in ("bf16", "fp16") and not hw.native_bf16:
        g = hw.gemm_gflops
        slowdown = f"about {g['fp32'] / max(g['bf16'], 1e-9):.0f}x slower" if g else "far slower"
        warning = (f"train.precision={requested} on a CPU without native bf16 ({hw.describe()}): torch emulates it, "
                   f"{_gemm_note(hw)}, {slowdown} than fp32. Use train.precision=auto (fp32 here).")
    return Resolution(requested, requested, f"set explicitly on {hw.describe()}", warning)


def resolve_here(requested: str, device: Optional[str] = None, checkpoint: Optional[str] = None) -> Resolution:
    """Resolve on this process's hardware (no collectives)."""
    return resolve(requested, detect_hardware(device), checkpoint)


def resolve_everywhere(requested: str, device: Optional[str] = None, checkpoint: Optional[str] = None) -> Resolution:
    """Rank 0 resolves, every rank receives the same answer (a broadcast when a process group is up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return resolve_here(requested, device, checkpoint)
    box = [resolve_here(requested, device, checkpoint) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)  # gloo: CPU objects; nccl: the current CUDA device
    return box[0]


def compute_dtype(precision: str) -> torch.dtype:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision '{precision}' is not resolved; call ebmscale.precision.resolve first "
                         f"(allowed here: {', '.join(dtypes)})")
    return dtypes[precision]
