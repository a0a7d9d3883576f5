"""The integer attention kernel (``ops/kernels/integer_attention.c``): spike-count queries times int8 keys, against the
dense masked softmax of tests/reference_impl.py in fp64 over the same dequantised numbers (W8ASpike's simulation), and
against a product computed by hand in integers.

Its scores equal the fp32 products up to rounding, its softmax uses a polynomial exp (relative error about 1e-7) and
its weighted sums are fp32, so outputs agree to 1e-5 of their largest value. With ``bf16_values`` each weight times its
value's scale is rounded to bf16 (at most 2^-9 of itself), so outputs agree to 2^-9 of the largest value.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_impl import assert_close, attention_reference, int8_rows_rounded, randomize_, sink_attention_reference
from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.ops import integer_attention as kernel_module
from spikingbrain.ops.attention import Int8Rows
from spikingbrain.ops.integer_attention import SPIKE_COUNT_LIMIT, bf16_values_supported, integer_attention, integer_attention_applies
from spikingbrain.spiking.apply import spikify
from spikingbrain.spiking.int8 import set_bf16_attention_values, set_integer_matmul
from spikingbrain.spiking.neuron import spike_counts

pytestmark = pytest.mark.skipif(kernel_module._library() is None, reason="no AVX-512 VNNI on this machine")

TOL = 1e-5


def _inputs(B, Tq, Tk, H, Hkv, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=gen)
    k, v = 2 * torch.randn(B, Tk, Hkv, D, generator=gen), torch.randn(B, Tk, Hkv, D, generator=gen)
    counts, thresholds = spike_counts(q, 3.0)
    return q, counts, thresholds, k, v


@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,D,window,keep_first", [
    (1, 100, 100, 9, 3, 64, None, 0),  # full causal attention, the shipped model's heads
    (2, 37, 90, 4, 2, 32, None, 0),  # a cached prefix
    (1, 300, 300, 9, 3, 64, 50, 0),  # a sliding window
    (1, 500, 1000, 9, 3, 64, 200, 30),  # a window with kept first keys, a cached prefix
    (2, 70, 70, 8, 1, 16, 9, 70),  # every key kept: plain causal attention
    (1, 257, 400, 8, 2, 128, 130, 3),  # SpikingBrain-7B's head size
    (1, 20, 45, 6, 3, 80, 4, 0),  # a head size that is not a multiple of 64
])
def test_matches_dense_attention_over_the_dequantised_numbers(B, Tq, Tk, H, Hkv, D, window, keep_first):
    q, counts, thresholds, k, v = _inputs(B, Tq, Tk, H, Hkv, D)
    with torch.inference_mode():
        assert integer_attention_applies(q, counts, k, v)
        got = integer_attention(counts, thresholds, k, v, window, keep_first=keep_first)
    n_keys = None if window is None else window + 1
    expected = attention_reference(counts.double() * thresholds.double(), int8_rows_rounded(k), int8_rows_rounded(v), n_keys,
                                   keep_first=keep_first)
    assert_close(got, expected, TOL, "integer attention")


def test_sink_keys_are_seen_by_every_query():
    q, counts, thresholds, k, v = _inputs(2, 60, 80, 4, 2, 32, seed=1)
    n = 3
    k[1, :n], v[1, :n] = k[0, :n], v[0, :n]  # sink keys are the model's, the same for every batch row
    with torch.inference_mode():
        got = integer_attention(counts, thresholds, k, v, 10, num_sinks=n, keep_first=2)
    rk, rv = int8_rows_rounded(k), int8_rows_rounded(v)
    expected = sink_attention_reference(counts.double() * thresholds.double(), rk[:, n:], rv[:, n:], rk[0, :n], rv[0, :n],
                                        n_keys=11, keep_first=2)
    assert_close(got, expected, TOL, "with sinks")


def test_scores_are_integer_products_computed_by_hand():
    """Two queries of one head over three keys: each score is (counts . codes) x threshold x key scale / sqrt(D)."""
    D = 16
    counts = torch.zeros(1, 2, 1, D, dtype=torch.int32)
    counts[0, 0, 0, :4] = torch.tensor([3, -1, 0, 2])
    counts[0, 1, 0, :4] = torch.tensor([-127, 5, 1, 0])
    thresholds = torch.tensor([0.25, 0.125]).view(1, 2, 1, 1)
    codes = torch.zeros(1, 3, 1, D, dtype=torch.int8)
    codes[0, :, 0, :4] = torch.tensor([[1, 2, 3, 4], [-5, 0, 7, 127], [0, -127, 2, -1]], dtype=torch.int8)
    key_scales = torch.tensor([0.01, 0.02, 0.005]).view(1, 3, 1)
    value_codes = torch.eye(3, D, dtype=torch.int8).mul(100).view(1, 3, 1, D)  # value j: 100 x unit vector j
    value_scales = torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1)
    with torch.inference_mode():
        got = integer_attention(counts, thresholds, Int8Rows(codes, key_scales), Int8Rows(value_codes, value_scales))
    dots = [[3 * 1 - 1 * 2 + 2 * 4, 3 * -5 + 2 * 127, 3 * 0 - 1 * -127 + 2 * -1],  # query 0's integer products
            [-127 * 1 + 5 * 2 + 3, -127 * -5 + 7, 5 * -127 + 2]]
    for i, position in enumerate((1, 2)):  # the queries sit at the last positions: query 0 sees keys 0 and 1
        scores = [dots[i][j] * float(thresholds[0, i]) * float(key_scales[0, j, 0]) / math.sqrt(D) for j in range(position + 1)]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        expected = [w / sum(weights) * 100 * float(value_scales[0, j, 0]) for j, w in enumerate(weights)]
        assert got[0, i, 0, :3].tolist() == pytest.approx(expected + [0.0] * (3 - len(expected)), rel=1e-6, abs=1e-7)


def test_the_weights_sum_to_one():
    """Equal values: the output is that value to fp32 precision (the weights sum to one)."""
    q, counts, thresholds, k, _ = _inputs(1, 200, 300, 4, 2, 64, seed=2)
    v = Int8Rows(torch.full((1, 300, 2, 64), 77, dtype=torch.int8), torch.full((1, 300, 2), 0.03))
    with torch.inference_mode():
        got = integer_attention(counts, thresholds, k, v, 100, keep_first=5)
    assert_close(got, torch.full_like(got, 77 * 0.03), 2e-6, "equal values")


def test_threads_give_the_same_output():
    q, counts, thresholds, k, v = _inputs(2, 150, 400, 9, 3, 64, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            one = integer_attention(counts, thresholds, k, v, 120)
            torch.set_num_threads(2)
            assert torch.equal(integer_attention(counts, thresholds, k, v, 120), one)
    finally:
        torch.set_num_threads(before)


def test_what_the_kernel_does_not_take():
    q, counts, thresholds, k, v = _inputs(1, 8, 8, 2, 1, 16)
    with torch.inference_mode():
        assert not integer_attention_applies(q.double(), counts, k, v)  # fp64: the simulation, exactly
        assert not integer_attention_applies(q[:, :1], counts[:, :1], k, v)  # one query: the decode kernel
        wide = counts.clone()
        wide[0, 0, 0, 0] = SPIKE_COUNT_LIMIT + 1
        assert not integer_attention_applies(q, wide, k, v)
        assert not integer_attention_applies(q[..., :8], counts[..., :8], k[..., :8], v[..., :8])  # D not a multiple of 16
    assert not integer_attention_applies(q, counts, k, v)  # gradients on


needs_bf16 = pytest.mark.skipif(not bf16_values_supported(), reason="no AVX-512 BF16 on this machine")


@needs_bf16
@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,D,window,keep_first", [
    (1, 300, 300, 9, 3, 64, 50, 0),
    (1, 500, 1000, 9, 3, 64, 200, 30),
    (1, 257, 400, 8, 2, 128, 130, 3),
    (2, 20, 45, 6, 3, 80, None, 0),  # a head size that is not a multiple of 64, batch rows
])
def test_bf16_values_match_dense_attention_within_their_rounding(B, Tq, Tk, H, Hkv, D, window, keep_first):
    q, counts, thresholds, k, v = _inputs(B, Tq, Tk, H, Hkv, D, seed=4)
    with torch.inference_mode():
        got = integer_attention(counts, thresholds, k, v, window, keep_first=keep_first, bf16_values=True)
    values = int8_rows_rounded(v)
    expected = attention_reference(counts.double() * thresholds.double(), int8_rows_rounded(k), values,
                                   None if window is None else window + 1, keep_first=keep_first)
    error = (got.double() - expected).abs().max().item()
    assert error <= 2**-9 * values.abs().max().item(), error


@needs_bf16
def test_bf16_values_round_each_weight_times_its_scale_by_hand():
    """One query over two keys with equal scores (weights 1 and 1): value scales 1 + 2^-10 (bf16: 1) and 3 (exact)."""
    D = 16
    counts, thresholds = torch.zeros(1, 2, 1, D, dtype=torch.int32), torch.ones(1, 2, 1, 1)
    keys = Int8Rows(torch.zeros(1, 2, 1, D, dtype=torch.int8), torch.ones(1, 2, 1))
    values = Int8Rows(torch.eye(2, D, dtype=torch.int8).mul(100).view(1, 2, 1, D), torch.tensor([1 + 2**-10, 3.0]).view(1, 2, 1))
    with torch.inference_mode():
        rounded = integer_attention(counts, thresholds, keys, values, bf16_values=True)
        exact = integer_attention(counts, thresholds, keys, values)
    assert rounded[0, 1, 0, :2].tolist() == [50.0, 150.0]  # (100 x 1, 100 x 3) / 2
    assert exact[0, 1, 0, :2].tolist() == pytest.approx([50 * (1 + 2**-10), 150.0], rel=1e-6)


@needs_bf16
def test_a_model_switches_to_bf16_values_and_back(monkeypatch):
    """The switch reaches each attention layer's kernel call; switched back, the logits are the exact path's again (a
    spiking model's own check against its simulation is the test above: a 2^-9 rounding moves spike counts)."""
    model = _w8aspike_model()
    calls = []
    original = kernel_module.integer_attention
    monkeypatch.setattr("spikingbrain.model.mixers.integer_attention",
                        lambda *a, **kw: calls.append(kw["bf16_values"]) or original(*a, **kw))
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        integer = model(ids).logits
        assert set_bf16_attention_values(model, True) == 2  # the window layer and the full one
        rounded = model(ids).logits
        set_bf16_attention_values(model, False)
        again = model(ids).logits
    assert calls == [False, False, True, True, False, False]
    assert torch.equal(again, integer) and not torch.equal(rounded, integer)


def test_bf16_values_are_refused_where_the_cpu_lacks_them(monkeypatch):
    monkeypatch.setattr("spikingbrain.ops.integer_attention.bf16_values_supported", lambda: False)
    with pytest.raises(RuntimeError, match="AVX-512 VNNI and BF16"):
        set_bf16_attention_values(_w8aspike_model(), True)
    assert set_bf16_attention_values(_w8aspike_model(), False) == 2
    _, counts, thresholds, k, v = _inputs(1, 8, 8, 2, 1, 16)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="leave them off"):
        integer_attention(counts, thresholds, k, v, bf16_values=True)


