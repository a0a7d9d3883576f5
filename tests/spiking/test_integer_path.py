"""The integer path of spiking INT8 layers (``torch._int_mm``) against the fp32 simulation and hand-computed integer products.
The VNNI kernel for decode rows is off here (tests/spiking/test_row_kernel.py tests it), so that every product below is
``torch._int_mm``'s or oneDNN's.

References: the simulation is the spiked input (``spike_quantize``) times the dequantised
weight, which the layer computes when its integer path is off; integer products are summed
here with Python integers.
"""

from __future__ import annotations

import copy

import pytest
import torch

from reference_impl import assert_close
from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.ops.int8 import int8_matmul_available, onednn_int8_linear_available
from spikingbrain.spiking import int8
from spikingbrain.spiking.apply import spikify
from spikingbrain.spiking.int8 import (
    Int8Head, Int8Linear, fused_passes, per_token_int8_scale, quantize_activations_int8, quantize_model_int8, set_integer_matmul,
)
from spikingbrain.spiking.neuron import SpikingInput, round_half_up, spike_counts, spike_quantize

pytestmark = pytest.mark.skipif(not int8_matmul_available("cpu"), reason="this torch has no CPU int8 matmul")


@pytest.fixture(autouse=True)
def _products_by_int_mm():
    int8.row_kernel(False)
    yield
    int8.row_kernel(True)


def test_round_half_up_equals_the_fp64_formula():
    gen = torch.Generator().manual_seed(0)
    q = torch.cat([torch.randn(10000, generator=gen) * 300, torch.arange(-40, 40) / 2, torch.tensor([0.49999997, -0.50000006, 2.5000002])])
    q = torch.cat([q, q.nextafter(torch.tensor(float("inf"))), q.nextafter(torch.tensor(float("-inf")))])
    assert torch.equal(round_half_up(q), torch.floor(q.double() + 0.5).float())


def _layer(in_features, out_features, group_size, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    return Int8Linear.from_linear(linear, group_size)


def _massive(shape, seed=1):
    """Inputs whose spike counts reach thousands (massive activations in a few channels, in every token as in a
    trained model, and larger ones in some tokens)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    x[..., 3] = 2e3
    x[:, ::7, 5] = 1e5  # the count of this channel nears k · channels where it dominates the threshold
    x[0, ::5, 17] = -3e4
    return x


@pytest.mark.parametrize("group_size", [128, 0, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiled", [True, False])
def test_integer_path_equals_the_simulation_on_large_counts(group_size, bias, compiled):
    layer = _layer(1100, 24, group_size, bias)
    x = _massive((3, 40, 1100))
    counts, threshold = spike_counts(x)
    assert counts.abs().max() > 2000 and (counts.abs() > 127).any(-1).all()  # every row goes beyond ±127
    set_integer_matmul(layer, True)  # also for group sizes where the default is the simulation
    fused_passes(compiled)
    try:
        with torch.inference_mode():
            integer = layer(SpikingInput(x, 3.0))
    finally:
        fused_passes(True)
    # the simulation's product (spiked input times the dequantised weight) evaluated in fp64, and fp32 rounding:
    # a few ulps of the sum of the magnitudes of its terms
    simulated = torch.nn.functional.linear(spike_quantize(x, 3.0).double(), layer.dequantized_weight().double(),
                                           None if layer.bias is None else layer.bias.double())
    bound = 4e-7 * (counts.abs().float() * threshold) @ layer.dequantized_weight().abs().T + 1e-6
    assert ((integer.double() - simulated).abs() <= bound).all()


def _simulated(layer, x, k=3.0):
    """The simulation's product in fp64: the spiked input times the dequantised weight."""
    return torch.nn.functional.linear(spike_quantize(x, k).double(), layer.dequantized_weight().double(),
                                      None if layer.bias is None else layer.bias.double())


def _count_planes(monkeypatch):
    """Count the inputs the integer path counts spikes of."""
    calls = []
    count = int8._count
    monkeypatch.setattr(int8, "_count", lambda *args: calls.append(1) or count(*args))
    return calls


def test_sibling_projections_count_their_shared_input_once(monkeypatch):
    calls = _count_planes(monkeypatch)
    q, k = _layer(300, 16, 0, True, seed=1), _layer(300, 8, 0, False, seed=2)
    x = _massive((2, 30, 300))
    with torch.inference_mode():
        together = q(SpikingInput(x, 3.0)), k(SpikingInput(x, 3.0))
        assert len(calls) == 1
        alone = q(SpikingInput(x.clone(), 3.0)), k(SpikingInput(x.clone(), 3.0))  # other tensors: counted again
        assert len(calls) == 3
    for layer, a, b in zip((q, k), together, alone):
        assert torch.equal(a, b)
        assert_close(a, _simulated(layer, x), 1e-5, "integer path against the simulation")


def test_the_integer_path_counts_exactly_the_simulations_spikes():
    # many rows, so that a threshold an ulp off (a compiled mean sums in another order) would move some counts
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 576, generator=gen) * torch.rand(4096, 1, generator=gen) * 3
    x[:, 5] = 300.0
    with torch.inference_mode():
        got = int8._counts_of(x, int8.adaptive_threshold, 3.0)
    counts, threshold = spike_counts(x, 3.0)
    assert torch.equal(got.threshold, threshold)
    assert torch.equal(got.low.int(), counts.clamp(-127, 127))
    assert got.columns.tolist() == [5]
    assert torch.equal(got.excess, (counts[:, 5:6] - counts[:, 5:6].clamp(-127, 127)).float() * threshold)


