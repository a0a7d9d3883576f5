"""MoE upcycling: the upcycled layer (and model) against the dense one it was copied from."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from reference_impl import assert_close, randomize_
from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.convert.upcycle import routed_weight, upcycle_factor, upcycle_ffn, upcycle_model
from spikingbrain.model.layers import SwiGLU

HIDDEN, INNER = 16, 40
SKN = [(1, 1, 16), (0, 2, 4), (2, 3, 5), (1, 2, 2)]  # (shared S, top-k, experts N)


def moe_config(S, k, N, **overrides):
    return SpikingBrainConfig(
        vocab_size=97, hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_experts=N, num_experts_per_tok=k, num_shared_experts=S, **overrides,
    )


def dense_ffn(seed=0):
    return randomize_(SwiGLU(HIDDEN, INNER), seed)


def inputs(seed=1):
    return torch.randn(3, 7, HIDDEN, generator=torch.Generator().manual_seed(seed))


def dense_output(ffn, x, alpha=1.0):
    """``down(silu(alpha gate x) * alpha up x) * alpha`` in fp64, from the dense weights."""
    w = {n: getattr(ffn, n).weight.double() for n in ("gate_proj", "up_proj", "down_proj")}
    x = x.double()
    return alpha * (F.silu(alpha * x @ w["gate_proj"].T) * (alpha * x @ w["up_proj"].T)) @ w["down_proj"].T


@pytest.mark.parametrize("S,k,N", SKN)
def test_exact_upcycling_with_zero_router_equals_dense(S, k, N):
    """Softmax router at zero: scores 1/N, top-k weights k/N (not renormalised), S + k/N copies scaled by 1/(S + k/N)."""
    ffn = dense_ffn()
    moe = upcycle_ffn(ffn, moe_config(S, k, N), scaling="exact", router_init="zeros")
    x = inputs()
    y, stats = moe(x)
    assert_close(y, dense_output(ffn, x), 1e-5, f"S={S} k={k} N={N}")
    assert int(stats.tokens_per_expert.sum()) == 21 * k


@pytest.mark.parametrize("S,k,N", SKN)
def test_cube_root_upcycling_is_the_reports_rule(S, k, N):
    """alpha = (S + k/N)^(-1/3) on all three matrices: output (S + k/N) * alpha^2 * down(silu(alpha gate) * up),
    close to dense only as far as silu(alpha z) ~ alpha silu(z)."""
    ffn = dense_ffn(2)
    moe = upcycle_ffn(ffn, moe_config(S, k, N), scaling="cube_root", router_init="zeros")
    alpha = (S + k / N) ** (-1 / 3)
    for expert in (*moe.experts, *moe.shared_experts):
        assert_close(expert.down_proj.weight, ffn.down_proj.weight * alpha, 1e-6, "scaled down_proj")
    x = inputs(3)
    y, _ = moe(x)
    assert_close(y, (S + k / N) * dense_output(ffn, x, alpha), 1e-5, "report's rule")
    dense = dense_output(ffn, x)
    relative = ((y.double() - dense).norm() / dense.norm()).item()
    # silu(alpha z) / (alpha silu(z)) = sigmoid(alpha z) / sigmoid(z): off by less than |1 - alpha| z (1 - sigmoid(z)).
    assert 1e-4 < relative < abs(1 - alpha)


def test_report_factor_for_76b():
    config = moe_config(1, 1, 16)
    assert upcycle_factor(config) == pytest.approx(1 / (1 + 1 / 16))
    assert upcycle_factor(config) ** (1 / 3) == pytest.approx(0.9800, abs=5e-5)  # the report's alpha = 0.98


@pytest.mark.parametrize(
    "router,norm,weight",
    [("softmax", False, "k/N"), ("sigmoid", False, "k/2"), ("softmax", True, "1"), ("sigmoid", True, "1")],
)
def test_other_router_settings_use_their_routed_weight(router, norm, weight):
    S, k, N = 1, 2, 4
    config = moe_config(S, k, N, moe_router=router, norm_topk_prob=norm)
    assert routed_weight(config) == {"k/N": k / N, "k/2": k / 2, "1": 1.0}[weight]
    ffn = dense_ffn(4)
    x = inputs(5)
    y, _ = upcycle_ffn(ffn, config, router_init="zeros")(x)
    assert_close(y, dense_output(ffn, x), 1e-5, f"{router} norm={norm}")


def test_random_router_is_close_but_not_equal():
    ffn = dense_ffn(6)
    config = moe_config(1, 1, 8, initializer_range=0.02)
    torch.manual_seed(0)
    moe = upcycle_ffn(ffn, config, router_init="normal")
    assert moe.router.weight.abs().max() > 0
    x = inputs(7)
    y, _ = moe(x)
    dense = dense_output(ffn, x)
    relative = ((y.double() - dense).norm() / dense.norm()).item()
    assert 0 < relative < 0.05


@pytest.mark.parametrize("S,k,N", [(1, 1, 16), (0, 2, 3)])
def test_upcycled_model_equals_dense_model(tiny_model_factory, S, k, N):
    dense = tiny_model_factory()
    moe = upcycle_model(dense, router_init="zeros", num_experts=N, num_experts_per_tok=k, num_shared_experts=S,
                        dense_ffn_layers=[1])
    assert moe.config.moe_layers == [0, 2] and moe.config.num_experts == N
    assert isinstance(moe.model.layers[1].mlp, SwiGLU)
    for name, tensor in dense.state_dict().items():
        if ".mlp." not in name or ".layers.1." in name:
            assert torch.equal(moe.state_dict()[name], tensor), name
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert_close(moe(ids, use_cache=False).logits, dense(ids, use_cache=False).logits, 1e-5, "model")


def test_upcycling_errors(tiny_model_factory):
    dense = tiny_model_factory()
    with pytest.raises(ValueError, match="num_experts is 0"):
        upcycle_model(dense)
    with pytest.raises(ValueError, match="scaling='quadratic'"):
        upcycle_model(dense, scaling="quadratic", num_experts=4)
    with pytest.raises(ValueError, match="router_init='uniform'"):
        upcycle_model(dense, router_init="uniform", num_experts=4)
    with pytest.raises(ValueError, match="moe_intermediate_size=8"):
        upcycle_model(dense, num_experts=4, moe_intermediate_size=8)
    moe = upcycle_model(dense, num_experts=4)
    with pytest.raises(ValueError, match="already has num_experts=4"):
        upcycle_model(moe, num_experts=4)


@pytest.fixture
def tiny_model_factory():
    def make():
        config = SpikingBrainConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=5, layer_mixers=["gla", "swa", "parallel-full"], gla_chunk_size=16,
        )
        return randomize_(SpikingBrainForCausalLM(config)).eval()

    return make
