"""Helpers shared by benchmarks: timing of a call and the measured matmul peak."""

from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["time_call", "matmul_peak"]


def time_call(
    fn: Callable[[], object], repeats: int = 3, warmup: int = 1, max_seconds: float | None = None
) -> dict[str, float | int | list[float]]:
    """Wall-clock seconds of ``fn()``: ``warmup`` untimed calls, then the median of up to ``repeats`` timed calls.

    With ``max_seconds``, stops repeating once the timed calls together took that long
    (at least one timed call is always made). ``cpu_per_wall`` is the process CPU time over
    the wall time of the timed calls: well below the thread count, the process did not get
    its cores (another program was running) and the timings are pessimistic.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    cpu_start = time.process_time()
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if max_seconds is not None and sum(times) >= max_seconds:
            break
    cpu = time.process_time() - cpu_start
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
        "times_s": times,
        "cpu_s": cpu,
        "cpu_per_wall": cpu / sum(times) if sum(times) > 0 else 0.0,
    }


def matmul_peak(m: int = 4096, k: int = 2048, n: int = 2048, repeats: int = 5) -> dict[str, float | int | list[int]]:
    """Measured fp32 GEMM throughput ``[m, k] @ [k, n]`` in GFLOP/s (median of ``repeats``, after a warm-up)."""
    import torch

    a = torch.randn(m, k)
    b = torch.randn(k, n)
    out = torch.empty(m, n)
    with torch.inference_mode():
        timing = time_call(lambda: torch.matmul(a, b, out=out), repeats=repeats, warmup=2)
    flops = 2 * m * k * n
    return {
        "shape": [m, k, n],
        "dtype": "float32",
        "gflops": flops / timing["median_s"] / 1e9,
        "best_gflops": flops / timing["min_s"] / 1e9,
        "median_s": timing["median_s"],
        "runs": timing["runs"],
        "cpu_per_wall": timing["cpu_per_wall"],
        "threads": torch.get_num_threads(),
    }