@pytest.mark.parametrize("rows", [1, 2, 8, 9])
@pytest.mark.parametrize("activations", [None, "int8"])
def test_decode_rows_count_without_compiled_regions_and_equal_the_simulation(rows, activations):
    layer = _layer(300, 40, 0, True, seed=rows)
    layer.int8_activations = activations == "int8"
    x = _massive((1, rows, 300))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.inference_mode():
        got = layer(x if layer.int8_activations else SpikingInput(x, 3.0))
    calls = {event.key: event.count for event in profile.key_averages()}
    assert calls.get("aten::_int_mm", 0) == 1
    # up to DECODE_MAX_ROWS rows the counting and the dequantisation run eager: no compiled region
    compiled = any(key.startswith("Torch-Compiled Region") for key in calls)
    assert compiled == (rows > int8.DECODE_MAX_ROWS)
    spiked = quantize_activations_int8(x) if layer.int8_activations else spike_quantize(x, 3.0)
    simulated = torch.nn.functional.linear(spiked.double(), layer.dequantized_weight().double(), layer.bias.double())
    assert_close(got, simulated, 1e-6, "decode rows against the simulation")


@pytest.mark.parametrize("group_size", [0, 64])
@pytest.mark.parametrize("activations", [None, "int8"])
@pytest.mark.parametrize("rows", [6, 18])
def test_linked_siblings_multiply_as_one_product_and_equal_each_layer_alone(group_size, activations, rows):
    # q with a bias, k and v without, as a mixer's projections reading one input
    parent = torch.nn.Module()
    for name, out, bias, seed in (("q_proj", 24, True, 1), ("k_proj", 8, False, 2), ("v_proj", 8, False, 3)):
        layer = _layer(200, out, group_size, bias, seed)
        layer.int8_activations, layer.integer_matmul = activations == "int8", True
        setattr(parent, name, layer)
    alone = copy.deepcopy(parent)
    assert int8.link_sibling_products(parent) == 1 and int8.link_sibling_products(alone.q_proj) == 0
    x = _massive((1, rows, 200))
    inputs = (lambda t: t) if activations else (lambda t: SpikingInput(t, 3.0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.inference_mode():
        together = [parent.get_submodule(n)(inputs(x)) for n in ("q_proj", "k_proj", "v_proj")]
    # decode rows: one product per weight group for all three; more rows: each layer its own
    per_call = 1 if group_size == 0 else 4
    assert _integer_products(profile) == per_call * (1 if rows <= int8.DECODE_MAX_ROWS else 3)
    with torch.inference_mode():
        separate = [alone.get_submodule(n)(inputs(x.clone())) for n in ("q_proj", "k_proj", "v_proj")]
        # only some siblings asked (the sink keys and values), and one asked twice: each still gets its own product
        again = [parent.get_submodule(n)(inputs(x)) for n in ("k_proj", "v_proj", "v_proj")]
    for a, b in zip(together + again, separate + separate[1:] + separate[2:]):
        assert_close(a, b, 1e-6, "a linked sibling against the layer alone")


def test_a_changed_bias_reaches_the_integer_product():
    layer = _layer(64, 8, 0, True)
    x = torch.randn(20, 64)
    with torch.inference_mode():
        layer(SpikingInput(x, 3.0))  # builds the cached layout
    with torch.no_grad():
        layer.bias.add_(1.0)  # as an optimizer step would
    with torch.inference_mode():
        assert_close(layer(SpikingInput(x.clone(), 3.0)), _simulated(layer, x), 1e-5, "integer path after the bias changed")


def test_an_input_changed_in_place_is_counted_again(monkeypatch):
    calls = _count_planes(monkeypatch)
    layer = _layer(64, 8, 0, True)
    x = torch.randn(5, 64)
    with torch.no_grad():  # outside inference mode tensors keep their version counter
        before = layer(SpikingInput(x, 3.0))
        x[:, 3] *= 5000  # now beyond ±127 in one column
        after = layer(SpikingInput(x, 3.0))
    assert len(calls) == 2 and not torch.equal(before, after)
    assert_close(after, _simulated(layer, x), 1e-5, "integer path on the changed input")


def test_the_outlier_columns_of_one_layer_may_change_between_calls():
    layer = _layer(200, 12, 0, False)
    first, second = torch.randn(6, 200), torch.randn(6, 200)
    first[:, 7], second[:, 150], second[:, 151] = 4e3, -9e3, 3e3
    with torch.inference_mode():
        for x in (first, second, first):
            assert_close(layer(SpikingInput(x, 3.0)), _simulated(layer, x), 1e-5, "integer path with these outlier columns")


def test_integer_path_by_hand():
    layer = Int8Linear(4, 2, bias=True, group_size=2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1, -2, 3, 4], [-127, 5, 7, 127]], dtype=torch.int8))
        layer.weight_scale.copy_(torch.tensor([[0.5, 0.25], [2.0, 1.0]]))
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
    layer.integer_matmul = True  # two groups: by default the simulation
    # mean |x| = 0.9375; with k = 375 the threshold is 0.0025 and the counts reach 1200
    x = torch.tensor([[3.0, -0.5, 0.25, 0.0]])
    counts, threshold = spike_counts(x, k=375.0)
    assert counts.tolist() == [[1200, -200, 100, 0]]
    v = threshold.item()
    row0 = v * (0.5 * (1200 * 1 + -200 * -2) + 0.25 * (100 * 3)) + 1.0
    row1 = v * (2.0 * (1200 * -127 + -200 * 5) + 1.0 * (100 * 7)) - 1.0
    with torch.inference_mode():
        assert layer(SpikingInput(x, 375.0)).tolist()[0] == pytest.approx([row0, row1], rel=1e-6)


