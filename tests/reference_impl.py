"""Independent fp64 references for the tests, written from the published equations (DESIGN.md).

Nothing here imports ``spikingbrain``: the GLA recurrence, the dense masked softmax, the
complex-number RoPE and the whole SpikingBrain-7B forward pass are written again from the
formulas, and weights are read by their official names from a plain ``state_dict``. Also
here: tiny random weights in the official layout and a writer of official-format folders
(config.json + sharded safetensors + index), used by the loading and error tests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# ----------------------------------------------------------------------------- comparisons


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """``max |actual - expected| <= rel * max(1, max |expected|)``, compared in fp64."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:.1e} x {scale:.3g}"


# ----------------------------------------------------------------------------- kernels


def gla_reference(q, k, v, g, scale=None, initial_state=None):
    """The published GLA recurrence, token by token in fp64, with k, v, g repeated over head groups.

    ``S_t = diag(exp g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``. Inputs ``q`` [B, T, H, K],
    ``k``, ``g`` [B, T, Hkv, K], ``v`` [B, T, Hkv, V], ``initial_state`` [B, Hkv, K, V]. Returns
    ``(o [B, T, H, V], final_state [B, Hkv, K, V], per_head_state [B, H, K, V])``.
    """
    q, k, v, g = (x.double() for x in (q, k, v, g))
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    G = H // Hkv
    scale = K**-0.5 if scale is None else scale
    group = [h // G for h in range(H)]  # query head h reads key/value head h // G
    k, v, g = k[:, :, group], v[:, :, group], g[:, :, group]
    S = torch.zeros(B, H, K, V, dtype=torch.float64)
    if initial_state is not None:
        S = initial_state.double()[:, group].clone()
    out = torch.zeros(B, T, H, V, dtype=torch.float64)
    for t in range(T):
        S = torch.exp(g[:, t]).unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        out[:, t] = scale * (q[:, t].unsqueeze(-1) * S).sum(dim=-2)
    return out, S[:, ::G].clone(), S


def delta_rule_reference(q, k, v, g, beta, scale=None, initial_state=None):
    """The gated delta rule in its matrix form, token by token in fp64, with k, v, g, beta repeated over head groups.

    ``S_t = (I - beta_t k_t^T k_t) diag(exp g_t) S_{t-1} + beta_t k_t^T v_t``, ``o_t = scale * q_t S_t``;
    ``beta`` is ``[B, T, Hkv]``, the rest as :func:`gla_reference`. Returns ``(o, final_state [B, Hkv, K, V])``.
    """
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    Hkv, V = k.shape[2], v.shape[3]
    G = H // Hkv
    scale = K**-0.5 if scale is None else scale
    group = [h // G for h in range(H)]
    k, v, g, beta = k[:, :, group], v[:, :, group], g[:, :, group], beta[:, :, group]
    S = torch.zeros(B, H, K, V, dtype=torch.float64) if initial_state is None else initial_state.double()[:, group].clone()
    eye = torch.eye(K, dtype=torch.float64)
    out = torch.zeros(B, T, H, V, dtype=torch.float64)
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        erase = eye - bt * kt.unsqueeze(-1) * kt.unsqueeze(-2)  # [B, H, K, K]
        S = erase @ (torch.exp(g[:, t]).unsqueeze(-1) * S) + bt * kt.unsqueeze(-1) * v[:, t].unsqueeze(-2)
        out[:, t] = scale * (q[:, t].unsqueeze(-1) * S).sum(dim=-2)
    return out, S[:, ::G].clone()


def attention_reference(q, k, v, n_keys=None, scale=None, key_padding_mask=None, keep_first=0):
    """Dense masked softmax attention in fp64.

    Query ``i`` sits at key position ``p = Tk - Tq + i`` and sees keys ``p - n_keys + 1 .. p``
    (``n_keys=None``: all keys ``0 .. p``) and the first ``keep_first`` real keys before it,
    minus keys where ``key_padding_mask`` is false.
    Query head ``h`` reads key/value head ``h // (H / Hkv)``. Rows with no visible key are NaN.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    group = [h // G for h in range(H)]
    qd, kd, vd = q.double(), k.double()[:, :, group], v.double()[:, :, group]
    scores = torch.einsum("bihd,bjhd->bhij", qd, kd) * scale
    p = torch.arange(Tk - Tq, Tk).unsqueeze(1)
    j = torch.arange(Tk).unsqueeze(0)
    allowed = j <= p
    if n_keys is not None:
        allowed = allowed & (j > p - n_keys)
    allowed = allowed.expand(B, Tq, Tk)
    real = torch.ones(B, Tk, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.bool()
    rank = real.long().cumsum(1)  # 1 for the first real key of a row, 2 for the second, ...
    allowed = allowed | ((j <= p) & real.unsqueeze(1) & (rank <= keep_first).unsqueeze(1))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool().unsqueeze(1)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", weights, vd)


def rope_reference(x, positions, theta):
    """Rotate pairs ``(x_i, x_{i+D/2})``, read as complex numbers, by ``pos * theta^(-2i/D)`` (fp64).

    ``x`` is [B, T, H, D], ``positions`` [B, T].
    """
    D = x.shape[-1]
    half = D // 2
    xd = x.double()
    z = torch.complex(xd[..., :half], xd[..., half:])
    freq = float(theta) ** (-2.0 * torch.arange(half, dtype=torch.float64) / D)
    angle = positions.double()[:, :, None, None] * freq
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


# ----------------------------------------------------------------------------- SpikingBrain-7B forward


@dataclass
class RefSpec:
    """What the reference forward needs beyond the weights."""

    layers: list  # "gla", "swa", "full", "parallel-swa" or "parallel-full" per layer
    heads: int
    kv_heads: int
    head_dim: int
    window_keys: int  # keys a sliding-window query sees, itself included
    eps: float
    rope_theta: float
    gate_normalizer: float = 16.0
    feature_map: str = "relu"  # GLA q/k feature map: relu, identity or sigmoid
    key_tied: bool = False  # GLA decay 1 - k instead of the low-rank gate
    delta: bool = False  # GLA state written by the gated delta rule (gla_update="delta")
    combine: str = "learned"  # parallel layers: sum, mean or learned
    shared_projections: bool = True  # parallel layers: one q/k/v/o for both branches
    num_sinks: int = 0
    keep_first: int = 0  # first positions every sliding-window query also sees
    num_experts: int = 0
    num_shared: int = 0
    top_k: int = 1
    router: str = "softmax"
    norm_topk: bool = False
    moe_layers: tuple = ()


def spec_for(config) -> RefSpec:
    """A RefSpec from a config's plain fields (flash windows see W + 1 keys, sdpa windows W)."""
    window = config.sliding_window + (1 if config.window_semantics == "flash" else 0)
    experts = getattr(config, "num_experts", 0)
    dense = set(getattr(config, "dense_ffn_layers", []))
    return RefSpec(
        layers=list(config.layer_mixers),
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        window_keys=window,
        eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        gate_normalizer=config.gla_gate_normalizer,
        feature_map=config.gla_feature_map,
        key_tied=getattr(config, "gla_gate", "lowrank") == "key_tied",
        delta=getattr(config, "gla_update", "additive") == "delta",
        combine=getattr(config, "parallel_combine", "learned"),
        shared_projections=getattr(config, "parallel_shared_projections", True),
        num_sinks=getattr(config, "num_sink_tokens", 0),
        keep_first=getattr(config, "keep_first_tokens", 0),
        num_experts=experts,
        num_shared=getattr(config, "num_shared_experts", 0),
        top_k=getattr(config, "num_experts_per_tok", 1),
        router=getattr(config, "moe_router", "softmax"),
        norm_topk=getattr(config, "norm_topk_prob", False),
        moe_layers=tuple(i for i in range(config.num_hidden_layers) if experts and i not in dense),
    )


def _rms_norm(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class SpikingWeights(dict):
    """A state dict whose reference forward spikes every projection input (W8ASpike): counts
    ``floor(x / V_th + 1/2)`` with ``V_th = clamp(mean|x| / k, 1e-5, 1e4)`` per token, written out here
    independently of the library. Options: spike the post-RoPE query per head; INT8 K/V per token and head."""

    def __init__(self, state, k=3.0, spike_query=False, int8_kv=False, dense_inputs=()):
        super().__init__(state)
        self.spike_k, self.spike_query, self.int8_kv = k, spike_query, int8_kv
        self.dense_inputs = tuple(dense_inputs)  # projections (name endings) whose inputs do not spike


def spike_reference(x, k):
    """Counts times threshold of an adaptive-threshold neuron over the last dimension (fp64)."""
    threshold = torch.clamp(x.double().abs().mean(-1, keepdim=True) / k, 1e-5, 1e4)
    return torch.floor(x.double() / threshold + 0.5) * threshold


def int8_reference(x):
    """Symmetric INT8 round trip with one scale (max|x| / 127) per vector of the last dimension."""
    scale = x.double().abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x.double() / scale), -127, 127) * scale


def int8_rows_rounded(x):
    """Each row (last dimension) rounded to int8 codes of scale max|row| / 127, in fp32 as a cache stores it, as floats."""
    scale = x.abs().amax(-1, keepdim=True) / 127
    return torch.round(x / scale) * scale


_SPIKED = ("q_proj", "k_proj", "v_proj", "o_proj", "gk_proj.0", "gate_proj", "up_proj", "down_proj")


def _linear(sd, name, x):
    if getattr(sd, "spike_k", None) and name.endswith(_SPIKED) and not name.endswith(getattr(sd, "dense_inputs", ())):
        x = spike_reference(x, sd.spike_k)
    y = x @ sd[f"{name}.weight"].double().T
    bias = sd.get(f"{name}.bias")
    return y if bias is None else y + bias.double()


def _qkv(sd, p, h, spec):
    """q [B, T, H, D], k and v [B, T, Hkv, D] through the projections named ``p + "{q,k,v}_proj"``."""
    B, T, _ = h.shape
    H, Hkv, D = spec.heads, spec.kv_heads, spec.head_dim
    return (
        _linear(sd, p + "q_proj", h).view(B, T, H, D),
        _linear(sd, p + "k_proj", h).view(B, T, Hkv, D),
        _linear(sd, p + "v_proj", h).view(B, T, Hkv, D),
    )


_FEATURES = {"relu": torch.relu, "identity": lambda x: x, "sigmoid": lambda x: 1 / (1 + torch.exp(-x))}


def _unit_length(x):
    """``x`` divided by its length over the last dimension (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _gla_heads(sd, p, h, q, k, v, spec):
    """GLA per-head outputs, RMS-normalised by ``p + "g_norm"``; gate parameters under ``p``."""
    B, T, _ = h.shape
    D = spec.head_dim
    phi = _FEATURES[spec.feature_map]
    if spec.key_tied:
        g = torch.log(1 - phi(k))  # decay 1 - k_t, taken literally
    else:
        gk = _linear(sd, p + "gk_proj.1", _linear(sd, p + "gk_proj.0", h))
        g = (-torch.log1p(torch.exp(-gk)) / spec.gate_normalizer).view(k.shape)  # logsigmoid
    if spec.delta:  # unit-length features, write strength sigmoid(beta_proj h) per key/value head
        beta = 1 / (1 + torch.exp(-_linear(sd, p + "beta_proj", h)))
        o, _ = delta_rule_reference(_unit_length(phi(q)), _unit_length(phi(k)), v, g, beta, scale=1 / math.sqrt(D))
    else:
        o, _, _ = gla_reference(phi(q), phi(k), v, g, scale=1 / math.sqrt(D))
    return _rms_norm(o, sd[p + "g_norm.weight"].double(), spec.eps)


def sink_attention_reference(q, k, v, sink_k, sink_v, n_keys=None, key_padding_mask=None, keep_first=0):
    """Dense softmax attention (fp64) over the sink rows prepended to the keys, with an explicit mask.

    Keys/values are ``[sinks | real]``; real query ``i`` (at real key position ``Tk - Tq + i``) sees
    every sink column and the real keys of :func:`attention_reference`'s rule (the first ``keep_first``
    positions included). ``sink_k``/``sink_v``
    are ``[n, Hkv, D]`` (shared by the batch). ``n_keys`` and ``key_padding_mask`` count real keys only.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    n = sink_k.shape[0]
    group = [h // (H // Hkv) for h in range(H)]
    keys = torch.cat((sink_k.double().expand(B, n, Hkv, D), k.double()), 1)[:, :, group]
    values = torch.cat((sink_v.double().expand(B, n, Hkv, D), v.double()), 1)[:, :, group]
    allowed = torch.zeros(B, Tq, n + Tk, dtype=torch.bool)
    allowed[:, :, :n] = True
    for i in range(Tq):
        p = Tk - Tq + i
        first = 0 if n_keys is None else max(0, p - n_keys + 1)
        allowed[:, i, n + first : n + p + 1] = True
        allowed[:, i, n : n + min(keep_first, p + 1)] = True
    if key_padding_mask is not None:
        allowed[:, :, n:] &= key_padding_mask.bool().unsqueeze(1)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), keys) / math.sqrt(D)
    weights = torch.softmax(scores.masked_fill(~allowed.unsqueeze(1), float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", weights, values)


def _softmax_heads(sd, p, q, k, v, spec, n_keys, positions, proj):
    """Softmax attention per-head outputs (RoPE on real tokens; sinks under ``p`` through ``proj``'s k/v)."""
    q = rope_reference(q, positions, spec.rope_theta)
    k = rope_reference(k, positions, spec.rope_theta)
    if getattr(sd, "spike_query", False):
        q = spike_reference(q, sd.spike_k)
    if getattr(sd, "int8_kv", False):
        k, v = int8_reference(k), int8_reference(v)
    keep_first = spec.keep_first if n_keys is not None else 0
    if not spec.num_sinks:
        return attention_reference(q, k, v, n_keys=n_keys, scale=1 / math.sqrt(spec.head_dim), keep_first=keep_first)
    sinks = sd[p + "sinks"].double()
    shape = (spec.num_sinks, spec.kv_heads, spec.head_dim)
    sink_k, sink_v = _linear(sd, proj + "k_proj", sinks).view(shape), _linear(sd, proj + "v_proj", sinks).view(shape)
    return sink_attention_reference(q, k, v, sink_k, sink_v, n_keys=n_keys, keep_first=keep_first)


def _parallel_layer(sd, p, h, spec, n_keys, positions):
    """Linear and softmax branches, each RMS-normalised (the softmax one not for ``residual``), combined, projected."""
    B, T, _ = h.shape
    w = {"sum": (1.0, 1.0), "mean": (0.5, 0.5)}.get(spec.combine)
    if spec.combine == "residual":  # per-head weights [H, 1] on the linear branch
        w = (sd[p + "linear_weights"].double(), 1.0)
    elif w is None:
        w = sd[p + "branch_weights"].double().tolist()
    if spec.shared_projections:
        q, k, v = _qkv(sd, p, h, spec)
        o_lin = _gla_heads(sd, p + "linear.", h, q, k, v, spec)
        o_soft = _softmax_heads(sd, p + "softmax.", q, k, v, spec, n_keys, positions, p)
        if spec.combine != "residual":
            o_soft = _rms_norm(o_soft, sd[p + "softmax.norm.weight"].double(), spec.eps)
        return _linear(sd, p + "o_proj", (w[0] * o_lin + w[1] * o_soft).reshape(B, T, -1))
    lin, soft = p + "linear.", p + "softmax."
    o_lin = _gla_heads(sd, lin, h, *_qkv(sd, lin, h, spec), spec)
    o_soft = _softmax_heads(sd, soft, *_qkv(sd, soft, h, spec), spec, n_keys, positions, soft)
    o_soft = _rms_norm(o_soft, sd[soft + "norm.weight"].double(), spec.eps)
    return w[0] * _linear(sd, lin + "o_proj", o_lin.reshape(B, T, -1)) + w[1] * _linear(
        sd, soft + "o_proj", o_soft.reshape(B, T, -1)
    )


def _swiglu(sd, p, x):
    gate, up = _linear(sd, p + "gate_proj", x), _linear(sd, p + "up_proj", x)
    return _linear(sd, p + "down_proj", gate * torch.sigmoid(gate) * up)


def moe_reference(sd, p, x, spec):
    """Mixture-of-Experts FFN token by token: shared experts plus the top-k routed experts (fp64)."""
    out = torch.zeros_like(x)
    flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for t in range(flat_x.shape[0]):
        xt = flat_x[t : t + 1]
        logits = _linear(sd, p + "router", xt)[0]
        scores = torch.softmax(logits, -1) if spec.router == "softmax" else torch.sigmoid(logits)
        chosen = sorted(range(spec.num_experts), key=lambda e: -scores[e].item())[: spec.top_k]
        total = sum(scores[e] for e in chosen)
        y = torch.zeros_like(xt)
        for s in range(spec.num_shared):
            y = y + _swiglu(sd, f"{p}shared_experts.{s}.", xt)
        for e in chosen:
            weight = scores[e] / total if spec.norm_topk else scores[e]
            y = y + weight * _swiglu(sd, f"{p}experts.{e}.", xt)
        flat_out[t] = y[0]
    return out


def reference_logits(sd: dict, spec: RefSpec, ids: torch.Tensor) -> torch.Tensor:
    """fp64 logits ``[B, T, vocab]`` of the SpikingBrain equations with weights named as in the release
    (SpikingBrain-7B; plus our names for parallel layers, sinks and MoE FFNs)."""
    B, T = ids.shape
    x = sd["model.embeddings.weight"].double()[ids]
    positions = torch.arange(T).expand(B, T)
    for i, kind in enumerate(spec.layers):
        p = f"model.layers.{i}."
        h = _rms_norm(x, sd[p + "attn_norm.weight"].double(), spec.eps)
        a = p + "attn."
        n_keys = spec.window_keys if kind.endswith("swa") else None
        if kind == "gla":
            o = _gla_heads(sd, a, h, *_qkv(sd, a, h, spec), spec)
            x = x + _linear(sd, a + "o_proj", o.reshape(B, T, -1))
        elif kind in ("swa", "full"):
            o = _softmax_heads(sd, a, *_qkv(sd, a, h, spec), spec, n_keys, positions, a)
            x = x + _linear(sd, a + "o_proj", o.reshape(B, T, -1))
        else:
            x = x + _parallel_layer(sd, a, h, spec, n_keys, positions)
        h = _rms_norm(x, sd[p + "mlp_norm.weight"].double(), spec.eps)
        x = x + (moe_reference(sd, p + "mlp.", h, spec) if i in spec.moe_layers else _swiglu(sd, p + "mlp.", h))
    x = _rms_norm(x, sd["model.norm.weight"].double(), spec.eps)
    head = sd.get("lm_head.weight", sd["model.embeddings.weight"])
    return x @ head.double().T


def greedy_reference(sd: dict, spec: RefSpec, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation of ``ids`` [1, T] (``steps`` new tokens), recomputing the reference each step."""
    for _ in range(steps):
        nxt = reference_logits(sd, spec, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), dim=1)
    return ids


# ----------------------------------------------------------------------------- random weights


def _random_value(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """Weights that make every path matter: O(1) activations, varied gates, non-trivial norms."""
    if name.endswith("norm.weight"):
        return 1 + 0.2 * torch.randn(shape, generator=gen)
    if name.endswith("branch_weights"):
        return 0.5 + 0.3 * torch.randn(shape, generator=gen)
    if name.endswith("sinks"):
        return torch.randn(shape, generator=gen)  # like normalised hidden states
    if name.endswith("gk_proj.1.bias"):
        return 3 * torch.randn(shape, generator=gen)  # decays from ~1 down to exp(-1/2)-ish per step
    if name.endswith("bias"):
        return 0.3 * torch.randn(shape, generator=gen)
    if "embeddings" in name:
        return torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[1])


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter of ``model`` with seeded random values (see ``_random_value``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_random_value(name, param.shape, gen))
    return model


def official_shapes(vocab, hidden, layers, heads, kv_heads, intermediate, attn_layers) -> dict:
    """Parameter names and shapes of the released SpikingBrain-7B layout (head_dim = hidden / heads)."""
    D = hidden // heads
    shapes = {"model.embeddings.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "attn_norm.weight"] = (hidden,)
        for proj, rows in (("q_proj", heads * D), ("k_proj", kv_heads * D), ("v_proj", kv_heads * D)):
            shapes[p + f"attn.{proj}.weight"] = (rows, hidden)
            shapes[p + f"attn.{proj}.bias"] = (rows,)
        shapes[p + "attn.o_proj.weight"] = (hidden, heads * D)
        if i not in attn_layers:
            shapes[p + "attn.gk_proj.0.weight"] = (16, hidden)
            shapes[p + "attn.gk_proj.1.weight"] = (kv_heads * D, 16)
            shapes[p + "attn.gk_proj.1.bias"] = (kv_heads * D,)
            shapes[p + "attn.g_norm.weight"] = (D,)
        shapes[p + "mlp_norm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


#: A tiny config.json in the release's layout (fields and values as in W8ASpike/config.json, sizes shrunk).
TINY_OFFICIAL_CONFIG = {
    "architectures": ["GLAswaForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_gla_swa.GLAswaConfig",
        "AutoModelForCausalLM": "modeling_gla_swa.GLAswaForCausalLM",
    },
    "model_type": "gla_swa",
    "attn_layers": [1, 3],
    "attn_mode": "chunk",
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "conv_size": 4,
    "elementwise_affine": True,
    "fuse_cross_entropy": True,
    "hidden_act": "swish",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "max_position_embeddings": 4096,
    "norm_eps": 1e-6,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "sliding_window": 6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_short_conv": False,
    "vocab_size": 97,
}


def official_state_dict(config: dict, seed: int = 0, dtype=torch.bfloat16) -> dict:
    """Random tensors for an official ``config`` dict, named and shaped as in the release."""
    attn_layers = config.get("attn_layers", list(range(1, config["num_hidden_layers"], 2)))
    shapes = official_shapes(
        config["vocab_size"], config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
        config["num_key_value_heads"], config["intermediate_size"], attn_layers,
    )
    gen = torch.Generator().manual_seed(seed)
    return {name: _random_value(name, shape, gen).to(dtype) for name, shape in shapes.items()}


def official_spec(config: dict) -> RefSpec:
    """RefSpec of an official config dict: attn_layers are SWA (W + 1 keys, flash-attn), the rest GLA."""
    layers = config["num_hidden_layers"]
    attn_layers = config.get("attn_layers", list(range(1, layers, 2)))
    return RefSpec(
        layers=["swa" if i in attn_layers else "gla" for i in range(layers)],
        heads=config["num_attention_heads"],
        kv_heads=config["num_key_value_heads"],
        head_dim=config["hidden_size"] // config["num_attention_heads"],
        window_keys=config["sliding_window"] + 1,
        eps=config["norm_eps"],
        rope_theta=config["rope_theta"],
    )


def write_official_folder(folder: Path, config: dict, state: dict, shards: int = 2) -> Path:
    """Write ``config.json``, ``model-0000i-of-0000n.safetensors`` shards and the index, like the release."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names = list(state)
    weight_map = {}
    for s in range(shards):
        filename = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[s::shards]}
        save_file(part, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({n: filename for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
