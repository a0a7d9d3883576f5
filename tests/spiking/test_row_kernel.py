"""Decode rows and prefill rows of per-channel INT8 layers through the VNNI kernels, against the same layers'
``torch._int_mm`` product (bit for bit: the same integer sums and fp32 scaling) and the fp64 simulation.

References: ``row_kernel(False)`` gives the ``torch._int_mm`` path (tests/spiking/test_integer_path.py checks it against
hand-summed integers); the simulation is the quantized input times the dequantised weight in fp64.
"""

from __future__ import annotations

import copy

import pytest
import torch

from reference_impl import assert_close
from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.ops.int8 import int8_matmul_available, vnni_codes_product, vnni_pack_int8_weight, vnni_rows_available
from spikingbrain.spiking import int8
from spikingbrain.spiking.int8 import Int8Head, Int8Linear, quantize_activations_int8, quantize_model_int8
from spikingbrain.spiking.neuron import SpikingInput, spike_quantize

# (int8_matmul_available probes torch._int_mm once: here, before any call is counted)
pytestmark = pytest.mark.skipif(not (int8_matmul_available("cpu") and vnni_rows_available()), reason="no VNNI kernel on this machine")


def _calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.inference_mode():
        out = fn()
    counts = {e.key: e.count for e in profile.key_averages()}
    return out, counts.get("aten::_int_mm", 0), counts.get("onednn::qlinear_pointwise", 0)


def _by_int_mm(fn):
    int8.row_kernel(False)
    try:
        return _calls(fn)
    finally:
        int8.row_kernel(True)