def test_outside_inference_the_layer_simulates_with_a_straight_through_gradient():
    layer = _layer(40, 6, 16, True)
    x = torch.randn(5, 40, requires_grad=True)
    y = layer(SpikingInput(x, 3.0))
    assert torch.equal(y, torch.nn.functional.linear(spike_quantize(x, 3.0), layer.dequantized_weight(), layer.bias))
    y.sum().backward()
    assert_close(x.grad, layer.dequantized_weight().sum(0).expand(5, 40), 1e-6, "straight-through gradient")


def _integer_products(profile) -> int:
    return sum(event.count for event in profile.key_averages() if event.key == "aten::_int_mm")


def _int_mm_calls(model, ids):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.inference_mode():
        logits = model(ids).logits
    return logits, _integer_products(profile)


def test_a_saved_spiking_int8_model_uses_the_integer_path_and_equals_the_simulation(tmp_path):
    config = SpikingBrainConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, layer_mixers=["gla", "swa"], sliding_window=5, max_position_embeddings=256,
    )
    torch.manual_seed(0)  # unseeded weights let a count cross a rounding boundary in about 1 run of 12 (4.9e-4 off)
    model = SpikingBrainForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embeddings.weight[:, 3] *= 2000  # a massive-activation channel: counts in the thousands
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    spikify(model, k=3)
    grouped = copy.deepcopy(model)
    quantize_model_int8(model, group_size=0)
    model.save_pretrained(tmp_path)
    loaded = SpikingBrainForCausalLM.from_pretrained(tmp_path).eval()
    integer, calls = _int_mm_calls(loaded, ids)
    assert calls == 15  # per-channel weights: every projection by default, one product each (40 rows: siblings alone)
    assert set_integer_matmul(loaded, False) == 15  # q k v o gk_proj.0 gate up down; q k v o gate up down
    simulated, calls = _int_mm_calls(loaded, ids)
    assert calls == 0
    assert_close(integer, simulated, 1e-4, "logits, integer path against simulation")
    # groups of 128: by default only the layers with one group per row (128 inputs) multiply in integers, not the
    # down projections (256 inputs, 2 groups), where the simulation ran faster; True forces them too
    quantize_model_int8(grouped, group_size=128)
    assert _int_mm_calls(grouped, ids)[1] == 13
    set_integer_matmul(grouped, True)
    assert _int_mm_calls(grouped, ids)[1] == 17


