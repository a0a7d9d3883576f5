"""The kernels' worker pool (``ops/kernels/thread_pool.c``), through the VNNI kernel: products split over the pool equal
the int64 reference of tests/ops/test_int8_kernel.py bit for bit, from several Python threads at once, with more threads
than cores, in a child forked after the pool started (which must start its own workers, not wait on its parent's), and
with loops whose workers poll afterwards (decode rows) alternating with loops whose workers sleep (prefill rows)."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest
import torch

from spikingbrain.ops.int8 import vnni_codes_product, vnni_int8_rows_product, vnni_pack_int8_weight, vnni_rows_available

pytestmark = pytest.mark.skipif(not vnni_rows_available(), reason="no AVX-512 VNNI kernel on this machine")


def weight_codes(seed: int) -> torch.Tensor:
    """The codes of ``_problem(seed)``'s weight: 4,099 outputs of 256 inputs."""
    return torch.randint(-127, 128, (4099, 256), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def _problem(seed: int = 0):
    """A product large enough to be split (4,099 outputs of 256 inputs), its rows, and the int64 reference."""
    codes = weight_codes(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    scales = torch.rand(4099, generator=gen)
    x = torch.randn(1, 256, generator=gen)
    s = x.abs().amax(-1) / 127
    q = torch.floor((x / s[:, None]).double() + 0.5).clamp(-127, 127).long()
    expected = ((q @ codes.long().t()).float() * scales) * s[:, None]
    return vnni_pack_int8_weight(codes, scales), x, s, expected


def _product_with(threads: int, weight, x, s) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return vnni_int8_rows_product(x, s, weight)[0]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_split_products_equal_the_reference(threads):
    weight, x, s, expected = _problem()
    for _ in range(20):  # the workers poll, sleep and wake between calls
        assert torch.equal(_product_with(threads, weight, x, s), expected)


def test_polling_and_sleeping_loops_alternate():
    """A decode-row product (its workers poll for the next call) and a prefill product of counts (its workers sleep
    right after) in turn: every worker wakes for the next loop of either kind, and each product is its reference."""
    weight, x, s, expected = _problem(3)
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(-127, 128, (200, 256), dtype=torch.int8, generator=gen)
    row_scales = torch.rand(200, generator=gen)
    many_expected = ((codes.long() @ weight_codes(3).long().t()).float() * weight.scales) * row_scales[:, None]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(20):
            assert torch.equal(vnni_int8_rows_product(x, s, weight)[0], expected)
            assert torch.equal(vnni_codes_product(codes, row_scales, weight), many_expected)
    finally:
        torch.set_num_threads(before)


def test_no_more_workers_than_usable_cpus():
    """Workers beyond the CPUs would poll on the cores the work needs: 64 threads asked for start at most one worker
    fewer than the usable CPUs (threads of this process counted in /proc)."""
    weight, x, s, expected = _problem(2)
    before = len(os.listdir("/proc/self/task"))
    assert torch.equal(_product_with(64, weight, x, s), expected)
    assert len(os.listdir("/proc/self/task")) - before <= len(os.sched_getaffinity(0)) - 1


def test_callers_in_several_threads_at_once_each_get_their_own_product():
    problems = [_problem(seed) for seed in range(4)]
    failures = []

    def work(problem):
        weight, x, s, expected = problem
        for _ in range(50):
            if not torch.equal(_product_with(2, weight, x, s), expected):
                failures.append("wrong product")

    threads = [threading.Thread(target=work, args=(p,)) for p in problems]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and failures == []


def _child(queue):
    torch.set_num_threads(1)  # PyTorch's own OpenMP threads cannot run in a forked child (libgomp); the kernel still gets 2
    weight, x, s, expected = _problem(1)
    queue.put(torch.equal(_product_with(2, weight, x, s), expected))


def test_a_forked_child_multiplies_with_workers_of_its_own():
    weight, x, s, expected = _problem(1)
    assert torch.equal(_product_with(2, weight, x, s), expected)  # the parent's workers exist now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0 and queue.get(timeout=10) is True
