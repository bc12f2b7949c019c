"""What this machine's matrix units deliver, measured (not assumed from the CPU's name).

A low-precision dtype pays only on hardware with matrix units for it (AMX or AVX512-BF16 on a
CPU, tensor cores on a GPU); elsewhere PyTorch emulates it, far slower than float32."""

from __future__ import annotations

import functools
import platform
import time
import warnings
from pathlib import Path

import torch


class SlowPrecisionWarning(UserWarning):
    """A model in bfloat16/float16 on a device whose matrix products in that dtype are slower
    than in float32 (measured)."""


def matmul_gflops(rows: int, k: int, n: int, dtype: torch.dtype, device="cpu", seconds: float = 0.5) -> float:
    """GFLOP/s of ``[rows, k] @ [k, n]`` on ``device`` in ``dtype``: the best of repeated timed
    runs of about ``seconds`` in all (the limit a computation of that shape can reach)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)  # its own generator: the caller's random state is left as it was
    a = torch.randn(rows, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, spent, reps = 0.0, 0.0, 1
    while spent < seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, reps * 2 * rows * k * n / dt / 1e9)
        reps = min(reps * 2, 16)
    return best


@functools.cache
def low_precision_speedup(dtype: torch.dtype, device_type: str = "cpu") -> float:
    """How much faster a [256, 512] @ [512, 512] product runs in ``dtype`` than in float32 here
    (measured once per process, in about 50 ms)."""
    fast = matmul_gflops(256, 512, 512, dtype, device_type, seconds=0.02)
    base = matmul_gflops(256, 512, 512, torch.float32, device_type, seconds=0.02)
    return fast / base if base > 0 else 1.0


@functools.cache
def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``; elsewhere what :mod:`platform` knows): timings
    are comparable only on the same one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def warn_if_slow_precision(dtype: torch.dtype, device: torch.device) -> None:
    """Warn (once per dtype and device type) when ``dtype`` multiplies matrices slower than
    float32 on ``device``: loading in float32 is then both faster and exact."""
    if dtype not in (torch.bfloat16, torch.float16) or device.type != "cpu":
        return
    ratio = low_precision_speedup(dtype, device.type)
    if ratio < 1.0:
        name = dtype_name(dtype)
        warnings.warn(f"{name} matrix products run at {ratio:.2g}x the float32 rate on this CPU (no matrix units "
                      f"for {name}; measured): float32 is faster here", SlowPrecisionWarning, stacklevel=3)