def test_int8_layers_hold_their_neuron_instead_of_a_module_hook():
    """``spikify`` gives each INT8 layer its neuron as ``spike_input`` (no forward pre-hook: a decode step calls ~220
    of them); the layer then computes what the hook computed (the simulation, outside the integer path), observers
    see its counts, and ``unspikify`` leaves the plain INT8 layer."""
    from spikingbrain.spiking.apply import observe_spikes, unspikify

    config = SpikingBrainConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, layer_mixers=["gla", "swa"], sliding_window=5, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = SpikingBrainForCausalLM(config).eval()
    quantize_model_int8(model, group_size=0)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        dense = model(ids).logits
    spikify(model, k=3)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.spike_input is not None and not m._forward_pre_hooks for m in layers)
    set_integer_matmul(model, False)
    with torch.inference_mode():
        got = model(ids).logits
    # the reference: the same INT8 layers with each input spiked by a plain pre-hook
    unspikify(model)
    handles = [m.register_forward_pre_hook(lambda module, args: (spike_quantize(args[0], 3.0),)) for m in layers]
    with torch.inference_mode():
        hooked = model(ids).logits
    for handle in handles:
        handle.remove()
    assert torch.equal(got, hooked) and not torch.equal(got, dense)
    spikify(model, k=3)
    seen = []
    with observe_spikes(model, lambda name, counts, threshold: seen.append(name)), torch.inference_mode():
        model(ids)
    assert len(seen) == len(layers)
    unspikify(model)
    assert all(m.spike_input is None for m in layers)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, dense)


