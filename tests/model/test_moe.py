"""Mixture-of-Experts FFN: routing against a token-by-token loop, load-balancing loss by hand, statistics, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impl import RefSpec, assert_close, moe_reference, randomize_, reference_logits, spec_for
from spikingbrain import SpikingBrainConfig
from spikingbrain.model.moe import MoEFeedForward, RouterStats, load_balancing_loss

TOL = 2e-5


def moe_config(hidden=16, **overrides):
    fields = dict(
        vocab_size=97, hidden_size=hidden, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_experts=5, num_experts_per_tok=2, num_shared_experts=1,
    )
    return SpikingBrainConfig(**{**fields, **overrides})


def loop_spec(config):
    return RefSpec(
        layers=[], heads=0, kv_heads=0, head_dim=0, window_keys=0, eps=0, rope_theta=0,
        num_experts=config.num_experts, num_shared=config.num_shared_experts, top_k=config.num_experts_per_tok,
        router=config.moe_router, norm_topk=config.norm_topk_prob,
    )


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm", [False, True], ids=["raw-weights", "renormalised"])
@pytest.mark.parametrize("k,shared", [(1, 0), (2, 1), (3, 2)])
def test_routing_equals_token_loop(router, norm, k, shared):
    config = moe_config(moe_router=router, norm_topk_prob=norm, num_experts_per_tok=k, num_shared_experts=shared)
    moe = randomize_(MoEFeedForward(config), seed=k)
    x = torch.randn(3, 11, 16, generator=torch.Generator().manual_seed(1))
    y, stats = moe(x)
    sd = {f"mlp.{n}": t for n, t in moe.state_dict().items()}
    assert_close(y, moe_reference(sd, "mlp.", x.double(), loop_spec(config)), TOL, f"{router} norm={norm} k={k} S={shared}")
    assert int(stats.tokens_per_expert.sum()) == 33 * k and stats.num_tokens == 33


def test_each_expert_runs_once_over_its_group():
    """Dropless grouping: one call per expert that has tokens, over exactly its tokens."""
    config = moe_config(num_experts=4, num_experts_per_tok=2)
    moe = randomize_(MoEFeedForward(config))
    rows = {}
    for i, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, args, out, i=i: rows.setdefault(i, []).append(args[0].shape[0]))
    x = torch.randn(2, 25, 16, generator=torch.Generator().manual_seed(2))
    _, stats = moe(x)
    counts = stats.tokens_per_expert.tolist()
    assert rows == {i: [c] for i, c in enumerate(counts) if c}
    _, chosen, _ = moe.route(x.reshape(-1, 16))
    assert counts == torch.bincount(chosen.reshape(-1), minlength=4).tolist()


def hand_built_router(logits_per_token: list[list[float]], router: str, k: int):
    """An MoE whose router computes exactly the given logits: identity router weight, inputs = logits."""
    N = len(logits_per_token[0])
    config = moe_config(hidden=N, num_experts=N, num_experts_per_tok=k, num_shared_experts=0, moe_router=router)
    moe = MoEFeedForward(config)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(N))
    return moe, torch.tensor(logits_per_token)


def test_load_balancing_loss_softmax_top1_by_hand():
    """Scores (3/4, 1/4), (3/4, 1/4), (1/4, 3/4): f = (2/3, 1/3), P = (7/12, 5/12), L = 2 (14/36 + 5/36) = 19/18."""
    ln3 = math.log(3)
    moe, x = hand_built_router([[ln3, 0.0], [ln3, 0.0], [0.0, ln3]], "softmax", k=1)
    _, stats = moe(x)
    assert stats.tokens_per_expert.tolist() == [2, 1]
    assert_close(stats.score_sum, torch.tensor([7 / 4, 5 / 4]), 1e-6, "score sums")
    assert abs(stats.load_balancing_loss().item() - 19 / 18) < 1e-6


def test_load_balancing_loss_sigmoid_top2_by_hand():
    """Sigmoid scores normalised per token; f counts the k = 2 assignments of every token.

    logits (0, -ln 3, ln 3) -> sigmoid (1/2, 1/4, 3/4) -> normalised (1/3, 1/6, 1/2), top-2: experts 2, 0;
    logits (ln 3, 0, -ln 3) -> (3/4, 1/2, 1/4) -> (1/2, 1/3, 1/6), top-2: experts 0, 1.
    f = (2, 1, 1) / 4, P = (5/12, 3/12, 4/12), L = 3 (10 + 3 + 4) / 48 = 17/16.
    """
    ln3 = math.log(3)
    moe, x = hand_built_router([[0.0, -ln3, ln3], [ln3, 0.0, -ln3]], "sigmoid", k=2)
    _, stats = moe(x)
    assert stats.tokens_per_expert.tolist() == [2, 1, 1]
    assert_close(stats.score_sum, torch.tensor([5 / 6, 1 / 2, 2 / 3]), 1e-6, "normalised score sums")
    assert abs(stats.load_balancing_loss().item() - 17 / 16) < 1e-6


def test_uniform_and_collapsed_routing_bounds():
    """Perfect balance gives 1; every token on one expert with all its score gives N."""
    uniform = RouterStats(torch.tensor([3, 3, 3, 3]), torch.tensor([3.0, 3.0, 3.0, 3.0]), 12, 1)
    collapsed = RouterStats(torch.tensor([12, 0, 0, 0]), torch.tensor([12.0, 0.0, 0.0, 0.0]), 12, 1)
    assert uniform.load_balancing_loss().item() == pytest.approx(1.0)
    assert collapsed.load_balancing_loss().item() == pytest.approx(4.0)
    assert load_balancing_loss([uniform, collapsed]).item() == pytest.approx(2.5)
    assert load_balancing_loss([]) is None


def test_padded_tokens_are_not_counted():
    config = moe_config()
    moe = randomize_(MoEFeedForward(config))
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    y, stats = moe(x, mask)
    alone_y, alone = moe(x[0, 4:])
    rest_y, rest = moe(x[1])
    assert stats.num_tokens == 14
    assert stats.tokens_per_expert.tolist() == (alone.tokens_per_expert + rest.tokens_per_expert).tolist()
    assert_close(stats.score_sum, alone.score_sum + rest.score_sum, 1e-6, "score sums")
    assert_close(y[0, 4:], alone_y, 1e-6, "padded row output")


def causal_moe_model(tiny_model, **overrides):
    return tiny_model(["gla", "swa", "full"], num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                      dense_ffn_layers=[1], **overrides)


def test_model_with_moe_equals_reference(tiny_model):
    model = causal_moe_model(tiny_model)
    assert model.config.moe_layers == [0, 2]
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    out = model(ids, use_cache=False)
    assert_close(out.logits, reference_logits(model.state_dict(), spec_for(model.config), ids), 5e-5, "MoE model")
    assert len(out.router_stats) == 2
    assert all(int(s.tokens_per_expert.sum()) == 60 * 2 for s in out.router_stats)


def test_loss_adds_the_auxiliary_loss_and_trains_the_router(tiny_model):
    model = causal_moe_model(tiny_model, router_aux_loss_coef=0.25)
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    out = model(ids, labels=ids, use_cache=False)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97).float(), ids[:, 1:].reshape(-1))
    expected_aux = torch.stack([s.load_balancing_loss() for s in out.router_stats]).mean()
    assert out.aux_loss.item() == pytest.approx(expected_aux.item())
    assert out.loss.item() == pytest.approx(ce.item() + 0.25 * out.aux_loss.item(), rel=1e-5)
    out.aux_loss.backward()
    router = model.model.layers[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    model.config.router_aux_loss_coef = 0.0
    plain = model(ids, labels=ids, use_cache=False)
    assert plain.loss.item() == pytest.approx(ce.item(), rel=1e-5)


def test_streamed_statistics_are_summed_over_chunks(tiny_model):
    model = causal_moe_model(tiny_model, streaming_chunk_size=7)
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        streamed = model(ids)
        model.config.streaming_chunk_size = 100
        whole = model(ids)
    for a, b in zip(streamed.router_stats, whole.router_stats):
        assert a.tokens_per_expert.tolist() == b.tokens_per_expert.tolist() and a.num_tokens == 30
        assert_close(a.score_sum, b.score_sum, 1e-5, "score sums")
    assert streamed.aux_loss.item() == pytest.approx(whole.aux_loss.item(), rel=1e-5)


def test_dense_model_has_no_router_outputs(tiny_model):
    out = tiny_model(["gla", "swa"])(torch.ones(1, 5, dtype=torch.long), labels=torch.ones(1, 5, dtype=torch.long))
    assert out.aux_loss is None and out.router_stats is None


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"num_experts_per_tok": 6}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"num_shared_experts": -1}, "num_shared_experts"),
        ({"moe_router": "relu"}, "moe_router"),
        ({"dense_ffn_layers": [2]}, "dense_ffn_layers"),
        ({"dense_ffn_layers": [0, 0]}, "dense_ffn_layers"),
        ({"num_experts": -2}, "num_experts"),
        ({"num_experts": 0, "num_shared_experts": 1}, "need num_experts > 0"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ],
)
def test_invalid_moe_values_name_the_field(fields, needle):
    with pytest.raises(ValueError, match=needle):
        moe_config(**fields)
