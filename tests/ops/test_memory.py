"""Freed memory kept for reuse (``ops/memory.py``): large blocks allocated, freed and allocated again, as a prefill's
layers do, take fresh pages (one page fault per 4 KiB touched) every round where glibc maps them (its starting
threshold, held fixed, as the reference; its own adapting thresholds do so on some runs and not on others, which made
them no reference), and hardly any once ``keep_freed_memory`` has fixed the thresholds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spikingbrain.ops import memory

pytestmark = pytest.mark.skipif(memory._mallopt() is None, reason="not glibc: no mallopt")

_ROUNDS = """
import resource, sys, torch
from spikingbrain.ops.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:  # glibc's starting threshold (128 KiB), held there: every large block mapped fresh and given back on free
    from spikingbrain.ops.memory import _mallopt
    assert _mallopt()(-3, 128 * 1024)
torch.set_num_threads(1)
faults = [0] * 12
for i in range(12):  # four blocks of 9 MiB, filled, then freed: 36 MiB, past glibc's adapted trim threshold of 18 MiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones((9 << 20) // 4) for _ in range(4)]
    faults[i] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del blocks
print(sum(faults[2:]))
"""


def _faults_after_two_rounds(mode: str) -> int:
    """Page faults of rounds 3-12 in a fresh process (``mode``: keep, or mapped: glibc's starting mmap threshold held
    fixed; whatever the caller's environment set for malloc is left out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    command = [sys.executable, "-c", _ROUNDS, mode]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True, env=env)
    return int(done.stdout.split()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    kept, mapped = _faults_after_two_rounds("keep"), _faults_after_two_rounds("mapped")
    assert mapped >= 10 * 9216  # 36 MiB of fresh pages every round: the cost being removed
    assert kept * 4 <= mapped, (kept, mapped)


def test_the_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("SPIKINGBRAIN_KEEP_FREED_MEMORY", "0")
    assert memory.keep_freed_memory() is False
