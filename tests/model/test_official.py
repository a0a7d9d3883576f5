"""The released SpikingBrain-7B format (gla_swa): tiny folders written here by hand, loaded through Auto classes.

The folders follow the release: config.json with its fields (auto_map included), official
parameter names, bf16 weights in sharded safetensors with model.safetensors.index.json.
Logits are checked against the independent fp64 reference (tests/reference_impl.py)
reading those same tensors; tolerance as in test_reference.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import spikingbrain  # noqa: F401  (registers gla_swa with the Auto classes)
from reference_impl import (
    TINY_OFFICIAL_CONFIG,
    assert_close,
    official_shapes,
    official_spec,
    official_state_dict,
    reference_logits,
    spec_for,
    write_official_folder,
)
from spikingbrain import GLAswaForCausalLM, SpikingBrainForCausalLM
from spikingbrain.model.mixers import GatedLinearAttention, SoftmaxAttention

TOL = 5e-5
T = 80  # longer than the window (6 + 1 keys) and than the GLA chunk (64)


@pytest.fixture
def official_folder(tmp_path):
    """A tiny checkpoint in the release layout; returns (folder, config dict, state dict)."""
    config = dict(TINY_OFFICIAL_CONFIG)
    state = official_state_dict(config, seed=11)
    return write_official_folder(tmp_path / "official", config, state, shards=3), config, state


def prompt(seed=0):
    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def saved_tensors(folder) -> dict:
    """Names and shapes of every tensor in a folder's safetensors files."""
    shapes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    return shapes


def test_auto_class_loads_the_release_layout(official_folder):
    folder, config, state = official_folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(model) is GLAswaForCausalLM
    assert model.config.model_type == "gla_swa"
    kinds = [layer.mixer_type for layer in model.model.layers]
    assert kinds == ["gla", "swa", "gla", "swa"]  # attn_layers [1, 3] are sliding-window layers
    assert [type(layer.attn) for layer in model.model.layers] == [GatedLinearAttention, SoftmaxAttention] * 2
    assert model.config.rms_norm_eps == config["norm_eps"] and model.config.rope_theta == config["rope_theta"]
    ids = prompt()
    assert_close(logits_of(model, ids), reference_logits(state, official_spec(config), ids), TOL, "official load")


def test_attn_layers_anywhere(tmp_path):
    config = dict(TINY_OFFICIAL_CONFIG, attn_layers=[0, 1], sliding_window=3)
    state = official_state_dict(config, seed=12)
    folder = write_official_folder(tmp_path / "m", config, state, shards=2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert [layer.mixer_type for layer in model.model.layers] == ["swa", "swa", "gla", "gla"]
    ids = prompt(1)
    assert_close(logits_of(model, ids), reference_logits(state, official_spec(config), ids), TOL, "attn_layers [0, 1]")


def test_missing_attn_layers_means_odd_layers(tmp_path):
    config = {k: v for k, v in TINY_OFFICIAL_CONFIG.items() if k != "attn_layers"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.layer_mixers == ["gla", "swa", "gla", "swa"]


@pytest.mark.parametrize("shard_size", ["5GB", "20KB"])
def test_official_format_round_trip(official_folder, tmp_path, shard_size):
    folder, config, state = official_folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = tmp_path / "saved"
    model.save_pretrained(out, official_format=True, max_shard_size=shard_size)
    written = json.loads((out / "config.json").read_text())
    for field in (
        "architectures", "model_type", "attn_layers", "sliding_window", "norm_eps", "rope_theta", "hidden_act",
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "vocab_size", "use_short_conv", "tie_word_embeddings",
    ):
        assert written[field] == config[field], field
    expected_shapes = official_shapes(97, 32, 4, 4, 2, 48, config["attn_layers"])
    assert saved_tensors(out) == expected_shapes
    if shard_size == "20KB":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(expected_shapes)
        assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(reloaded) is GLAswaForCausalLM
    ids = prompt(2)
    assert_close(logits_of(reloaded, ids), reference_logits(state, official_spec(config), ids), TOL, "round trip")


def test_native_format_round_trip(official_folder, tmp_path):
    folder, config, state = official_folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.save_pretrained(tmp_path / "native")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32)
    assert type(reloaded) is GLAswaForCausalLM
    assert reloaded.config.layer_mixers == ["gla", "swa", "gla", "swa"]
    assert reloaded.config.sliding_window == config["sliding_window"]
    ids = prompt(3)
    assert_close(logits_of(reloaded, ids), reference_logits(state, official_spec(config), ids), TOL, "native save")


@pytest.mark.parametrize("semantics,tie", [("flash", False), ("sdpa", True)])
def test_our_model_saved_in_official_format(tiny_model, tmp_path, semantics, tie):
    """A SpikingBrainConfig model (Llama-like: no biases, maybe tied) written officially keeps its function."""
    model = tiny_model(["gla", "swa", "swa", "gla"], window_semantics=semantics, attention_bias=False, tie_word_embeddings=tie)
    ids = prompt(4)
    expected = reference_logits(model.state_dict(), spec_for(model.config), ids)
    model.save_pretrained(tmp_path / "off", official_format=True)
    written = json.loads((tmp_path / "off" / "config.json").read_text())
    assert written["attn_layers"] == [1, 2]
    # flash W=5 -> 6 keys -> official 5; sdpa W=5 -> 5 keys -> official 4 (the release uses flash semantics)
    assert written["sliding_window"] == (5 if semantics == "flash" else 4)
    assert saved_tensors(tmp_path / "off") == official_shapes(97, 32, 4, 4, 2, 48, [1, 2])  # zero biases added
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "off", dtype=torch.float32)
    assert type(reloaded) is GLAswaForCausalLM
    assert_close(logits_of(reloaded, ids), expected, TOL, f"official save of {semantics} model")
    # and our own format keeps the class
    model.save_pretrained(tmp_path / "ours")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(ours) is SpikingBrainForCausalLM and ours.config.window_semantics == semantics
    assert_close(logits_of(ours, ids), expected, TOL, "native save of our model")


def test_full_layers_have_no_official_form(tiny_model, tmp_path):
    model = tiny_model(["gla", "full"])
    with pytest.raises(ValueError, match="layer_mixers"):
        model.save_pretrained(tmp_path / "x", official_format=True)
    assert not (tmp_path / "x" / "config.json").exists()
