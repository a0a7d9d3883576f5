"""Sliding-window and full causal attention against a dense masked softmax (tests/reference_impl.py).

The reference runs in fp64 on the same inputs; the kernels run in fp32 through SDPA, whose
softmax over at most a few hundred O(1) scores is accurate to ~1e-6, so 1e-5 relative to
max(1, |output|) is a safe bound that any wrong mask (one key too many or too few) breaks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impl import assert_close, attention_reference
from spikingbrain.ops import causal_attention, sliding_window_attention

TOL = 1e-5
D = 8


def qkv(B, Tq, Tk, H, Hkv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=gen)
    k = torch.randn(B, Tk, Hkv, D, generator=gen)
    v = torch.randn(B, Tk, Hkv, D, generator=gen)
    return q, k, v


HEADS = pytest.mark.parametrize("H,Hkv", [(6, 2), (3, 3)], ids=["gqa6x2", "mha3"])


@HEADS
@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("block_size", [4, 8, 16, 37, 64])
def test_sliding_window_matches_dense(H, Hkv, window, block_size):
    q, k, v = qkv(2, 37, 37, H, Hkv, seed=window)
    out = sliding_window_attention(q, k, v, window, block_size=block_size)
    assert_close(out, attention_reference(q, k, v, n_keys=window + 1), TOL, f"W={window} block={block_size}")


@HEADS
@pytest.mark.parametrize("Tq", [1, 5, 13])
@pytest.mark.parametrize("window", [8, 40])  # offset 50 - Tq is above / below the window
@pytest.mark.parametrize("block_size", [4, 16])
def test_sliding_window_with_cached_prefix(H, Hkv, Tq, window, block_size):
    q, k, v = qkv(2, Tq, 50, H, Hkv, seed=Tq)
    out = sliding_window_attention(q, k, v, window, block_size=block_size)
    assert_close(out, attention_reference(q, k, v, n_keys=window + 1), TOL, f"Tq={Tq} W={window}")


@pytest.mark.parametrize("Tq,Tk", [(20, 20), (7, 20), (1, 3)])
def test_window_larger_than_sequence_is_full_causal(Tq, Tk):
    q, k, v = qkv(2, Tq, Tk, 6, 2)
    expected = attention_reference(q, k, v)  # no window at all
    for window in (Tk - 1, Tk, 100):
        assert_close(sliding_window_attention(q, k, v, window, block_size=4), expected, TOL, f"W={window}")


def test_window_zero_sees_only_itself():
    q, k, v = qkv(1, 12, 15, 6, 2)
    out = sliding_window_attention(q, k, v, 0, block_size=5)
    # Query i (key position 3 + i) of head h returns v at that position of kv head h // 3.
    expected = v[:, 3:].repeat_interleave(3, dim=2)
    assert_close(out, expected, TOL, "window 0")
    assert_close(out, attention_reference(q, k, v, n_keys=1), TOL, "window 0 vs dense")


@HEADS
@pytest.mark.parametrize("window", [2, 6, 30])
@pytest.mark.parametrize("Tq", [25, 9])
def test_left_padding_mask(H, Hkv, window, Tq):
    Tk, pads = 25, [0, 7, 20]
    q, k, v = qkv(3, Tq, Tk, H, Hkv, seed=window)
    mask = torch.ones(3, Tk, dtype=torch.bool)
    for b, pad in enumerate(pads):
        mask[b, :pad] = False
    expected = attention_reference(q, k, v, n_keys=window + 1, key_padding_mask=mask)
    for block_size in (4, 7, 64):
        out = sliding_window_attention(q, k, v, window, key_padding_mask=mask, block_size=block_size)
        assert torch.isfinite(out).all(), "padded queries must stay finite"
        real = mask[:, Tk - Tq :]  # queries that are real tokens
        assert_close(out[real], expected[real], TOL, f"padding W={window} block={block_size}")


@HEADS
@pytest.mark.parametrize("Tq,Tk", [(30, 30), (9, 30), (1, 30)])
def test_causal_attention_matches_dense(H, Hkv, Tq, Tk):
    q, k, v = qkv(2, Tq, Tk, H, Hkv, seed=Tq)
    assert_close(causal_attention(q, k, v), attention_reference(q, k, v), TOL, "causal")
    assert_close(causal_attention(q, k, v, scale=0.2), attention_reference(q, k, v, scale=0.2), TOL, "scale")
    mask = torch.ones(2, Tk, dtype=torch.bool)
    mask[1, :11] = False
    out = causal_attention(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    real = mask[:, Tk - Tq :]
    assert_close(out[real], attention_reference(q, k, v, key_padding_mask=mask)[real], TOL, "causal padding")


def test_custom_scale_in_sliding_window():
    q, k, v = qkv(1, 40, 40, 6, 2)
    out = sliding_window_attention(q, k, v, 5, scale=0.5, block_size=8)
    assert_close(out, attention_reference(q, k, v, n_keys=6, scale=0.5), TOL, "scale")


def test_sliding_window_cost_is_linear_in_length(monkeypatch):
    """Every SDPA call sees at most block_size + window keys, and all score matrices together hold O(T * W)."""
    T, H, Hkv, window, block = 2048, 4, 2, 32, 64
    q, k, v = qkv(1, T, T, H, Hkv)
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, *args, **kwargs):
        batch = math.prod(query.shape[:-2])
        calls.append((query.shape[-2], key.shape[-2], batch))
        return real_sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    out = sliding_window_attention(q, k, v, window, block_size=block)
    monkeypatch.undo()
    assert calls, "sliding_window_attention did not go through SDPA"
    assert max(keys for _, keys, _ in calls) <= block + window
    score_entries = sum(rows * keys * batch for rows, keys, batch in calls)
    assert score_entries <= H * (T + block) * (block + window)  # vs H * T * T = 16.8M for dense attention
    assert_close(out, attention_reference(q, k, v, n_keys=window + 1), TOL, "long sequence")


def test_invalid_inputs_raise_value_error():
    q, k, v = qkv(1, 10, 10, 6, 2)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, -1)
    for fn in (causal_attention, lambda *a, **kw: sliding_window_attention(*a, window=3, **kw)):
        with pytest.raises(ValueError):
            fn(q, k[:, :5], v[:, :5])  # Tk < Tq
        with pytest.raises(ValueError):
            fn(q[:, :, :5], k, v)  # 5 heads over 2 kv heads
        with pytest.raises(ValueError):
            fn(q, k, v, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))


@HEADS
@pytest.mark.parametrize("keep_first", [1, 4])
@pytest.mark.parametrize("window", [2, 9])
@pytest.mark.parametrize("Tq,Tk", [(40, 40), (13, 40), (1, 40), (3, 12), (1, 12)])  # (1, 12): a decode step over a full cache
def test_keep_first_matches_dense(H, Hkv, keep_first, window, Tq, Tk):
    """The first keys stay visible past the window (StreamingLLM sinks), also with a cached prefix."""
    q, k, v = qkv(2, Tq, Tk, H, Hkv, seed=window + Tq)
    expected = attention_reference(q, k, v, n_keys=window + 1, keep_first=keep_first)
    for block_size in (4, 7, 64):
        out = sliding_window_attention(q, k, v, window, block_size=block_size, keep_first=keep_first)
        assert_close(out, expected, TOL, f"keep_first={keep_first} W={window} Tq={Tq} block={block_size}")
    without = attention_reference(q, k, v, n_keys=window + 1)
    if Tk - keep_first > window + 1:  # the window has passed the first keys: they must change the output
        assert (expected[:, -1] - without[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("window", [2, 6])
def test_keep_first_with_padding_keeps_each_rows_first_real_keys(window):
    Tk, pads = 25, [0, 7, 15]
    q, k, v = qkv(3, Tk, Tk, 6, 2, seed=window)
    mask = torch.ones(3, Tk, dtype=torch.bool)
    for b, pad in enumerate(pads):
        mask[b, :pad] = False
    expected = attention_reference(q, k, v, n_keys=window + 1, key_padding_mask=mask, keep_first=3)
    out = sliding_window_attention(q, k, v, window, key_padding_mask=mask, keep_first=3)
    assert torch.isfinite(out).all()
    assert_close(out[mask], expected[mask], TOL, f"padding + keep_first W={window}")
