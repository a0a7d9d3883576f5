"""Closed-form start for converted GLA layers: decay and output-norm scales fitted to the teacher.

For every GLA layer (parallel hybrid layers are left as they are), from the teacher's own layer input ``x`` and attention output ``o`` (before
``o_proj``): (1) each key-value head gets the constant gate bias, from a grid, whose per-head
normalised output ``n`` best explains ``o`` after a least-squares scale per head and channel;
with ``decay_init="distance"`` the bias instead makes a geometric decay's mean
look-back equal the mean query-key distance of the teacher's softmax weights in that head (keys past
the first ``skip_first``, which act as attention sinks); with ``decay_init="multiscale"`` every key-value head's
channels get half-lives log-spaced from :data:`MULTISCALE_HALF_LIVES`' shortest to its longest (some channels local,
some that can hold a token for thousands of steps); (2) the output-norm weight of channel ``d`` becomes ``w_d = Σ n_d o_d / Σ n_d²`` over tokens and
heads, the scale that minimises ``|w n - o|²`` (0 where the two are uncorrelated, so a layer
never starts worse than skipping attention).
"""

from __future__ import annotations

import math

import torch

from ..model.mixers import GatedLinearAttention
from ..model.modeling import SpikingBrainForCausalLM
from ..ops.rotary import apply_rotary

__all__ = ["calibrate_gla", "GATE_BIAS_GRID", "DECAY_INITS", "MULTISCALE_HALF_LIVES", "mean_attention_distance",
           "gate_bias_for_distance", "gate_bias_for_half_life", "multiscale_gate_bias"]

#: Gate biases tried per head: decay per step sigmoid(b)^(1/16) from 0.61 (b=-8) to 0.99998 (b=8).
GATE_BIAS_GRID = (-8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0)

#: How ``calibrate_gla`` chooses the gate biases: the grid search, the teacher's attention distances, or fixed half-lives
#: log-spaced over each head's channels.
DECAY_INITS = ("grid", "distance", "multiscale")

#: Shortest and longest half-life (tokens) of ``decay_init="multiscale"``: 2 keeps the grid's range (decay >= 0.61 a step)
MULTISCALE_HALF_LIVES = (2.0, 16384.0)


def _teacher_attention(teacher: SpikingBrainForCausalLM, ids: torch.Tensor, layers: list[int]) -> dict[int, list]:
    """``[x, mixer inputs, pre-o_proj output]`` of the teacher's attention in each of ``layers``."""
    captured: dict[int, list] = {}

    def hooks(i):
        block = teacher.model.layers[i].attn

        def layer_input(module, args):
            captured[i] = [args[0], args[1]]

        def attention_output(module, args):
            captured[i].append(args[0])

        return [block.register_forward_pre_hook(layer_input), block.o_proj.register_forward_pre_hook(attention_output)]

    handles = [h for i in layers for h in hooks(i)]
    try:
        teacher.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def mean_attention_distance(attention, x: torch.Tensor, inputs, skip_first: int = 4) -> torch.Tensor:
    """Mean query-key distance ``Σ_s p_ts (t - s)`` of a softmax attention's weights per query head ``[H]``,
    averaged over queries ``t >= skip_first`` with the weights renormalised over keys ``s >= skip_first``."""
    q, k, _ = attention.project(x)
    q, k = apply_rotary(q, inputs.cos, inputs.sin).double(), apply_rotary(k, inputs.cos, inputs.sin).double()
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    T = q.shape[1]
    position = torch.arange(T)
    distance = (position[:, None] - position[None, :]).double()  # [t, s]
    means = []
    for row_q, row_k in zip(q, k):  # one row at a time: [H, T, T] per row
        scores = torch.einsum("thd,shd->hts", row_q, row_k) * q.shape[-1] ** -0.5
        weights = scores.masked_fill(distance < 0, float("-inf")).softmax(-1)[:, skip_first:, skip_first:]
        weights = weights / weights.sum(-1, keepdim=True)
        means.append((weights * distance[skip_first:, skip_first:]).sum(-1).mean(-1))
    return torch.stack(means).mean(0)


def _gate_bias_for_log_decay(log_decay: torch.Tensor, normalizer: float) -> torch.Tensor:
    """The gate bias ``b`` whose decay per step ``a = sigmoid(b)^(1/normalizer)`` has ``log a = log_decay`` (<= 0):
    ``log sigmoid(b) = normalizer log a``, so ``b = -log(exp(-normalizer log a) - 1)``."""
    return -torch.log(torch.expm1(-normalizer * log_decay.double()))


def gate_bias_for_distance(distance: torch.Tensor, normalizer: float, low: float = -8.0, high: float = 8.0) -> torch.Tensor:
    """The gate bias ``b`` whose decay per step ``a = sigmoid(b)^(1/normalizer)`` has mean look-back
    ``a / (1 - a)`` equal to ``distance`` (so ``a = m / (1 + m)``), clamped to ``[low, high]``."""
    distance = distance.double()
    return _gate_bias_for_log_decay(torch.log(distance / (1 + distance)), normalizer).clamp(low, high)


