"""SpikingBrainForCausalLM against an independent fp64 implementation of the SpikingBrain-7B equations.

The reference (tests/reference_impl.py) reads the weights by their official names from
the model's state_dict and recomputes everything: RMSNorm blocks, the GLA layer with a
token-by-token recurrence, the SWA layer with complex-number RoPE and a dense masked
softmax, SwiGLU, final norm, lm_head. The model runs in fp32; through a few tiny layers
with O(1) activations the logits agree to ~1e-6 relative, and we allow 5e-5 (relative to
max(1, |logit|)), far below what one wrong key in a window or a missing decay changes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_impl import assert_close, reference_logits, spec_for

TOL = 5e-5
HYBRID = ["gla", "swa", "gla", "swa"]  # the 7B layout: GLA on even layers, SWA on odd ones


def ids_for(model, B=2, T=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (B, T), generator=gen)


def check_against_reference(model, ids, logits, what, rows=None):
    expected = reference_logits(model.state_dict(), spec_for(model.config), ids)
    if rows is not None:
        expected = expected[:, rows]
    assert_close(logits, expected, TOL, what)


@pytest.mark.parametrize(
    "layers",
    [HYBRID, ["full", "gla", "swa"], ["gla"] * 3, ["swa", "swa"], ["full", "full"]],
    ids=["7b-layout", "full-gla-swa", "gla-only", "swa-only", "full-only"],
)
def test_forward_matches_reference(tiny_model, layers):
    """Prompt (40) longer than the window (5 + 1 keys) and than the GLA chunk (16); training path (grad on)."""
    model = tiny_model(layers)
    ids = ids_for(model)
    logits = model(ids, use_cache=False).logits
    assert logits.requires_grad  # the chunked (training) kernels were used
    check_against_reference(model, ids, logits, f"layers {layers}")


def test_inference_path_short_prompt(tiny_model):
    """Under no_grad a <= 16-token input runs the recurrent GLA kernel."""
    model = tiny_model(HYBRID)
    ids = ids_for(model, T=12)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    check_against_reference(model, ids, logits, "recurrent path")


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1)])
def test_grouped_query_attention(tiny_model, heads, kv_heads):
    model = tiny_model(HYBRID, num_attention_heads=heads, num_key_value_heads=kv_heads)
    ids = ids_for(model)
    check_against_reference(model, ids, model(ids, use_cache=False).logits, f"{heads}/{kv_heads} heads")


@pytest.mark.parametrize("semantics,window", [("flash", 5), ("sdpa", 5), ("flash", 1), ("sdpa", 2)])
def test_window_semantics(tiny_model, semantics, window):
    """flash: query p sees keys p-W..p (W + 1 keys); sdpa: W keys."""
    model = tiny_model(HYBRID, window_semantics=semantics, sliding_window=window)
    ids = ids_for(model, T=20)
    check_against_reference(model, ids, model(ids, use_cache=False).logits, f"{semantics} W={window}")


def test_window_semantics_really_differ(tiny_model):
    flash = tiny_model(["swa"], window_semantics="flash")
    sdpa = tiny_model(["swa"], window_semantics="sdpa")
    ids = ids_for(flash, T=20)
    assert (flash(ids).logits[:, 10:] - sdpa(ids).logits[:, 10:]).abs().max() > 1e-2


@pytest.mark.parametrize("chunk", [8, 24, 64])
def test_any_gla_chunk_size(tiny_model, chunk):
    model = tiny_model(HYBRID, gla_chunk_size=chunk)
    ids = ids_for(model, T=50)
    check_against_reference(model, ids, model(ids, use_cache=False).logits, f"gla_chunk_size={chunk}")


@pytest.mark.parametrize("step", [7, 20])
def test_streaming_prefill_matches_reference(tiny_model, step):
    model = tiny_model(["full", "gla", "swa", "gla"], streaming_chunk_size=step)
    ids = ids_for(model, T=45)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.cache.seen_tokens == 45
    check_against_reference(model, ids, out.logits, f"streaming step {step}")
    with torch.no_grad():
        last = model(ids, use_cache=True, logits_to_keep=3).logits
    check_against_reference(model, ids, last, "streaming logits_to_keep=3", rows=slice(-3, None))


def test_no_attention_bias_and_tied_embeddings(tiny_model):
    """Llama-shaped: no q/k/v biases, lm_head tied to the embeddings."""
    model = tiny_model(HYBRID, attention_bias=False, tie_word_embeddings=True)
    state = model.state_dict()
    assert not any(name.endswith("q_proj.bias") for name in state)
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
    ids = ids_for(model)
    check_against_reference(model, ids, model(ids, use_cache=False).logits, "no bias, tied")


def test_loss_is_next_token_cross_entropy(tiny_model):
    model = tiny_model(HYBRID)
    ids = ids_for(model, T=30)
    loss = model(ids, labels=ids, use_cache=False).loss
    expected = reference_logits(model.state_dict(), spec_for(model.config), ids)
    expected_loss = F.cross_entropy(expected[:, :-1].reshape(-1, expected.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(loss.item() - expected_loss.item()) < 1e-5
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
