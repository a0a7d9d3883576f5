"""Spiking applied to models, W8ASpike INT8 weights, statistics and event export, against independent references.

The spiking forward is compared with the fp64 reference of tests/reference_impl.py whose
projections spike their inputs by its own formula (``SpikingWeights``); INT8 layers against a
dense matmul with hand-dequantised weights and against integer arithmetic; statistics against
counts and spike trains computed here by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference_impl import SpikingWeights, assert_close, randomize_, reference_logits, spec_for, spike_reference
from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.spiking.apply import current_spiking, observe_spikes, spikify, spiking_linears, spiking_off, unspikify
from spikingbrain.spiking.coding import encode
from spikingbrain.spiking.events import SpikeEventRecorder, read_events, write_events
from spikingbrain.spiking.int8 import Int8Linear, clip_ratios, fake_quantize_int8, quantize_groups, quantize_model_int8
from spikingbrain.spiking.stats import SpikeStatistics, energy_estimate, spikes_per_coding

TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
    sliding_window=5, gla_chunk_size=16, max_position_embeddings=4096, pad_token_id=0,
)


def tiny(layers=("gla", "swa", "gla", "full"), seed=0, **overrides) -> SpikingBrainForCausalLM:
    config = SpikingBrainConfig(num_hidden_layers=len(layers), layer_mixers=list(layers), **{**TINY, **overrides})
    return randomize_(SpikingBrainForCausalLM(config), seed).eval().double()


def ids(T=24, seed=1):
    return torch.randint(3, 97, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{}, {"spike_query": True, "int8_kv": True}])
def test_spiking_forward_equals_the_reference(options):
    model = tiny()
    x = ids()
    dense = reference_logits(model.state_dict(), spec_for(model.config), x)
    spikify(model, k=3, **options)
    expected = reference_logits(SpikingWeights(model.state_dict(), 3, **options), spec_for(model.config), x)
    with torch.no_grad():
        got = model(x).logits
    assert_close(got, expected, 1e-5, "spiking logits")
    assert (expected - dense).abs().max() > 1e-3  # spiking really changes the model
    unspikify(model)
    with torch.no_grad():
        assert_close(model(x).logits, dense, 1e-5, "after unspikify")


def test_spiking_off_computes_dense_and_restores_the_settings():
    model = tiny()
    x = ids()
    dense = reference_logits(model.state_dict(), spec_for(model.config), x)
    spikify(model, k=2.5, spike_query=True)
    expected = reference_logits(SpikingWeights(model.state_dict(), 2.5, spike_query=True), spec_for(model.config), x)
    settings = dict(current_spiking(model))
    with pytest.raises(KeyError), torch.no_grad(), spiking_off(model):
        assert_close(model(x).logits, dense, 1e-5, "inside spiking_off")
        spikify(model, k=4)  # the block changes the settings, then fails
        raise KeyError("failure inside the block")
    assert current_spiking(model) == settings and model.config.spiking == settings
    with torch.no_grad():
        assert_close(model(x).logits, expected, 1e-5, "spiking restored")
    unspikify(model)
    with spiking_off(model):
        spikify(model, k=3)
    assert current_spiking(model) is None  # a dense model stays dense


def test_targets_cover_every_projection_and_nothing_else():
    model = tiny(("parallel-swa", "gla"), num_experts=3, num_shared_experts=1, dense_ffn_layers=[1])
    names = set(spiking_linears(model))
    assert "model.layers.1.attn.gk_proj.0" in names and "model.layers.1.attn.gk_proj.1" not in names
    assert "model.layers.0.mlp.experts.2.down_proj" in names and "model.layers.0.mlp.shared_experts.0.up_proj" in names
    assert not any(n.endswith(("router", "lm_head")) or "embeddings" in n for n in names)
    x = ids(12)
    spikify(model, k=2.5)
    expected = reference_logits(SpikingWeights(model.state_dict(), 2.5), spec_for(model.config), x)
    with torch.no_grad():
        assert_close(model(x).logits, expected, 1e-5, "MoE + parallel spiking logits")


def test_spiking_settings_survive_save_and_load(tmp_path):
    model = tiny().float()
    spikify(model, k=3.5, spike_query=True)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = SpikingBrainForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.spiking["k"] == 3.5 and loaded.config.spiking["spike_query"]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, before)


def test_cached_decoding_of_a_spiking_model_equals_the_one_shot_forward():
    model = tiny()
    spikify(model, k=3, spike_query=True, int8_kv=True)
    x = ids(20)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        steps = [model(x[:, :13], cache=cache, use_cache=True).logits]
        steps += [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(13, 20)]
    assert_close(torch.cat(steps, 1), full, 1e-5, "prefill + decode")


def test_straight_through_gradient_of_a_spiking_projection():
    linear = torch.nn.Linear(6, 3).double()
    model = torch.nn.Sequential()
    model.add_module("up_proj", linear)
    spikify(model, k=3)
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    y = model(x)
    assert_close(y, spike_reference(x.detach(), 3) @ linear.weight.T + linear.bias, 1e-12, "spiking linear")
    y.sum().backward()
    assert torch.allclose(x.grad, linear.weight.sum(0).expand(4, 6))  # identity through the neuron


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="k must be > 0"):
        spikify(tiny(), k=0)
    with pytest.raises(ValueError, match="no projection .* matches"):
        spikify(tiny(), targets=["nothing"])
    with pytest.raises(ValueError, match="weight_quantization.bits"):
        SpikingBrainConfig(weight_quantization={"bits": 4, "group_size": 128})


# ----------------------------------------------------------------------------- INT8 weights


def test_group_quantization_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5, 4.0, 3.0], [0.0, 0.0, 0.0, -1.0, 0.25]])
    codes, scales = quantize_groups(w, group_size=3)
    assert torch.allclose(scales, torch.tensor([[2 / 127, 4 / 127], [1.0, 1 / 127]]))  # an all-zero group keeps scale 1
    expected = torch.tensor([[64, -127, 32, 127, 95], [0, 0, 0, -127, 32]], dtype=torch.int8)  # round(w / scale)
    assert torch.equal(codes, expected)


def test_int8_linear_equals_dense_and_integer_arithmetic():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(300, 7)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(7, 300, generator=gen))
    layer = Int8Linear.from_linear(linear, group_size=128)
    codes, scales = layer.weight.long(), layer.weight_scale.double()
    dequantized = torch.stack([codes[:, i].double() * scales[:, i // 128] for i in range(300)], 1)
    x = torch.randn(5, 300, generator=gen)
    assert_close(layer(x), x.double() @ dequantized.T + linear.bias.double(), 1e-6, "dequantized matmul")
    # spike counts through INT8 weights: integer dot products inside each group, one scale per group
    counts = torch.randint(-9, 10, (5, 300), generator=gen)
    threshold = torch.rand(5, 1, generator=gen, dtype=torch.double) + 0.1
    integer = sum(
        (counts[:, g : g + 128] @ codes[:, g : g + 128].T).double() * scales[:, g // 128] for g in range(0, 300, 128)
    )
    expected = threshold * integer + linear.bias.double()
    assert_close(layer((counts * threshold).float()), expected, 1e-5, "integer path")
    assert (layer.weight.abs() <= 127).all()


def test_calibrated_clipping_never_does_worse_than_round_to_nearest():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 256, generator=gen)
    w[:, 7] *= 30  # an outlier column makes clipping worth it for the other channels
    x = torch.randn(512, 256, generator=gen)
    x[:, 7] *= 0.01
    gram = x.T.double() @ x.double()

    def error(clip):
        codes, scales = quantize_groups(w, 128, clip)
        q = codes.double() * scales.double().repeat_interleave(128, 1)
        return ((x.double() @ (q - w.double()).T) ** 2).sum()

    clip = clip_ratios(w, gram, 128)
    assert error(clip) < error(None)
    assert (clip < 1).any()


def test_int8_model_saves_small_and_loads_back(tmp_path):
    model = tiny(hidden_size=128, intermediate_size=256, vocab_size=64).float()
    dense_dir, int8_dir = tmp_path / "dense", tmp_path / "int8"
    model.save_pretrained(dense_dir)
    x = torch.randint(0, 64, (1, 16))
    spikify(model, k=3)
    quantize_model_int8(model, group_size=128, calibration=[x])
    assert isinstance(model.model.layers[0].attn.q_proj, Int8Linear)
    assert len(model._spike_hooks) == len(spiking_linears(model))  # spiking moved onto the INT8 layers
    with torch.no_grad():
        before = model(x).logits
    model.save_pretrained(int8_dir)
    loaded = SpikingBrainForCausalLM.from_pretrained(int8_dir).eval()
    assert loaded.model.layers[1].mlp.up_proj.weight.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, before)
    projections = sum(m.weight.numel() for m in spiking_linears(model).values())
    dense_size, int8_size = ((d / "model.safetensors").stat().st_size for d in (dense_dir, int8_dir))
    others = dense_size - 4 * projections
    assert int8_size < others + projections * 1.05  # codes take 1 byte and the scales ~3 %


def test_fake_int8_by_hand():
    x = torch.tensor([[1.27, -0.635, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(fake_quantize_int8(x), torch.tensor([[1.27, -0.64, 0.0], [0.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- statistics and events


def test_spikes_per_coding_by_hand():
    counts = torch.tensor([0, 1, -3, 7, 8, -1])
    # ternary |c|; bidirectional popcount|c|: 0,1,2,3,1,1; two's complement in 5 bits: 0,1,11101->4,00111->3,01000->1,11111->5
    assert spikes_per_coding(counts) == {"ternary": 20, "bidirectional": 8, "twos_complement": 14}
    for coding in ("ternary", "bidirectional", "twos_complement"):
        assert spikes_per_coding(counts)[coding] == int(encode(counts, coding).abs().sum())


def test_statistics_by_hand():
    stats = SpikeStatistics({"model.layers.0.mlp.up_proj": 10, "model.layers.1.attn.o_proj": 4})
    first = torch.tensor([[[0, 2, -9, 0], [1, 0, 0, 0]]])  # 8 counts over 4 channels; channel 3 never fires
    second = torch.tensor([[[3, -1], [0, 0]]])  # both channels fire
    stats("model.layers.0.mlp.up_proj", first, None)
    stats("model.layers.1.attn.o_proj", second, None)
    summary = stats.summary()
    up = summary["layers"][0]["projections"]["mlp.up_proj"]
    assert up["zero_fraction"] == 5 / 8 and up["mean_abs_count"] == 12 / 8 and up["share_at_most_7"] == 7 / 8
    assert up["silent_channel_fraction"] == 1 / 4
    # bitwise3: |c| clipped to 7 -> 0,2,7,0,1,0,0,0 -> bits 0,1,3,0,1,0,0,0 = 5 spikes out of 3 x 8
    assert up["sparsity_bitwise3"] == 1 - 5 / 24
    assert up["dense_macs"] == 8 * 10 and up["synaptic_ops"]["ternary"] == 12 * 10
    overall = summary["overall"]
    assert overall["counts"] == 12 and overall["zero_fraction"] == 7 / 12 and overall["silent_channel_fraction"] == 1 / 6
    energy = energy_estimate(overall, "ternary")
    assert energy["report_45nm"]["fp16_mac_pJ"] == pytest.approx((80 + 16) * 1.5)
    assert energy["report_45nm"]["spiking_int8_add_pJ"] == pytest.approx((120 + 16) * 0.03)
    assert energy["snn_literature"]["snn_ac_pJ"] == pytest.approx((120 + 16) * 0.9)
    assert "memory traffic" in energy["note"]


def test_event_export_round_trip(tmp_path):
    model = tiny()
    spikify(model, k=3)
    recorder = SpikeEventRecorder("bidirectional")
    seen = {}

    def both(name, counts, threshold):
        seen.setdefault(name, (counts.reshape(-1, counts.shape[-1]), threshold.reshape(-1)))
        recorder(name, counts, threshold)

    with observe_spikes(model, both), torch.no_grad():
        model(ids(6)[:1])
    path = write_events(tmp_path / "events.npz", recorder)
    events = read_events(path)
    modules = list(events.streams["module"])
    assert len(events) > 0 and set(np.unique(events.events["polarity"])) <= {-1, 1}
    for name, (counts, threshold) in seen.items():
        stream = modules.index(name)
        assert torch.equal(events.counts(stream), counts.long())
        assert np.allclose(events.threshold(stream), threshold.numpy())
    with pytest.raises(ValueError, match="not a spike-event file"):
        (tmp_path / "x.npz").write_bytes(b"junk")
        read_events(tmp_path / "x.npz")