def _layer(in_features, out_features, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        linear.bias.copy_(torch.randn(out_features, generator=gen))
    return Int8Linear.from_linear(linear, group_size)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("activations", [None, "int8"])
def test_decode_rows_take_the_kernel_and_equal_the_int_mm_product(rows, activations):
    layer = _layer(300, 40, 0, seed=rows)
    layer.int8_activations = activations == "int8"
    x = torch.randn(1, rows, 300, generator=torch.Generator().manual_seed(9))  # spike counts well inside ±127
    make = (lambda: layer(x)) if layer.int8_activations else (lambda: layer(SpikingInput(x, 3.0)))
    got, int_mm, _ = _calls(make)
    expected, int_mm_off, _ = _by_int_mm(make)
    assert (int_mm, int_mm_off) == (0, 1)
    assert torch.equal(got, expected)
    spiked = quantize_activations_int8(x) if layer.int8_activations else spike_quantize(x, 3.0)
    simulated = torch.nn.functional.linear(spiked.double(), layer.dequantized_weight().double(), layer.bias.double())
    assert_close(got, simulated, 1e-6, "kernel against the simulation")


def test_counts_beyond_127_add_their_excess_to_the_kernels_product():
    """Counts past ±127 (a massive-activation channel): the kernel's product of the clipped counts plus the excess
    columns in fp32 equals the two-plane ``torch._int_mm`` product bit for bit, and the fp64 simulation."""
    layer = _layer(300, 40, 0, seed=4)
    x = torch.randn(1, 2, 300, generator=torch.Generator().manual_seed(2))
    x[..., 3] = 2e3  # its count passes ±127
    x[0, 1, 7] = -900.0  # and one more channel, in one row only
    got, int_mm, _ = _calls(lambda: layer(SpikingInput(x, 3.0)))
    expected, int_mm_off, _ = _by_int_mm(lambda: layer(SpikingInput(x, 3.0)))
    assert (int_mm, int_mm_off) == (0, 1) and torch.equal(got, expected)
    simulated = torch.nn.functional.linear(spike_quantize(x, 3.0).double(), layer.dequantized_weight().double(), layer.bias.double())
    assert_close(got, simulated, 1e-6, "kernel plus excess against the simulation")


def test_grouped_weights_more_rows_and_gradients_keep_the_int_mm_product():
    grouped = _layer(256, 24, 64, seed=1)
    int8.set_integer_matmul(grouped, True)
    x = torch.randn(1, 2, 256)
    assert _calls(lambda: grouped(SpikingInput(x, 3.0)))[1] == 4  # one product per weight group
    assert _calls(lambda: grouped(SpikingInput(torch.randn(1, 9, 256), 3.0)))[1] == 4  # prefill rows too


@pytest.mark.parametrize("rows,in_features,out_features", [(9, 256, 24), (50, 300, 40), (100, 576, 960), (13, 1536, 576)])
def test_prefill_rows_take_the_counts_kernel_and_equal_the_int_mm_product(rows, in_features, out_features):
    """More than decode rows: the counting pass, then the kernel's product of the counts (tiles of 6 rows by 64 outputs
    and their edges), bit for bit the ``torch._int_mm`` product and its scaling, with counts beyond ±127 added in fp32."""
    layer = _layer(in_features, out_features, 0, seed=rows)
    x = torch.randn(2, rows, in_features, generator=torch.Generator().manual_seed(rows))
    x[..., 5] = 1.5e3  # a massive-activation channel: its counts pass ±127
    got, int_mm, _ = _calls(lambda: layer(SpikingInput(x, 3.0)))
    expected, int_mm_off, _ = _by_int_mm(lambda: layer(SpikingInput(x, 3.0)))
    assert (int_mm, int_mm_off) == (0, 1)
    assert torch.equal(got, expected)
    simulated = torch.nn.functional.linear(spike_quantize(x, 3.0).double(), layer.dequantized_weight().double(), layer.bias.double())
    assert_close(got, simulated, 1e-6, "counts kernel against the simulation")


def test_the_counts_kernel_computes_a_hand_checked_product():
    """Codes at the ends of the int8 range, a bias, one scale per row: ``s_m · scale_n · Σ_k codes · W + bias_n``."""
    weight = vnni_pack_int8_weight(torch.tensor([[1, -2, 3, 0], [127, 0, -127, 5]], dtype=torch.int8), torch.tensor([1.0, 0.25]),
                                   torch.tensor([0.5, 0.0]))
    codes = torch.tensor([[2, 3, 0, 127], [-127, 1, 127, -1]], dtype=torch.int8).repeat(7, 1)  # 14 rows: a tile and edges
    scales = torch.tensor([0.5, 2.0]).repeat(7)
    y = vnni_codes_product(codes, scales, weight)
    first = [0.5 * (2 - 6) + 0.5, 0.125 * (254 + 635)]
    second = [2.0 * (-127 - 2 + 381) + 0.5, 0.5 * (-16129 - 16129 - 5)]
    assert torch.equal(y, torch.tensor([first, second]).repeat(7, 1))
    with pytest.raises(ValueError, match="int8 CPU codes of 4 features"):
        vnni_codes_product(codes.float(), scales, weight)


def test_the_int8_head_takes_the_kernel_for_decode_rows():
    head = Int8Head.from_linear(torch.nn.Linear(576, 700, bias=False), 0, activations="int8")
    x = torch.randn(1, 2, 576, generator=torch.Generator().manual_seed(0))
    got, int_mm, onednn = _calls(lambda: head(x))
    assert int_mm == 0 and onednn == 0
    int8.row_kernel(False)
    try:
        with torch.inference_mode():
            int8.set_integer_matmul(head, False)  # the simulation, as oneDNN's rounding may differ from ours
            simulated = head(x)
    finally:
        int8.row_kernel(True)
        int8.set_integer_matmul(head, None)
    assert_close(got, simulated, 1e-6, "INT8 head by the kernel against its simulation")


def test_a_w8a8_model_decodes_the_same_tokens_with_and_without_the_kernel():
    config = SpikingBrainConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, layer_mixers=["gla", "swa"], sliding_window=8, max_position_embeddings=256, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = SpikingBrainForCausalLM(config).eval()
    quantize_model_int8(model, group_size=0, activations="int8")  # an fp32 head: without the kernel an INT8 one is oneDNN's
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))

    def decode(m):
        cache, steps = m.new_cache(), []
        logits = m(ids, cache=cache, use_cache=True).logits[:, -1]
        for _ in range(6):
            token = logits.argmax(-1, keepdim=True)
            logits = m(token, cache=cache, use_cache=True).logits[:, -1]
            steps.append(logits)
        return torch.cat(steps)

    with_kernel, int_mm, _ = _calls(lambda: decode(model))
    without, int_mm_off, _ = _by_int_mm(lambda: decode(copy.deepcopy(model)))
    prefill = _calls(lambda: model(ids, cache=model.new_cache(), use_cache=True))[1]
    assert int_mm == prefill < int_mm_off  # the 12-row prefill keeps torch._int_mm; the decode steps all take the kernel
    assert torch.equal(with_kernel, without)


@pytest.mark.parametrize("activations", [None, "int8"])
def test_sibling_projections_share_one_kernel_call_and_equal_each_layer_alone(monkeypatch, activations):
    """q, k and v linked as siblings: one kernel call for the three, each output bit-equal to the layer multiplied alone."""
    layers = [_layer(256, n, 0, seed=n) for n in (64, 32, 32)]
    layers[1].bias = None  # a member without a bias gets zeros in the shared product
    for layer in layers:
        layer.int8_activations = activations == "int8"
    alone = [copy.deepcopy(layer) for layer in layers]
    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = layers
    assert int8.link_sibling_products(parent) == 1
    calls = []
    product = int8.vnni_checked_rows_product
    monkeypatch.setattr(int8, "vnni_checked_rows_product", lambda *a: calls.append(a[0].shape) or product(*a))
    x = torch.randn(1, 3, 256, generator=torch.Generator().manual_seed(3))
    wrap = (lambda t: t) if activations else (lambda t: SpikingInput(t, 3.0))
    with torch.inference_mode():
        got = [layer(wrap(x)) for layer in layers]
        assert len(calls) == 1
        expected = [layer(wrap(x)) for layer in alone]
        assert len(calls) == 4
        got_again = layers[0](wrap(x + 1))  # another input: a new call, not the pending outputs
        assert len(calls) == 5 and torch.equal(got_again, alone[0](wrap(x + 1)))
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
