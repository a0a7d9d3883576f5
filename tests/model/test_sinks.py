"""Sink tokens: kernels and layers against dense fp64 attention with the sink rows prepended (explicit mask).

reference_impl.sink_attention_reference builds the [sinks | real] keys and a boolean mask
row by row: every real query sees all sink columns, plus its causal (or windowed) real keys
minus padding; windows count real tokens only.
"""

from __future__ import annotations

import pytest
import torch

from reference_impl import assert_close, reference_logits, sink_attention_reference, spec_for
from spikingbrain.model.mixers import SoftmaxAttention
from spikingbrain.ops import causal_attention, sliding_window_attention

TOL = 5e-5
H, HKV, D, N_SINKS = 4, 2, 8, 3


def tensors(B, Tq, Tk, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=gen)
    k = torch.randn(B, N_SINKS + Tk, HKV, D, generator=gen)
    v = torch.randn(B, N_SINKS + Tk, HKV, D, generator=gen)
    k[:, :N_SINKS], v[:, :N_SINKS] = k[:1, :N_SINKS], v[:1, :N_SINKS]  # sinks are shared by the batch
    return q, k, v


def reference(q, k, v, n_keys, mask=None):
    return sink_attention_reference(q, k[:, N_SINKS:], v[:, N_SINKS:], k[0, :N_SINKS], v[0, :N_SINKS], n_keys, mask)


@pytest.mark.parametrize("Tq,Tk", [(40, 40), (7, 40), (1, 40), (5, 5)], ids=["prefill", "cached-past", "decode", "short"])
def test_full_attention_with_sinks(Tq, Tk):
    q, k, v = tensors(2, Tq, Tk)
    assert_close(causal_attention(q, k, v, num_sinks=N_SINKS), reference(q, k, v, None), TOL, "full + sinks")


@pytest.mark.parametrize("window", [0, 3, 6, 50])
@pytest.mark.parametrize("Tq,Tk", [(45, 45), (9, 45), (1, 45)], ids=["prefill", "cached-past", "decode"])
def test_sliding_window_with_sinks(window, Tq, Tk):
    """Small query blocks so that the causal head, the banded blocks and a ragged last block all occur."""
    q, k, v = tensors(2, Tq, Tk, seed=1)
    got = sliding_window_attention(q, k, v, window, block_size=8, num_sinks=N_SINKS)
    assert_close(got, reference(q, k, v, window + 1), TOL, f"window {window} + sinks")


@pytest.mark.parametrize("window", [3, 50, None], ids=["window-3", "window-50", "full"])
def test_padded_batch_with_sinks(window):
    """Left padding hides real keys only: sinks stay visible to every (real) query."""
    Tq = Tk = 30
    q, k, v = tensors(2, Tq, Tk, seed=2)
    mask = torch.ones(2, Tk, dtype=torch.bool)
    mask[0, :11] = False
    if window is None:
        got, expected = causal_attention(q, k, v, key_padding_mask=mask, num_sinks=N_SINKS), reference(q, k, v, None, mask)
    else:
        got = sliding_window_attention(q, k, v, window, key_padding_mask=mask, block_size=8, num_sinks=N_SINKS)
        expected = reference(q, k, v, window + 1, mask)
    assert_close(got[0, 11:], expected[0, 11:], TOL, "padded row")
    assert_close(got[1], expected[1], TOL, "full row")


@pytest.mark.parametrize("layers", [["swa", "full"], ["full", "gla", "swa"]])
def test_model_with_sinks_equals_reference(tiny_model, layers):
    """Sinks never shift positions (the reference rotates real tokens at 0..T-1) nor appear in outputs."""
    model = tiny_model(layers, num_sink_tokens=4)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    out = model(ids, use_cache=False)
    assert out.logits.shape == (2, 40, 97)
    assert_close(out.logits, reference_logits(model.state_dict(), spec_for(model.config), ids), TOL, "sinks")
    out.logits.square().mean().backward()
    for layer, kind in zip(model.model.layers, layers):
        if kind != "gla":
            assert layer.attn.sinks.shape == (4, 32)
            assert layer.attn.sinks.grad is not None and layer.attn.sinks.grad.abs().sum() > 0


def test_sinks_matter(tiny_model):
    """Changing a sink changes the logits (so the reference comparison above is not vacuous)."""
    model = tiny_model(["swa"], num_sink_tokens=2)
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        model.model.layers[0].attn.sinks[1].add_(1.0)
        after = model(ids, use_cache=False).logits
    assert (before - after).abs().max() > 1e-3


def test_sink_keys_computed_once_per_cache(tiny_model, monkeypatch):
    """Decoding reuses the sink keys/values stored in the cache; a cache-less forward recomputes them."""
    model = tiny_model(["swa", "parallel-full", "gla"], num_sink_tokens=3)
    calls = []
    inner = SoftmaxAttention.sink_keys_values
    monkeypatch.setattr(SoftmaxAttention, "sink_keys_values", lambda self, proj: calls.append(self) or inner(self, proj))
    prompt = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert len(calls) == 2  # one per softmax attention, for 1 prefill + 5 decoding steps
    calls.clear()
    with torch.no_grad():
        model(prompt, use_cache=False)
    assert len(calls) == 2


def test_cache_holds_sinks_once(tiny_model):
    """Window caches keep the sinks apart (one copy for the batch); full caches keep them per row in their buffer."""
    model = tiny_model(["swa", "full"], num_sink_tokens=3)  # flash window 5: 5 cached real keys
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model(ids).cache
    kv = 2 * HKV * D * 4  # bytes of one position's keys and values (fp32)
    assert cache.layers[0].nbytes() == 2 * 5 * kv + 3 * kv
    assert cache.layers[1].nbytes() == 2 * (20 + 3) * kv


@pytest.mark.parametrize("layers", [["swa", "gla", "swa"], ["parallel-swa", "full"]])
@pytest.mark.parametrize("learned_sinks", [0, 2])
def test_keep_first_tokens_model_equals_reference(tiny_model, layers, learned_sinks):
    """The first real tokens stay visible to sliding-window queries past the window (window 5, 40 tokens)."""
    model = tiny_model(layers, keep_first_tokens=3, num_sink_tokens=learned_sinks)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(7))
    expected = reference_logits(model.state_dict(), spec_for(model.config), ids)
    with torch.no_grad():
        assert_close(model(ids, use_cache=False).logits, expected, TOL, "keep_first, no cache")
        cache, pieces, start = None, [], 0
        # chunks that start inside, at and past the kept tokens and window; 7 one-token steps go round the
        # window's ring buffer (6 slots) once, and the chunk after them reads it back in order
        for size in (2, 1, 4, 9, 1, 1, 1, 1, 1, 1, 1, 15, 2):
            out = model(ids[:, start : start + size], cache=cache, use_cache=True)
            cache, start = out.cache, start + size
            pieces.append(out.logits)
    assert_close(torch.cat(pieces, 1), expected, TOL, "keep_first, through the cache in pieces")
    window_cache = cache.layers[0] if layers[0] == "swa" else cache.layers[0].softmax
    assert window_cache.length == 3 + 5  # the kept first tokens and the window (flash window 5)
    plain = tiny_model(layers, num_sink_tokens=learned_sinks)
    with torch.no_grad():
        assert (plain(ids, use_cache=False).logits - expected.float()).abs().max() > 1e-3  # the kept tokens matter


def test_keep_first_tokens_refuses_left_padding_with_a_cache(tiny_model):
    model = tiny_model(["swa"], keep_first_tokens=2)
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="keep_first_tokens"):
        model(ids, attention_mask=mask, use_cache=True)
