"""Llama / Qwen2 checkpoints loaded as all-``full`` SpikingBrain models reproduce transformers' own models.

transformers is the independent reference here: its Llama and Qwen2 implementations
compute the same function in fp32 (SDPA), so logits agree to float rounding (< 1e-3 for
the 30-layer embedded model, < 1e-4 for tiny ones).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import spikingbrain  # noqa: F401
from reference_impl import randomize_
from spikingbrain.model.info import model_info
from spikingbrain.model.loading import load_model


def document_text() -> str:
    from pydoc_data.topics import topics

    return topics["assignment"] + "\n" + topics["while"]


@pytest.fixture(scope="module")
def smollm_pair(default_folder):
    """(ours, transformers') for the embedded SmolLM2-135M-Instruct, fp32, eval mode."""
    ours = load_model("default")
    theirs = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()
    return ours, theirs


@pytest.mark.real_model
def test_default_model_logits_match_transformers(smollm_pair, default_tokenizer):
    ours, theirs = smollm_pair
    assert set(ours.config.layer_mixers) == {"full"}
    ids = default_tokenizer(document_text(), return_tensors="pt")["input_ids"][:, :300]
    assert ids.shape[1] == 300
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids, use_cache=False).logits
    assert (got - expected).abs().max().item() < 1e-3


@pytest.mark.real_model
def test_default_model_greedy_generation_matches_transformers(smollm_pair, default_tokenizer):
    ours, theirs = smollm_pair
    ids = default_tokenizer(document_text()[:400], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = theirs.generate(ids, max_new_tokens=20, do_sample=False)
        got = ours.generate(ids, max_new_tokens=20, do_sample=False)
    assert got.tolist() == expected.tolist()


@pytest.mark.real_model
def test_default_model_info(smollm_pair):
    _, theirs = smollm_pair
    info = model_info("default", length=8192)
    assert info["parameters"] == theirs.num_parameters()  # tied embeddings counted once
    assert info["layers"] == 30 and info["layer_mixers"] == {"full": 30}
    # KV cache of 30 layers x 3 kv heads x head_dim 64, keys and values, fp32, 8192 tokens
    kv = 2 * 30 * 8192 * 3 * 64 * 4
    assert info["transformer_kv_cache_bytes"] == kv
    assert info["state_bytes_per_sequence"] == kv  # all layers are full attention
    assert info["state_vs_kv_ratio"] == 1.0


def tiny_qwen2(tmp_path, tie: bool):
    config = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        max_position_embeddings=512,
    )
    model = randomize_(Qwen2ForCausalLM(config), seed=21).eval()
    assert model.model.layers[0].self_attn.q_proj.bias.abs().max() > 0.1  # real q/k/v biases
    model.save_pretrained(tmp_path / "qwen2")
    return model, tmp_path / "qwen2"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_qwen2_folder_matches_transformers(tmp_path, tie):
    theirs, folder = tiny_qwen2(tmp_path, tie)
    ours = load_model(folder)
    assert ours.config.layer_mixers == ["full"] * 3 and ours.config.attention_bias
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids, use_cache=False).logits
    assert (got - expected).abs().max().item() < 1e-4
    with torch.no_grad():
        assert ours.generate(ids[:1], max_new_tokens=8, do_sample=False).tolist() == theirs.generate(
            ids[:1], max_new_tokens=8, do_sample=False
        ).tolist()
    info = model_info(folder, length=100)
    assert info["parameters"] == theirs.num_parameters()


def test_hybrid_info_is_hand_computed(tmp_path):
    """An official 7B-layout folder: GLA states are Hkv*D*D fp32, SWA keeps W keys and values per layer."""
    from reference_impl import TINY_OFFICIAL_CONFIG  # 4 layers, attn_layers [1, 3], W = 6, 2 kv heads, D = 8

    (tmp_path / "config.json").write_text(json.dumps(TINY_OFFICIAL_CONFIG))
    info = model_info(tmp_path, length=1000)
    gla = 2 * (2 * 8 * 8 * 4)
    swa = 2 * (2 * 6 * 2 * 8 * 4)
    assert info["state_bytes_per_sequence"] == gla + swa
    assert info["transformer_kv_cache_bytes"] == 2 * 4 * 1000 * 2 * 8 * 4
    assert info["layer_layout"] == "LSLS"
    # 97x32 embeddings and lm_head; per layer q, k, v (+bias), o, MLP, two norms; GLA gate and norm
    attn = (32 * 32 + 32) + 2 * (16 * 32 + 16) + 32 * 32
    mlp = 3 * 32 * 48
    per_layer = attn + mlp + 2 * 32
    gate = 16 * 32 + (16 * 16 + 16) + 8
    assert info["parameters"] == 2 * 97 * 32 + 4 * per_layer + 2 * gate + 32
