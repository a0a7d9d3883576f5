"""Fixtures of the model tests: tiny SpikingBrain models with seeded random weights."""

from __future__ import annotations

import pytest

from reference_impl import randomize_

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=5,
    gla_chunk_size=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    pad_token_id=0,
)


@pytest.fixture
def tiny_model():
    """``make(layer_mixers, seed=0, **config_overrides)``: a fp32 eval-mode model with random weights."""
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    def make(layer_mixers, seed: int = 0, **overrides):
        fields = {**TINY, **overrides}
        config = SpikingBrainConfig(num_hidden_layers=len(layer_mixers), layer_mixers=list(layer_mixers), **fields)
        return randomize_(SpikingBrainForCausalLM(config), seed).eval()

    return make


@pytest.fixture
def record_chunks(monkeypatch):
    """``record_chunks(model)``: a list that collects the token count of every base-model call of ``model``."""

    def start(model):
        calls = []
        inner = model.model.forward
        monkeypatch.setattr(model.model, "forward", lambda *a, **kw: calls.append(kw["input_ids"].shape[1]) or inner(*a, **kw))
        return calls

    return start