def test_a_config_asks_for_bf16_values_and_falls_back_with_a_warning(monkeypatch):
    """``attention_values_dtype: bfloat16`` (a quantize folder's config) switches the layers at construction; where the
    CPU lacks AVX-512 BF16 they keep fp32 values and say so; an unknown dtype is refused by name."""
    assert {m.bf16_attention_values for m in _w8aspike_model(attention_values_dtype="bfloat16").modules()
            if hasattr(m, "bf16_attention_values")} == {bf16_values_supported()}
    monkeypatch.setattr("spikingbrain.model.mixers.bf16_values_supported", lambda: False)
    with pytest.warns(UserWarning, match="attention_values_dtype: bfloat16 needs a CPU with AVX-512 VNNI and BF16"):
        model = _w8aspike_model(attention_values_dtype="bfloat16")
    assert not any(getattr(m, "bf16_attention_values", False) for m in model.modules())
    with pytest.raises(ValueError, match="attention_values_dtype='float16'"):
        _w8aspike_model(attention_values_dtype="float16")


def _w8aspike_model(**overrides) -> SpikingBrainForCausalLM:
    config = SpikingBrainConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3, layer_mixers=["swa", "gla", "full"], sliding_window=6, keep_first_tokens=2,
        gla_chunk_size=16, max_position_embeddings=4096, pad_token_id=0, **overrides,
    )
    model = randomize_(SpikingBrainForCausalLM(config), 0).eval()
    spikify(model, k=3, spike_query=True, int8_kv=True)
    return model


@pytest.mark.parametrize("overrides", [{}, {"num_sink_tokens": 2}])
def test_a_w8aspike_model_attends_in_integers_as_its_simulation(monkeypatch, overrides):
    model = _w8aspike_model(**overrides)
    calls = []
    original = kernel_module.integer_attention
    monkeypatch.setattr("spikingbrain.model.mixers.integer_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        integer = model(ids).logits
        assert len(calls) == 2  # the window layer and the full one
        cache = model.new_cache()
        streamed = torch.cat([model(ids[:, :17], cache=cache, use_cache=True).logits,
                              model(ids[:, 17:], cache=cache, use_cache=True).logits], 1)
        set_integer_matmul(model, False)
        simulated = model(ids).logits
    assert len(calls) == 6
    assert_close(integer, simulated, TOL, "integer attention against the simulation")
    assert_close(streamed, integer, 1e-5, "streamed prefill")
