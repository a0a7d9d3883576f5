"""Helpers shared by benchmarks: timing, matmul peak, machine description, JSON, progress bars."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

__all__ = ["time_call", "matmul_peak", "machine_info", "load_average", "write_json", "progress", "set_threads"]


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch CPU threads (None keeps torch's default) and return the count in use."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


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


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    """The machine and software a benchmark ran on."""
    import torch

    return {
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
    }


def command_line() -> list[str]:
    """The command being run, as a user would type it (no machine path for the program)."""
    return ["spikingbrain", *sys.argv[1:]]


def write_json(path: str | Path, data: object) -> Path:
    """Write ``data`` as indented JSON to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def print_result(result: dict, as_json: bool) -> None:
    """Print a command's result as one JSON object, or as ``key: value`` lines."""
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def progress(total: int, desc: str, disable: bool = False):
    """A tqdm progress bar on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, dynamic_ncols=True)
