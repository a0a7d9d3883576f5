"""The decode-attention kernel (``ops/kernels/decode_attention.c``): one query per head over every key, against the
dense masked softmax of tests/reference_impl.py in fp64.

Its scores, softmax and weighted sums are fp32 with fused multiply-adds and a polynomial exp (relative error about
1e-7), so 1e-5 relative to max(1, |output|) holds over thousands of keys; a wrong head, key or stride breaks it.
"""

from __future__ import annotations

import pytest
import torch

from reference_impl import assert_close, attention_reference, int8_rows_rounded
from spikingbrain.ops import attention
from spikingbrain.ops.attention import causal_attention, decode_attention_available

pytestmark = pytest.mark.skipif(not decode_attention_available(), reason="no AVX-512 decode-attention kernel on this machine")

TOL = 1e-5


def _calls(monkeypatch) -> list:
    """Record the kernel's calls (it still computes each)."""
    calls, kernel = [], attention._kernel_attention
    monkeypatch.setattr(attention, "_kernel_attention", lambda *a: calls.append(a[1].shape) or kernel(*a))
    return calls


@pytest.mark.parametrize("B,H,Hkv,D", [(1, 9, 3, 64), (2, 4, 4, 8), (1, 8, 1, 20), (2, 14, 2, 80), (1, 5, 5, 16)])
@pytest.mark.parametrize("Tk", [1, 7, 300, 2049])
def test_one_query_over_every_key_matches_dense(monkeypatch, B, H, Hkv, D, Tk):
    """Grouped heads (G = 1, 3, 7, 8: more than the four summed at once), head sizes off and over the 16-float chunks,
    and 2,049 keys: attended in four uneven parts, merged."""
    gen = torch.Generator().manual_seed(Tk + D)
    q, k, v = torch.randn(B, 1, H, D, generator=gen), torch.randn(B, Tk, Hkv, D, generator=gen), torch.randn(B, Tk, Hkv, D, generator=gen)
    calls = _calls(monkeypatch)
    assert_close(causal_attention(q, k, v), attention_reference(q, k, v), TOL, "kernel")
    assert_close(causal_attention(q, k, v, scale=0.7), attention_reference(q, k, v, scale=0.7), TOL, "scale")
    assert len(calls) == 2