def test_w8a8_by_hand():
    layer = Int8Linear(3, 2, bias=False, group_size=0, activations="int8")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2, -1, 127], [-3, 4, 0]], dtype=torch.int8))
        layer.weight_scale.copy_(torch.tensor([[0.5], [0.01]]))
    # max|x| = 2.54 -> s_x = 0.02; x / s_x = 127, -63.5 (a tie: rounds up to -63), 10.2 -> 10
    x = torch.tensor([[2.54, -1.27, 0.204]])
    codes = [127, -63, 10]
    s = 2.54 / 127
    expected = [s * 0.5 * (codes[0] * 2 + codes[1] * -1 + codes[2] * 127), s * 0.01 * (codes[0] * -3 + codes[1] * 4)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.inference_mode():
        integer = layer(x)
    assert _integer_products(profile) == 1
    assert integer.tolist()[0] == pytest.approx(expected, rel=1e-6)


def test_w8_decode_rows_by_hand_without_a_dequantised_weight():
    # W8 (plain input): a decode row takes the fused product over the codes, and no matmul of a dequantised weight runs
    layer = Int8Linear(4, 2, bias=True, group_size=2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2, -1, 127, 0], [-3, 4, 5, 6]], dtype=torch.int8))
        layer.weight_scale.copy_(torch.tensor([[0.5, 0.25], [0.01, 2.0]]))
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.tensor([[1.5, -2.0, 0.25, 3.0]])
    expected = [0.5 * (1.5 * 2 + -2.0 * -1) + 0.25 * (0.25 * 127) + 1.0,
                0.01 * (1.5 * -3 + -2.0 * 4) + 2.0 * (0.25 * 5 + 3.0 * 6) - 1.0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.inference_mode():
        fused = layer(x)
    assert not {"aten::mm", "aten::addmm", "aten::linear"} & {event.key for event in profile.key_averages()}
    assert fused.tolist()[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("group_size,rows", [(0, 1), (0, 8), (64, 3), (128, 1), (0, 9)])
def test_w8_fused_decode_product_equals_the_simulation(group_size, rows):
    # 576 inputs: groups of 64 divide the row and take the fused product; 128 (a shorter last group) and 9 rows do not
    layer = Int8Linear.from_linear(torch.nn.Linear(576, 96), group_size)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(5)) * 3
    with torch.inference_mode():
        assert layer._fused_weight_only(x) == (group_size != 128 and rows <= 8)
        fast = layer(x)
    simulated = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(fast, simulated, rtol=1e-5, atol=1e-5)
    assert not layer._fused_weight_only(x.requires_grad_())  # training multiplies the dequantised weight


@pytest.mark.parametrize("group_size", [0, 128])
def test_w8a8_integer_path_equals_its_simulation(group_size):
    linear = torch.nn.Linear(300, 40)
    layer = Int8Linear.from_linear(linear, group_size, activations="int8")
    x = torch.randn(2, 33, 300, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.01, 30, 300)
    x[0, 4] = 0.0  # an all-zero token
    set_integer_matmul(layer, True)
    with torch.inference_mode():
        integer = layer(x)
        set_integer_matmul(layer, False)
        simulated = layer(x)
    by_formula = torch.nn.functional.linear(quantize_activations_int8(x), layer.dequantized_weight(), layer.bias)
    assert torch.equal(simulated, by_formula)
    scale = per_token_int8_scale(x)
    bound = 4e-7 * (x.abs() + scale) @ layer.dequantized_weight().abs().T + 1e-6
    assert ((integer - simulated).abs() <= bound).all()
    # the rounding: every quantized input is an integer multiple of its token's scale, at most 127 of them
    q = quantize_activations_int8(x) / scale
    assert (q - q.round()).abs().max() < 1e-4 and q.abs().max() <= 127 + 1e-4


def test_a_saved_w8a8_model_reloads_as_w8a8_and_multiplies_in_integers(tmp_path):
    config = SpikingBrainConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, layer_mixers=["gla", "swa"], sliding_window=5, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = SpikingBrainForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        dense = model(ids).logits
    quantize_model_int8(model, group_size=0, activations="int8")
    model.save_pretrained(tmp_path)
    loaded = SpikingBrainForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.weight_quantization["activations"] == "int8"
    integer, calls = _int_mm_calls(loaded, ids)
    assert calls == 15  # one product per projection (per-channel scales)
    set_integer_matmul(loaded, False)
    simulated, calls = _int_mm_calls(loaded, ids)
    assert calls == 0
    # per layer the two agree to fp32 rounding (the test above); through two layers such a difference can move an
    # input across a rounding boundary of the next layer's per-token codes, one step of its scale
    assert_close(integer, simulated, 1e-3, "logits, W8A8 integer path against its simulation")
    assert (integer - dense).abs().max() < 0.1 * dense.abs().max()  # close to the dense model, not equal
    with pytest.raises(ValueError, match="activations must be one of"):
        Int8Linear(4, 4, bias=False, activations="int4")


def _onednn_products(profile) -> int:
    return sum(event.count for event in profile.key_averages() if event.key == "onednn::qlinear_pointwise")


@pytest.mark.skipif(not onednn_int8_linear_available(), reason="this torch has no oneDNN int8 linear")
def test_int8_head_decode_row_by_hand():
    head = Int8Head(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2, -1, 127], [-3, 4, 0]], dtype=torch.int8))
        head.weight_scale.copy_(torch.tensor([[0.5], [0.01]]))
    x = torch.tensor([[2.54, -1.27, 0.204]])  # codes 127, -63 (a tie rounds up), 10 at s_x = 2.54 / 127
    s = 2.54 / 127
    expected = [s * 0.5 * (127 * 2 + 63 + 10 * 127), s * 0.01 * (127 * -3 + -63 * 4)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.inference_mode():
        y = head(x)
    assert _onednn_products(profile) == 1 and _integer_products(profile) == 0
    assert y.tolist()[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.skipif(not onednn_int8_linear_available(), reason="this torch has no oneDNN int8 linear")
@pytest.mark.parametrize("rows", [1, 8, 9])
def test_int8_head_equals_its_simulation(rows):
    head = Int8Head.from_linear(torch.nn.Linear(576, 700, bias=False), 0, activations="int8")
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)) * torch.linspace(0.01, 20, 576)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.inference_mode():
        fast = head(x)
    assert _onednn_products(profile) == (rows if rows <= 8 else 0)  # one oneDNN call per decode row; more rows: _int_mm
    simulated = torch.nn.functional.linear(quantize_activations_int8(x), head.dequantized_weight())
    bound = 4e-7 * (x.abs() + per_token_int8_scale(x)) @ head.dequantized_weight().abs().T + 1e-6
    assert ((fast - simulated).abs() <= bound).all()
    with pytest.raises(ValueError, match="no bias"):
        Int8Head.from_linear(torch.nn.Linear(576, 7), 0, activations="int8")


