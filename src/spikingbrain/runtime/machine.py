"""The machine a run uses: torch threads, the thread environment, load average, resident memory and a description for records."""

from __future__ import annotations

import contextlib
import os
import sys
import platform
from pathlib import Path

__all__ = ["set_threads", "thread_env", "load_average", "resident_bytes", "machine_info", "flushing_denormals"]


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch CPU threads (None keeps torch's default) and return the count in use."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def thread_env() -> dict[str, str | None]:
    """The environment variables that change how CPU threads wait and how many run (recorded with each result).

    On a machine shared with other busy processes, OpenMP's default spin-waiting threads can make
    a 2-thread prefill an order of magnitude slower; ``OMP_WAIT_POLICY=PASSIVE`` avoids that.
    """
    return {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def resident_bytes(pid: int | str = "self") -> int:
    """The resident memory of a process now (``VmRSS`` of ``/proc/PID/status``; Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS line in /proc/{pid}/status")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    """The machine and software a run used."""
    import torch

    return {
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
    }


@contextlib.contextmanager
def flushing_denormals():
    """Subnormal floats read and written as zero on this CPU thread while inside (attention backward on a CPU meets
    many tiny softmax weights and runs ~8x slower without it); the setting before is restored on the way out."""
    import torch

    was_flushing = sys.float_info.min / 2 == 0.0  # Python floats share the CPU's flush-to-zero mode
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_flushing)
