"""Freed memory kept for reuse (``ops/memory.py``): large blocks allocated, freed and allocated again, as a prefill's
layers do, take fresh pages (one page fault per 4 KiB touched) round after round under glibc's own adapting thresholds
(the heap's top is given back past twice the largest block freed so far), and hardly any once ``keep_freed_memory`` has
fixed them."""

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
    """Page faults of rounds 3-12 in a fresh process (``mode``: keep, or glibc's default, whatever the caller's
    environment set for malloc)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    command = [sys.executable, "-c", _ROUNDS, mode]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True, env=env)
    return int(done.stdout.split()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    kept, default = _faults_after_two_rounds("keep"), _faults_after_two_rounds("default")
    assert default >= 9216  # at least 36 MiB of fresh pages over ten rounds: the cost being removed
    assert kept * 4 <= default, (kept, default)


def test_the_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("SPIKINGBRAIN_KEEP_FREED_MEMORY", "0")
    assert memory.keep_freed_memory() is False