def test_a_saved_model_with_an_int8_head_reloads_untied_with_fp32_embeddings(tmp_path):
    config = SpikingBrainConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, layer_mixers=["gla", "swa"], sliding_window=5, max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = SpikingBrainForCausalLM(config).eval()
    embeddings = model.model.embeddings.weight.detach().clone()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    quantize_model_int8(model, group_size=0, activations="int8", lm_head=True)
    assert isinstance(model.lm_head, Int8Head) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embeddings.weight, embeddings)  # the embeddings keep their fp32 weight
    codes, scales = int8.quantize_groups(embeddings, 128)
    assert torch.equal(model.lm_head.weight, codes) and torch.equal(model.lm_head.weight_scale, scales)
    model.save_pretrained(tmp_path)
    loaded = SpikingBrainForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.lm_head, Int8Head) and loaded.config.weight_quantization["lm_head"] is True
    assert torch.equal(loaded.lm_head.weight, codes) and torch.equal(loaded.model.embeddings.weight, embeddings)
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        set_integer_matmul(loaded, False)
        hidden = loaded.model(ids).last_hidden_state
        by_formula = torch.nn.functional.linear(quantize_activations_int8(hidden), int8.dequantize_groups(codes, scales, 128))
        assert_close(loaded(ids).logits, by_formula, 1e-6, "logits of the simulated INT8 head against the formula")
