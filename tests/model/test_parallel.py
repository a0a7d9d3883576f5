"""Parallel hybrid layers and the key-tied GLA gate, against branches computed here from the weights.

A parallel layer's linear branch is rebuilt from the token-by-token fp64 GLA loop
(reference_impl.gla_reference), its softmax branch from complex-number RoPE and dense
masked softmax (attention_reference), both RMS-normalised by hand and combined with the
configured weights; nothing here calls the mixer's own branch code.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_impl import assert_close, attention_reference, gla_reference, randomize_, rope_reference
from spikingbrain import SpikingBrainConfig
from spikingbrain.model.mixers import GatedLinearAttention, MixerInputs, ParallelHybridAttention
from spikingbrain.ops import rotary_cos_sin, rotary_inv_freq

TOL = 2e-5
B, T, HIDDEN, H, HKV = 2, 37, 32, 4, 2
D = HIDDEN // H


def config(**overrides):
    fields = dict(
        vocab_size=97, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=1, num_attention_heads=H,
        num_key_value_heads=HKV, sliding_window=5, gla_chunk_size=16, layer_mixers=["parallel-swa"],
    )
    return SpikingBrainConfig(**{**fields, **overrides})


def mixer_inputs(batch=B, length=T):
    cos, sin = rotary_cos_sin(torch.arange(length).expand(batch, length), rotary_inv_freq(D, 10000.0))
    return MixerInputs(cos=cos, sin=sin, key_mask=None)


def hidden(seed=1):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed))


def linear(module, x):
    y = x.double() @ module.weight.double().T
    return y if module.bias is None else y + module.bias.double()


def rms(x, weight, eps=1e-6):
    return weight.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def qkv(proj, x):
    return linear(proj.q_proj, x).view(B, T, H, D), linear(proj.k_proj, x).view(B, T, HKV, D), linear(proj.v_proj, x).view(B, T, HKV, D)


def linear_branch(gla, x, q, k, v, key_tied):
    """GLA heads of the report's equations: feature map, gate, recurrence, per-head RMSNorm."""
    if key_tied:
        q, k = torch.sigmoid(q), torch.sigmoid(k)
        g = torch.log(1 - k)
    else:
        q, k = torch.relu(q), torch.relu(k)
        g = torch.nn.functional.logsigmoid(linear(gla.gk_proj[1], linear(gla.gk_proj[0], x))).view(B, T, HKV, D) / 16
    o, _, _ = gla_reference(q, k, v, g, scale=1 / math.sqrt(D))
    return rms(o, gla.g_norm.weight)


def softmax_branch(attn, q, k, v, n_keys):
    positions = torch.arange(T).expand(B, T)
    q, k = rope_reference(q, positions, 10000.0), rope_reference(k, positions, 10000.0)
    return rms(attention_reference(q, k, v, n_keys=n_keys), attn.norm.weight)


@pytest.mark.parametrize("kind", ["swa", "full"])
@pytest.mark.parametrize("combine", ["sum", "mean", "learned"])
@pytest.mark.parametrize("gate", ["lowrank", "key_tied"])
def test_shared_projections_equal_separate_branches(kind, combine, gate):
    feature = "sigmoid" if gate == "key_tied" else "relu"
    cfg = config(layer_mixers=[f"parallel-{kind}"], parallel_combine=combine, gla_gate=gate, gla_feature_map=feature)
    mixer = randomize_(ParallelHybridAttention(cfg, kind))
    x = hidden()
    got = mixer(x, mixer_inputs(), None)
    q, k, v = qkv(mixer, x)
    o_lin = linear_branch(mixer.linear, x, q, k, v, gate == "key_tied")
    o_soft = softmax_branch(mixer.softmax, q, k, v, n_keys=6 if kind == "swa" else None)
    w = {"sum": (1.0, 1.0), "mean": (0.5, 0.5)}.get(combine) or tuple(mixer.branch_weights.double().tolist())
    expected = linear(mixer.o_proj, (w[0] * o_lin + w[1] * o_soft).reshape(B, T, H * D))
    assert_close(got, expected, TOL, f"{kind}/{combine}/{gate}")
    if combine == "learned":  # the learned weights are trained
        got.sum().backward()
        assert mixer.branch_weights.grad is not None and bool((mixer.branch_weights.grad != 0).all())


