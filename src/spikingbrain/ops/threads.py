"""Thread counts of decode steps on CPU: PyTorch's small ops on one thread, our kernels on the caller's count.

A decode step runs thousands of ops on a few hundred numbers each. With two threads some of them (``exp``,
``logsigmoid``, small batched products) still enter a parallel region, and waking the second thread under
``OMP_WAIT_POLICY=PASSIVE`` costs far more than the op (``exp`` of 192 numbers: 47 µs on 2 threads against 1.2 µs on
one, here, with nothing else running). Inside :func:`small_ops_on_one_thread` PyTorch runs on one thread, and :func:`kernel_threads` still
gives our C kernels (the large products, attention over long windows) the count the caller had set."""

from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["small_ops_on_one_thread", "kernel_threads"]


class _State(threading.local):
    """Per thread (PyTorch's OpenMP thread count is each thread's own): how deep inside, and the count found there."""

    depth = 0
    outer: int | None = None


_state = _State()


@contextlib.contextmanager
def small_ops_on_one_thread(enabled: bool = True):
    """PyTorch on one thread in this thread while inside (``enabled``), its previous count restored after."""
    state = _state
    if not enabled:
        yield
        return
    if state.depth == 0:
        state.outer = torch.get_num_threads()
        if state.outer > 1:
            torch.set_num_threads(1)
    state.depth += 1
    try:
        yield
    finally:
        state.depth -= 1
        if state.depth == 0:
            if state.outer > 1:
                torch.set_num_threads(state.outer)
            state.outer = None


def kernel_threads() -> int:
    """Threads our C kernels may use: this thread's count, also inside :func:`small_ops_on_one_thread`."""
    outer = _state.outer
    return torch.get_num_threads() if outer is None else outer
