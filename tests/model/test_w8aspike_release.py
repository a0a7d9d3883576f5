"""The released W8ASpike layout (full-rank ``gk_proj``, ``QuantLinear`` scale buffers) on hand-written tiny folders.

The reference is the fp64 forward of tests/reference_impl.py with the weights the release
multiplies with (``round(weight / scale) · scale`` per group of 128, computed here), spiking
every projection input but ``down_proj`` (or every one), the SWA query spiked and K/V INT8.
"""

from __future__ import annotations

import json

import pytest
import torch

from reference_impl import SpikingWeights, assert_close, official_spec, reference_logits, write_official_folder
from spikingbrain.model.checkpoint import CheckpointError
from spikingbrain.model.loading import load_model
from spikingbrain.model.w8aspike_release import load_w8aspike_release
from spikingbrain.spiking.int8 import Int8Linear

CONFIG = {
    "architectures": ["GLAswaForCausalLM"], "model_type": "gla_swa", "attn_layers": [1], "hidden_act": "swish",
    "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 97, "sliding_window": 6, "norm_eps": 1e-6, "rope_theta": 10000.0,
    "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_short_conv": False,
}
QUANT = ("q_proj", "k_proj", "v_proj", "o_proj", "gk_proj", "gate_proj", "up_proj", "down_proj")


def release_state(wide_code_layer: str | None = None, seed: int = 0) -> dict:
    """Tensors named and shaped as in the W8ASpike release, bf16 weights with fp32 scales per group of 128."""
    gen = torch.Generator().manual_seed(seed)
    h, inner, D, kv = 128, 256, 32, 2
    state = {"model.embeddings.weight": torch.randn(97, h, generator=gen), "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
             "lm_head.weight": torch.randn(97, h, generator=gen) * 0.1}
    for i, mixer in enumerate(("gla", "swa")):
        p = f"model.layers.{i}."
        shapes = {"attn.q_proj": (h, h), "attn.k_proj": (kv * D, h), "attn.v_proj": (kv * D, h), "attn.o_proj": (h, h),
                  "mlp.gate_proj": (inner, h), "mlp.up_proj": (inner, h), "mlp.down_proj": (h, inner)}
        if mixer == "gla":
            shapes["attn.gk_proj"] = (kv * D, h)
            state[p + "attn.g_norm.weight"] = 1 + 0.1 * torch.randn(D, generator=gen)
        for name, (out, inp) in shapes.items():
            weight = torch.randn(out, inp, generator=gen) / inp**0.5
            scales = weight.view(out, -1, 128).abs().amax(-1, keepdim=True) / 127
            if p + name == wide_code_layer:
                scales = scales / 2  # codes up to ±254, as the release's unclipped rounding allows
            state[p + name + ".weight"] = weight
            state[p + name + ".weight_quantizer.scales"] = scales
            if name.endswith(("q_proj", "k_proj", "v_proj", "gk_proj")):
                state[p + name + ".bias"] = 0.1 * torch.randn(out, generator=gen)
        state[p + "attn_norm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
        state[p + "mlp_norm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
    return {k: v.to(torch.bfloat16) if not k.endswith("scales") else v for k, v in state.items()}


def reference_weights(state: dict, spike_every_projection: bool) -> SpikingWeights:
    """What the release multiplies with, as fp64, the full-rank gate written as a pair with an identity second factor."""
    sd = {}
    for key, value in state.items():
        if key.endswith(".weight_quantizer.scales"):
            continue
        name = key.removesuffix(".weight")
        scales = state.get(name + ".weight_quantizer.scales")
        if scales is not None and (spike_every_projection or not name.endswith("down_proj")):
            w = value.float().view(value.shape[0], -1, 128)
            value = (torch.round(w / scales) * scales).view(value.shape)
        sd[key] = value.double()
    for key in [k for k in sd if ".gk_proj." in k]:
        part = key.rsplit(".", 1)[-1]
        if part == "weight":
            sd[key.replace("gk_proj.weight", "gk_proj.0.weight")] = sd.pop(key)
            sd[key.replace("gk_proj.weight", "gk_proj.1.weight")] = torch.eye(64, dtype=torch.float64)
        else:
            sd[key.replace("gk_proj.bias", "gk_proj.1.bias")] = sd.pop(key)
    dense = () if spike_every_projection else ("down_proj",)
    return SpikingWeights(sd, k=3.0, spike_query=True, int8_kv=True, dense_inputs=dense)


@pytest.mark.parametrize("spike_every_projection", [False, True])
def test_a_released_w8aspike_folder_computes_what_the_release_does(tmp_path, spike_every_projection):
    state = release_state()
    write_official_folder(tmp_path, CONFIG, state)
    model = load_w8aspike_release(tmp_path, dtype=torch.float64, spike_every_projection=spike_every_projection)
    assert isinstance(model.model.layers[0].attn.gk_proj, Int8Linear)  # full rank, one QuantLinear
    assert isinstance(model.model.layers[1].mlp.down_proj, Int8Linear) == spike_every_projection
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = model(ids).logits
    expected = reference_logits(reference_weights(state, spike_every_projection), official_spec(CONFIG), ids)
    assert_close(logits, expected, 1e-6, "logits against the release's semantics")


def test_load_model_detects_the_layout_and_wide_codes_stay_exact(tmp_path):
    state = release_state(wide_code_layer="model.layers.0.mlp.up_proj")
    write_official_folder(tmp_path, CONFIG, state)
    with pytest.warns(UserWarning, match="outside"):
        model = load_model(tmp_path, dtype=torch.float64)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert model.config.weight_quantization["dense"] == ["model.layers.0.mlp.up_proj"]
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        logits = model(ids).logits
    assert_close(logits, reference_logits(reference_weights(state, False), official_spec(CONFIG), ids), 1e-6, "logits")
    model.save_pretrained(tmp_path / "ours")  # our format keeps the dense layer dense
    reloaded = load_model(tmp_path / "ours", dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, logits)


def test_bad_scales_name_the_tensor(tmp_path):
    state = release_state()
    state["model.layers.0.attn.q_proj.weight_quantizer.scales"] = torch.ones(128, 2, 1)
    write_official_folder(tmp_path, CONFIG, state)
    with pytest.raises(CheckpointError, match=r"attn\.q_proj\.weight_quantizer\.scales: shape \(128, 2, 1\)"):
        load_model(tmp_path)
