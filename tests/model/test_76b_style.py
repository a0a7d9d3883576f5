"""A tiny SpikingBrain-76B-style model (parallel GLA + SWA/full, sinks, key-tied gate, MoE) end to end.

Logits are compared with the independent fp64 reference of tests/reference_impl.py (parallel
branches, sinks with an explicit mask, MoE token by token), recomputed without any cache:
one-shot forward, prefill-then-decode, streaming prefill, generate(), padding, reordering,
and save/load.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from reference_impl import assert_close, greedy_reference, randomize_, reference_logits, spec_for
from spikingbrain import SpikingBrainForCausalLM
from spikingbrain.model.presets import spikingbrain_76b

TOL = 5e-5
TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=2, sliding_window=5, gla_chunk_size=16, rope_theta=10000.0, num_sink_tokens=3,
    num_experts=4, max_position_embeddings=4096, pad_token_id=0, bos_token_id=None, eos_token_id=None,
)


def tiny_76b(seed=0, **overrides) -> SpikingBrainForCausalLM:
    """The 76B preset shrunk: layer 6 (0-indexed) full, dense FFN at 0, 1, 2, 4, 6, MoE (4 experts, top-1, 1 shared) at 3, 5."""
    config = spikingbrain_76b(**{**TINY, **overrides})
    return randomize_(SpikingBrainForCausalLM(config), seed).eval()


def random_ids(B, T, seed=0):
    return torch.randint(3, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def expected_logits(model, ids):
    return reference_logits(model.state_dict(), spec_for(model.config), ids)


def test_tiny_preset_layout():
    config = tiny_76b().config
    assert config.layer_mixers == ["parallel-swa"] * 6 + ["parallel-full"]
    assert config.dense_ffn_layers == [0, 1, 2, 4, 6] and config.moe_layers == [3, 5]
    assert (config.gla_gate, config.gla_feature_map, config.num_experts_per_tok, config.num_shared_experts) == (
        "key_tied", "sigmoid", 1, 1,
    )


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_one_shot_forward_equals_reference(grad):
    model = tiny_76b()
    ids = random_ids(2, 40)
    with torch.set_grad_enabled(grad):
        logits = model(ids, use_cache=False).logits
    assert_close(logits, expected_logits(model, ids), TOL, "one shot")


@pytest.mark.parametrize(
    "pieces", [[10] + [1] * 15 + [15], [3, 1, 9, 2, 17, 1, 7]], ids=["prefill-then-tokens", "uneven"]
)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_prefill_then_decode_equals_one_shot(pieces, grad):
    model = tiny_76b(seed=1)
    ids = random_ids(2, 40, seed=1)
    cache, logits, start = None, [], 0
    with torch.set_grad_enabled(grad):
        one_shot = model(ids, use_cache=False).logits.detach()
        for size in pieces:
            out = model(ids[:, start : start + size], cache=cache, use_cache=True)
            cache, start = out.cache, start + size
            logits.append(out.logits.detach())
    logits = torch.cat(logits, dim=1)
    assert cache.seen_tokens == 40
    assert_close(logits, one_shot, TOL, f"pieces {pieces} vs one shot")
    assert_close(logits, expected_logits(model, ids), TOL, f"pieces {pieces} vs reference")


def test_streaming_prefill_then_decode(record_chunks):
    model = tiny_76b(seed=2, streaming_chunk_size=4, sliding_window=6)
    ids = random_ids(1, 30, seed=2)
    calls = record_chunks(model)
    with torch.no_grad():
        out = model(ids)
    assert calls == [4] * 7 + [2]
    expected = expected_logits(model, ids)
    assert_close(out.logits, expected, TOL, "streaming prefill")
    nxt = random_ids(1, 3, seed=3)
    with torch.no_grad():
        more = model(nxt, cache=out.cache).logits
    assert_close(more, expected_logits(model, torch.cat((ids, nxt), 1))[:, -3:], TOL, "decode after streaming")


def test_generate_greedy_equals_manual_argmax_loop():
    model = tiny_76b(seed=3)
    prompt = random_ids(1, 9, seed=4)
    out = model.generate(prompt, max_new_tokens=10, do_sample=False)
    ids = prompt
    with torch.no_grad():
        for _ in range(10):  # the model itself, every step recomputed from scratch without a cache
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, nxt), dim=1)
    assert out.tolist() == ids.tolist()
    assert out.tolist() == greedy_reference(model.state_dict(), spec_for(model.config), prompt, 10).tolist()


def test_left_padded_batch_generates_like_each_prompt_alone():
    model = tiny_76b(seed=4, streaming_chunk_size=5)
    spec, state = spec_for(model.config), model.state_dict()
    short, long = random_ids(1, 6, seed=5), random_ids(1, 13, seed=6)
    batch = torch.cat((torch.cat((torch.zeros(1, 7, dtype=torch.long), short), 1), long))
    mask = (torch.arange(13) >= torch.tensor([[7], [0]])).long()
    gen = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert gen[0, 13:].tolist() == greedy_reference(state, spec, short, 6)[0, 6:].tolist()
    assert gen[1, 13:].tolist() == greedy_reference(state, spec, long, 6)[0, 13:].tolist()


def test_reordered_cache_follows_its_sequences():
    model = tiny_76b(seed=5)
    ids = random_ids(3, 20, seed=7)
    with torch.no_grad():
        cache = model(ids[:, :15]).cache
        order = torch.tensor([2, 0, 0])
        cache.reorder_cache(order)
        logits = model(ids[order, 15:], cache=cache).logits
    assert_close(logits, expected_logits(model, ids[order])[:, 15:], TOL, "reordered cache")


def test_cache_sizes():
    """Parallel layers: a GLA state plus a window (or all keys), plus the sink keys/values."""
    model = tiny_76b(seed=6)
    B, Hkv, D, W, S, fp32 = 2, 2, 8, 5, 3, 4
    kv = 2 * Hkv * D * fp32
    gla = B * Hkv * D * D * fp32
    with torch.no_grad():
        cache = model(random_ids(B, 25)).cache
    sizes = [layer.nbytes() for layer in cache.layers]
    assert sizes[:6] == [gla + B * W * kv + S * kv] * 6  # window caches: one sink copy for the batch
    assert sizes[6] == gla + B * (25 + S) * kv  # full cache: sinks in every row's buffer


def test_save_and_load_round_trip(tmp_path):
    model = tiny_76b(seed=7, parallel_shared_projections=False, parallel_combine="sum", norm_topk_prob=True)
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    for loaded in (SpikingBrainForCausalLM.from_pretrained(tmp_path / "m"), AutoModelForCausalLM.from_pretrained(tmp_path / "m")):
        volatile = {"_name_or_path", "dtype"}
        assert {k: v for k, v in loaded.config.to_dict().items() if k not in volatile} == {
            k: v for k, v in model.config.to_dict().items() if k not in volatile
        }
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, before)
    with pytest.raises(ValueError) as info:
        model.save_pretrained(tmp_path / "official", official_format=True)
    for field in ("layer_mixers", "gla_gate", "num_sink_tokens", "num_experts"):
        assert field in str(info.value)


def test_transformer_converted_to_76b_layout_then_upcycled(tmp_path):
    """A Qwen2 checkpoint into parallel layers (shared q/k/v/o reused, sinks and norms new), then MoE upcycling."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from spikingbrain.convert.upcycle import upcycle_model
    from spikingbrain.model.hf_import import import_transformer

    source = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    ))
    randomize_(source).save_pretrained(tmp_path / "qwen2")
    mixers = ["parallel-swa", "parallel-swa", "parallel-full"]
    dense, report = import_transformer(
        tmp_path / "qwen2", mixers, num_sink_tokens=2, gla_gate="key_tied", gla_feature_map="sigmoid", sliding_window=4,
    )
    assert {n.split("attn.")[-1] for n in report.new} == {"linear.g_norm.weight", "softmax.norm.weight", "softmax.sinks", "branch_weights"}
    qwen = source.state_dict()
    for i in range(3):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(dense.state_dict()[f"model.layers.{i}.attn.{proj}.weight"], qwen[f"model.layers.{i}.self_attn.{proj}.weight"])
    moe = upcycle_model(dense, router_init="zeros", num_experts=4, num_experts_per_tok=1, num_shared_experts=1, dense_ffn_layers=[0])
    ids = random_ids(2, 20, seed=9)
    with torch.no_grad():
        assert_close(moe(ids, use_cache=False).logits, dense(ids, use_cache=False).logits, 1e-5, "upcycled vs dense")
    assert_close(moe(ids, use_cache=False).logits, expected_logits(moe, ids), TOL, "converted 76B-style vs reference")


def test_activation_checkpointing_keeps_loss_and_router_gradients():
    """Blocks return (hidden, router statistics): checkpointed blocks must give the same loss and gradients."""
    model = tiny_76b(seed=10).train()
    ids = random_ids(2, 20, seed=10)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        grads.append((out.loss.detach(), model.model.layers[3].mlp.router.weight.grad.clone()))
    assert model.model.gradient_checkpointing
    assert_close(grads[1][0], grads[0][0], 1e-6, "loss")
    assert grads[0][1].abs().max() > 0
    assert_close(grads[1][1], grads[0][1], 1e-5, "router gradient")