@pytest.mark.parametrize("kind", ["swa", "full"])
def test_residual_combine_starts_as_softmax_attention_and_adds_the_linear_branch(kind):
    """``residual``: unnormalised softmax branch plus per-head weights (zero at first) times the linear branch."""
    cfg = config(layer_mixers=[f"parallel-{kind}"], parallel_combine="residual", keep_first_tokens=2)
    mixer = ParallelHybridAttention(cfg, kind)
    randomize_(mixer)
    torch.nn.init.zeros_(mixer.linear_weights)
    assert mixer.softmax.norm is None and mixer.linear_weights.shape == (H, 1)
    x = hidden(3)
    q, k, v = qkv(mixer, x)
    n_keys = 6 if kind == "swa" else None
    positions = torch.arange(T).expand(B, T)
    qr, kr = rope_reference(q, positions, 10000.0), rope_reference(k, positions, 10000.0)
    o_soft = attention_reference(qr, kr, v, n_keys=n_keys, keep_first=2 if kind == "swa" else 0)
    assert_close(mixer(x, mixer_inputs(), None), linear(mixer.o_proj, o_soft.reshape(B, T, H * D)), TOL, "starts as softmax")
    with torch.no_grad():
        mixer.linear_weights.copy_(torch.tensor([[0.5], [-1.0], [0.0], [2.0]]))
    got = mixer(x, mixer_inputs(), None)
    o_lin = linear_branch(mixer.linear, x, q, k, v, key_tied=False)
    expected = linear(mixer.o_proj, (mixer.linear_weights.double() * o_lin + o_soft).reshape(B, T, H * D))
    assert_close(got, expected, TOL, f"residual {kind}")
    got.sum().backward()
    assert mixer.linear_weights.grad is not None and bool((mixer.linear_weights.grad != 0).all())


def test_separate_projections_equal_two_projected_branches():
    cfg = config(parallel_shared_projections=False, parallel_combine="learned")
    mixer = randomize_(ParallelHybridAttention(cfg, "swa"))
    assert not hasattr(mixer, "q_proj") and hasattr(mixer.linear, "q_proj") and hasattr(mixer.softmax, "q_proj")
    x = hidden(2)
    got = mixer(x, mixer_inputs(), None)
    o_lin = linear_branch(mixer.linear, x, *qkv(mixer.linear, x), key_tied=False)
    o_soft = softmax_branch(mixer.softmax, *qkv(mixer.softmax, x), n_keys=6)
    w = mixer.branch_weights.double()
    expected = w[0] * linear(mixer.linear.o_proj, o_lin.reshape(B, T, -1)) + w[1] * linear(
        mixer.softmax.o_proj, o_soft.reshape(B, T, -1)
    )
    assert_close(got, expected, TOL, "separate projections")


def test_parameter_names_and_counts():
    """Shared: one q/k/v/o; separate: two; key-tied GLA has no gate parameters."""
    shared = ParallelHybridAttention(config(gla_gate="key_tied", gla_feature_map="sigmoid", parallel_combine="sum"), "swa")
    names = {n for n, _ in shared.named_parameters()}
    assert names == {
        "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
        "o_proj.weight", "linear.g_norm.weight", "softmax.norm.weight",
    }
    separate = ParallelHybridAttention(config(parallel_shared_projections=False), "full")
    projections = sum(p.numel() for n, p in separate.named_parameters() if "_proj." in n and "gk_proj" not in n)
    one = 2 * HIDDEN * HIDDEN + HIDDEN + 2 * (HKV * D * HIDDEN + HKV * D)  # q (bias), o (none), k and v (biases)
    assert projections == 2 * one
    assert "branch_weights" in dict(separate.named_parameters())