def gate_bias_for_half_life(half_life: torch.Tensor, normalizer: float) -> torch.Tensor:
    """The gate bias ``b`` whose decay per step ``a = sigmoid(b)^(1/normalizer)`` halves a state in ``half_life`` steps
    (``log a = -ln 2 / half_life``)."""
    return _gate_bias_for_log_decay(-math.log(2) / half_life.double(), normalizer)


def multiscale_gate_bias(head_dim: int, normalizer: float, half_lives: tuple[float, float] = MULTISCALE_HALF_LIVES) -> torch.Tensor:
    """Gate biases ``[head_dim]`` of one key-value head whose channels' half-lives run log-spaced from ``half_lives[0]``
    (channel 0) to ``half_lives[1]`` (the last channel)."""
    shortest, longest = half_lives
    if not 0 < shortest <= longest:
        raise ValueError(f"multiscale half-lives must satisfy 0 < shortest <= longest, got {half_lives}")
    steps = torch.linspace(0.0, 1.0, head_dim, dtype=torch.float64)
    return gate_bias_for_half_life(shortest * (longest / shortest) ** steps, normalizer)


def _normalised_output(mixer: GatedLinearAttention, x, inputs) -> torch.Tensor:
    """The mixer's per-head output after an RMSNorm of weight 1, ``[tokens, heads, D]`` in fp64."""
    seen = {}

    def keep(module, args):
        seen["o"] = args[0]

    handle = mixer.o_proj.register_forward_pre_hook(keep)
    try:
        mixer(x, inputs, None)
    finally:
        handle.remove()
    return seen["o"].reshape(-1, mixer.num_heads, mixer.head_dim).double()


def _fit_error(n: torch.Tensor, o: torch.Tensor, dims) -> torch.Tensor:
    """Residual ``|w n - o|²`` with ``w`` the least-squares scale shared over ``dims``, summed over ``dims``."""
    w = (n * o).sum(dims, keepdim=True) / (n * n).sum(dims, keepdim=True).clamp_min(1e-12)
    return (w * n - o).pow(2).sum(dims)


@torch.no_grad()
def calibrate_gla(
    student: SpikingBrainForCausalLM, teacher: SpikingBrainForCausalLM, ids: torch.Tensor, gate_grid=GATE_BIAS_GRID,
    decay_init: str = "grid", skip_first: int = 4,
) -> dict[int, float]:
    """Fit gate biases (``decay_init``: ``grid`` or ``distance``, see the module docstring) and output-norm
    weights of every GLA layer; returns each layer's relative error ``|w n - o|² / |o|²``."""
    if decay_init not in DECAY_INITS:
        raise ValueError(f"decay_init {decay_init!r} is not one of {DECAY_INITS}")
    layers = [i for i, block in enumerate(student.model.layers) if isinstance(block.attn, GatedLinearAttention)]
    captured = _teacher_attention(teacher, ids, layers)
    errors = {}
    for i in layers:
        x, inputs, target = captured[i]
        mixer = student.model.layers[i].attn
        o = target.reshape(-1, mixer.num_heads, mixer.head_dim).double()
        mixer.g_norm.weight.fill_(1.0)
        if decay_init == "distance" and not mixer.key_tied:
            heads = mean_attention_distance(teacher.model.layers[i].attn, x, inputs, skip_first)
            per_kv_head = heads.view(mixer.num_kv_heads, -1).mean(-1)
            bias = gate_bias_for_distance(per_kv_head, mixer.gate_normalizer)
            mixer.gate_bias.copy_(bias.to(mixer.gate_bias.dtype).repeat_interleave(mixer.head_dim))
        elif decay_init == "multiscale" and not mixer.key_tied:
            bias = multiscale_gate_bias(mixer.head_dim, mixer.gate_normalizer).repeat(mixer.num_kv_heads)
            mixer.gate_bias.copy_(bias.to(mixer.gate_bias.dtype))
        elif decay_init == "grid" and gate_grid and not mixer.key_tied:  # a key-tied gate has no parameters to fit
            bias = mixer.gate_bias
            group = mixer.num_heads // mixer.num_kv_heads
            scores = []
            for value in gate_grid:
                bias.fill_(value)
                per_head = _fit_error(_normalised_output(mixer, x, inputs), o, (0,)).sum(-1)  # [heads]
                scores.append(per_head.view(mixer.num_kv_heads, group).sum(-1))
            best = torch.stack(scores).argmin(0)  # per kv head
            chosen = torch.tensor(gate_grid, dtype=bias.dtype)[best]
            bias.copy_(chosen.repeat_interleave(mixer.head_dim))
        n = _normalised_output(mixer, x, inputs).reshape(-1, mixer.head_dim)
        flat = o.reshape(-1, mixer.head_dim)
        weight = (n * flat).sum(0) / (n * n).sum(0).clamp_min(1e-12)
        mixer.g_norm.weight.copy_(weight.to(mixer.g_norm.weight.dtype))
        errors[i] = float(((n * weight - flat).pow(2).sum() / flat.pow(2).sum()).item())
    return errors