def test_head_major_buffers_ring_order_and_large_scores(monkeypatch):
    """Keys stored head-major with room to spare (the caches' step buffers), handed over out of order (a ring):
    the output is the dense attention over the same keys; scores 60 apart (weights under e^-60) stay exact."""
    gen = torch.Generator().manual_seed(3)
    B, T, Hkv, H, D = 2, 4608, 3, 9, 64
    buffers = [torch.randn(B, Hkv, T + 100, D, generator=gen).transpose(1, 2)[:, :T] for _ in range(2)]
    k, v = buffers
    k[:, 17] *= 12.0  # a few keys far above the rest
    q = torch.randn(B, 1, H, D, generator=gen) * 3
    calls = _calls(monkeypatch)
    got = causal_attention(q, k, v)
    order = torch.randperm(T, generator=gen)
    assert_close(got, attention_reference(q, k[:, order], v[:, order]), TOL, "head-major ring")
    assert calls == [k.shape] and k.stride(1) == D


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_same_output(threads):
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 1, 8, 64, generator=gen), torch.randn(2, 3000, 2, 64, generator=gen), torch.randn(2, 3000, 2, 64, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    expected = causal_attention(q, k, v)
    torch.set_num_threads(threads)
    try:
        assert torch.equal(causal_attention(q, k, v), expected)
    finally:
        torch.set_num_threads(before)


def test_other_dtypes_gradients_and_masks_keep_sdpa(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 1, 4, 8, generator=gen), torch.randn(1, 6, 2, 8, generator=gen), torch.randn(1, 6, 2, 8, generator=gen)
    calls = _calls(monkeypatch)
    assert_close(causal_attention(q.double(), k.double(), v.double()), attention_reference(q, k, v), 1e-12, "fp64")
    q.requires_grad_(True)
    causal_attention(q, k, v).sum().backward()
    assert q.grad is not None
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[0, 0] = False
    with torch.no_grad():
        assert_close(causal_attention(q, k, v, key_padding_mask=mask), attention_reference(q, k, v, key_padding_mask=mask), TOL, "mask")
    assert calls == []


@pytest.mark.parametrize("B,H,Hkv,D", [(1, 9, 3, 64), (2, 8, 1, 20)])
@pytest.mark.parametrize("Tk", [5, 2049])
def test_fp16_keys_and_values_are_widened_exactly(monkeypatch, B, H, Hkv, D, Tk):
    """fp16 keys and values (a window cache's fp16 decode ring), read by the kernel: the dense fp64 attention over the
    same fp16 numbers, head-major buffers included; on a path without the kernel they are widened to the query's dtype."""
    gen = torch.Generator().manual_seed(Tk)
    q = torch.randn(B, 1, H, D, generator=gen)
    k, v = (torch.randn(B, Hkv, Tk, D, generator=gen).half().transpose(1, 2) for _ in range(2))
    calls = _calls(monkeypatch)
    assert_close(causal_attention(q, k, v), attention_reference(q, k.float(), v.float()), TOL, "fp16 kernel")
    assert len(calls) == 1
    two = torch.randn(B, 2, H, D, generator=gen)  # two queries: SDPA after widening
    assert_close(causal_attention(two, k, v), attention_reference(two, k.float(), v.float()), TOL, "fp16 widened")
    assert len(calls) == 1


@pytest.mark.parametrize("Tk", [5, 2049])
def test_int8_rows_are_attended_with_their_scales(monkeypatch, Tk):
    """Keys and values as int8 codes with a scale per position and head (``Int8Rows``, head-major like a window cache's
    ring): the kernel gives the dense fp64 attention over the hand-rounded rows; without the kernel (two queries) the
    rows are dequantized first, to the same result."""
    from spikingbrain.ops.attention import Int8Rows

    gen = torch.Generator().manual_seed(Tk + 1)
    B, H, Hkv, D = 2, 9, 3, 64
    q = torch.randn(B, 1, H, D, generator=gen)
    floats = [torch.randn(B, Tk, Hkv, D, generator=gen) * torch.rand(B, Tk, Hkv, 1, generator=gen) * 4 for _ in range(2)]
    k, v = (Int8Rows.quantized(x) for x in floats)
    assert k.codes.transpose(1, 2).is_contiguous()  # head-major, as a window cache's ring
    rounded = [int8_rows_rounded(x) for x in floats]
    assert torch.allclose(k.to(torch.float32), rounded[0], rtol=1e-6, atol=1e-6)
    calls = _calls(monkeypatch)
    assert_close(causal_attention(q, k, v), attention_reference(q, *rounded), TOL, "int8 kernel")
    assert len(calls) == 1
    two = torch.randn(B, 2, H, D, generator=gen)
    assert_close(causal_attention(two, k, v), attention_reference(two, *rounded), TOL, "int8 dequantized")
    assert len(calls) == 1


@pytest.mark.parametrize("B,Hkv,D", [(1, 3, 64), (2, 2, 20), (3, 1, 8)])
def test_int8_rows_written_by_the_kernel_equal_the_indexed_write_and_a_hand_rounding(B, Hkv, D):
    """A decode step's row into an int8 ring (``Int8Rows.set_position``, one kernel call) stores the codes and scales
    that the indexed write stores, and those round each row to max|row| / 127 by hand; a row of zeros and ties too."""
    from spikingbrain.ops.attention import Int8Rows

    rows = torch.randn(B, Hkv, D, generator=torch.Generator().manual_seed(D)) * torch.logspace(-3, 3, Hkv).view(1, Hkv, 1)
    rows[0, 0] = 0.0  # scale FLT_MIN / 127, codes 0
    if D >= 8:
        rows[-1, -1] = 0.0
        rows[-1, -1, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: ties go to even
    like = torch.empty(B, 5, Hkv, D)
    kernel, indexed = Int8Rows.empty(like, 5), Int8Rows.empty(like, 5)
    kernel.set_position(3, rows)
    indexed[:, 3] = rows
    assert torch.equal(kernel.codes[:, 3], indexed.codes[:, 3]) and torch.equal(kernel.scales[:, 3], indexed.scales[:, 3])
    scale = rows.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    assert torch.equal(kernel.scales[:, 3], scale.squeeze(-1))
    assert torch.equal(kernel.codes[:, 3], torch.round(rows / scale).to(torch.int8))
    if D >= 8:
        assert kernel.codes[-1, 3, -1, :4].tolist() == [127, 0, 2, -2]
    strided = rows.transpose(0, 1).contiguous().transpose(0, 1)  # another row order in memory
    kernel.set_position(1, strided)
    assert torch.equal(kernel.codes[:, 1], indexed.codes[:, 3])