def naive_key_tied_gla(x, gla):
    """The key-tied recurrence token by token: S_t = diag(1 - k_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(D)."""
    q = torch.sigmoid(linear(gla.q_proj, x)).view(B, T, H, D)
    k = torch.sigmoid(linear(gla.k_proj, x)).view(B, T, HKV, D)
    v = linear(gla.v_proj, x).view(B, T, HKV, D)
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // HKV)
            S = torch.zeros(D, D, dtype=torch.float64)
            for t in range(T):
                S = (1 - k[b, t, kv]).unsqueeze(1) * S + torch.outer(k[b, t, kv], v[b, t, kv])
                out[b, t, h] = q[b, t, h] @ S / math.sqrt(D)
    return linear(gla.o_proj, rms(out, gla.g_norm.weight).reshape(B, T, H * D))


@pytest.mark.parametrize("grad", [True, False], ids=["chunked", "recurrent-in-pieces"])
def test_key_tied_gla_equals_token_loop(grad):
    cfg = config(layer_mixers=["gla"], gla_gate="key_tied", gla_feature_map="sigmoid")
    gla = randomize_(GatedLinearAttention(cfg))
    assert not hasattr(gla, "gk_proj")
    x = hidden(3)
    expected = naive_key_tied_gla(x, gla)
    if grad:
        got = gla(x, mixer_inputs(), None)
    else:  # decoding path: the recurrent kernel through a carried state
        from spikingbrain.model.cache import GLAState

        state, parts = GLAState(), []
        with torch.no_grad():
            for start in range(0, T, 8):
                piece = x[:, start : start + 8]
                cos, sin = rotary_cos_sin(torch.arange(start, start + piece.shape[1]).expand(B, -1), rotary_inv_freq(D, 1e4))
                parts.append(gla(piece, MixerInputs(cos, sin, None), state))
        got = torch.cat(parts, 1)
    assert_close(got, expected, TOL, "key-tied GLA")


def test_key_tied_gate_is_stable_for_saturated_keys():
    """log(1 - sigmoid(z)) evaluated naively is -inf at z = 40 in fp32; the gate must stay finite and exact."""
    cfg = config(layer_mixers=["gla"], gla_gate="key_tied", gla_feature_map="sigmoid")
    gla = GatedLinearAttention(cfg)
    z = torch.tensor([-40.0, -5.0, 0.0, 5.0, 40.0, 100.0]).view(1, 1, 1, 6)
    g = gla.log_decay(None, z)
    expected = torch.log1p(-torch.sigmoid(z.double()))
    expected[..., -2:] = -z.double()[..., -2:]  # log(1 - sigmoid(z)) = -z - log(1 + e^-z) ~ -z for large z
    assert torch.isfinite(g).all()
    assert_close(g, expected, 1e-6, "log(1 - sigmoid)")
    # A whole layer with saturated keys stays finite.
    with torch.no_grad():
        gla.k_proj.weight.mul_(1000)
        out = gla(hidden(4), mixer_inputs(), None)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"layer_mixers": ["parallel-sliding"]}, "layer_mixers"),
        ({"parallel_combine": "max"}, "parallel_combine"),
        ({"gla_gate": "tied"}, "gla_gate"),
        ({"gla_gate": "key_tied", "gla_feature_map": "relu"}, "gla_feature_map='sigmoid'"),
        ({"gla_feature_map": "tanh"}, "gla_feature_map"),
        ({"num_sink_tokens": -1}, "num_sink_tokens"),
        ({"parallel_combine": "residual", "parallel_shared_projections": False}, "parallel_shared_projections=true"),
        ({"keep_first_tokens": -2}, "keep_first_tokens"),
    ],
)
def test_invalid_values_name_the_field_and_the_fix(fields, needle):
    with pytest.raises(ValueError, match=needle) as info:
        config(**fields)
    assert "use one of" in str(info.value) or "set " in str(info.value) or ">= 0" in str(info.value)


def test_residual_parallel_model_equals_reference(tiny_model):
    """A whole model of residual parallel layers (random, non-zero linear weights) against the fp64 reference."""
    from reference_impl import reference_logits, spec_for

    model = tiny_model(["parallel-swa", "gla", "parallel-full"], parallel_combine="residual", keep_first_tokens=2)
    ids = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert model.model.layers[0].attn.linear_weights.abs().sum() > 0  # randomised, so the branch counts
        got = model(ids, use_cache=False).logits
    assert_close(got, reference_logits(model.state_dict(), spec_for(model.config), ids), 5e-5, "residual model")
