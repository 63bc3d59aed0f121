"""Timing a kernel call where a choice between paths is made by measurement (``compress(backend="auto")``, the
float32 CPU GEMM of :mod:`vlmsparse.kernels.cpu_gemm`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["median_ms"]


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Median time of ``fn`` in ms: ``triton.testing.do_bench`` on CUDA, else ``repeats`` perf_counter runs after
    one warm-up call."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
