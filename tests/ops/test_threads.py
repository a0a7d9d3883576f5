"""Decode steps run PyTorch on one thread and our kernels on the caller's count, and leave the count as they found it."""

from __future__ import annotations

import threading

import torch

from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.ops.threads import kernel_threads, small_ops_on_one_thread


def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_inside_torch_has_one_thread_and_kernels_the_callers_count():
    def check():
        with small_ops_on_one_thread():
            inside = torch.get_num_threads(), kernel_threads()
            with small_ops_on_one_thread():  # nested: still one, and the outer count for kernels
                nested = torch.get_num_threads(), kernel_threads()
            after_nested = torch.get_num_threads()
        with small_ops_on_one_thread(enabled=False):
            disabled = torch.get_num_threads(), kernel_threads()
        return inside, nested, after_nested, disabled, torch.get_num_threads(), kernel_threads()

    assert _with_threads(2, check) == ((1, 2), (1, 2), 1, (2, 2), 2, 2)


def test_each_thread_keeps_its_own_count():
    """PyTorch's thread count is per thread: a caller inside in one thread leaves another thread's count alone."""
    entered, release, seen = threading.Barrier(2), threading.Event(), {}

    def caller():
        torch.set_num_threads(2)
        with small_ops_on_one_thread():
            seen["worker inside"] = torch.get_num_threads(), kernel_threads()
            entered.wait()
            release.wait(30)
        seen["worker after"] = torch.get_num_threads()

    def run():
        worker = threading.Thread(target=caller)
        worker.start()
        entered.wait()
        seen["main meanwhile"] = torch.get_num_threads(), kernel_threads()
        release.set()
        worker.join()
        return seen

    assert _with_threads(2, run) == {"worker inside": (1, 2), "main meanwhile": (2, 2), "worker after": 2}


def test_a_decode_step_leaves_the_thread_count_and_its_logits_unchanged():
    config = SpikingBrainConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                num_hidden_layers=2, layer_mixers=["gla", "swa"], sliding_window=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = SpikingBrainForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        full = model(ids).logits[:, -1]

        def step():
            cache = model.new_cache()
            model(ids[:, :8], cache=cache, use_cache=True)
            return model(ids[:, 8:], cache=cache, use_cache=True).logits[:, -1], torch.get_num_threads()

        logits, threads = _with_threads(2, step)
    assert threads == 2
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
