"""Mixture-of-Experts upcycling: a dense SwiGLU FFN copied into every expert of an MoE layer.

The SpikingBrain report (section 3.2) copies the dense FFN into all N routed and S shared
experts, adds a fresh router, and rescales the experts so that the layer's output keeps its
scale: at initialisation the layer computes ``(S + r) * FFN(x)``, where ``r`` is the sum of
the top-k routing weights (``k / N`` for a uniform softmax router without renormalisation),
so the experts are scaled to compute ``c * FFN(x)`` with ``c = 1 / (S + r)``.

Two ways to scale (``scaling``):

- ``"cube_root"`` — the report's rule: all three weight matrices times ``alpha = c^(1/3)``
  (0.98 for S = 1, k = 1, N = 16). It assumes the SwiGLU output is cubic in its weights,
  which holds for the up and down projections but not through SiLU:
  ``silu(alpha z) != alpha silu(z)``, so the output is only close to ``c * FFN(x)``.
- ``"exact"`` (default) — the gate projection unchanged, up and down times ``sqrt(c)``:
  exactly ``c * FFN(x)``, so with a zero router the MoE layer reproduces the dense layer.

``r`` follows the router settings with a zero router: ``k / N`` (softmax, not renormalised:
the report's case), ``k / 2`` (sigmoid, not renormalised: every score is sigmoid(0) = 1/2),
``1`` (renormalised top-k weights). With a small random router (``router_init="normal"``)
the scores are only close to these values, and so is the output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model.config import SpikingBrainConfig
from ..model.layers import SwiGLU
from ..model.modeling import SpikingBrainForCausalLM
from ..model.moe import MoEFeedForward

__all__ = ["SCALINGS", "ROUTER_INITS", "routed_weight", "upcycle_factor", "upcycle_ffn", "upcycle_model"]

SCALINGS = ("exact", "cube_root")
ROUTER_INITS = ("zeros", "normal")


def routed_weight(config: SpikingBrainConfig) -> float:
    """Sum of one token's top-k routing weights under a zero router (all logits 0)."""
    if config.norm_topk_prob:
        return 1.0
    score = 1 / config.num_experts if config.moe_router == "softmax" else 0.5
    return config.num_experts_per_tok * score


def upcycle_factor(config: SpikingBrainConfig) -> float:
    """``c = 1 / (S + r)``: the factor by which every expert's output is scaled."""
    return 1 / (config.num_shared_experts + routed_weight(config))


def _check(config: SpikingBrainConfig, scaling: str, router_init: str) -> None:
    problems = []
    if scaling not in SCALINGS:
        problems.append(f"scaling={scaling!r}; use one of {list(SCALINGS)}")
    if router_init not in ROUTER_INITS:
        problems.append(f"router_init={router_init!r}; use one of {list(ROUTER_INITS)}")
    if not config.num_experts:
        problems.append("num_experts is 0; set num_experts (and num_experts_per_tok, num_shared_experts) for the MoE layers")
    elif config.moe_intermediate_size != config.intermediate_size:
        problems.append(
            f"moe_intermediate_size={config.moe_intermediate_size} differs from the dense intermediate_size="
            f"{config.intermediate_size}; experts are copies of the dense FFN, so leave moe_intermediate_size unset"
        )
    if problems:
        raise ValueError("cannot upcycle: " + "; ".join(problems))


@torch.no_grad()
def upcycle_ffn(
    dense: SwiGLU, config: SpikingBrainConfig, scaling: str = "exact", router_init: str = "zeros"
) -> MoEFeedForward:
    """An MoE layer for ``config`` whose routed and shared experts are scaled copies of ``dense``.

    ``router_init``: ``"zeros"`` (uniform scores: the output equals ``dense``'s exactly with
    ``scaling="exact"``) or ``"normal"`` (std ``config.initializer_range``, the report's random router).
    """
    _check(config, scaling, router_init)
    weight = dense.gate_proj.weight
    with torch.device("meta"):
        moe = MoEFeedForward(config)
    moe = moe.to(weight.dtype).to_empty(device=weight.device)
    c = upcycle_factor(config)
    factors = (1.0, math.sqrt(c), math.sqrt(c)) if scaling == "exact" else (c ** (1 / 3),) * 3
    names = ("gate_proj", "up_proj", "down_proj")
    for expert in (*moe.experts, *moe.shared_experts):
        for name, factor in zip(names, factors):
            getattr(expert, name).weight.copy_(getattr(dense, name).weight * factor)
    if router_init == "zeros":
        nn.init.zeros_(moe.router.weight)
    else:
        nn.init.normal_(moe.router.weight, std=config.initializer_range)
    return moe


@torch.no_grad()
def upcycle_model(
    model: SpikingBrainForCausalLM, scaling: str = "exact", router_init: str = "normal", **moe_fields
) -> SpikingBrainForCausalLM:
    """A copy of the dense ``model`` with MoE FFNs upcycled from its FFNs.

    ``moe_fields`` are the config's MoE fields (``num_experts``, ``num_experts_per_tok``,
    ``num_shared_experts``, ``moe_router``, ``norm_topk_prob``, ``dense_ffn_layers``,
    ``router_aux_loss_coef``); every other weight is copied unchanged. Example (SpikingBrain-76B):
    ``upcycle_model(model, num_experts=16, num_experts_per_tok=1, num_shared_experts=1,
    dense_ffn_layers=[0, 1, 2, 4, 6, 8, 10])``.
    """
    if model.config.num_experts:
        raise ValueError(
            f"model already has num_experts={model.config.num_experts}; upcycle a dense model (num_experts=0)"
        )
    config = SpikingBrainConfig.derived_from(model.config, **moe_fields)
    _check(config, scaling, router_init)
    weight = model.lm_head.weight
    with torch.device("meta"):
        moe_model = SpikingBrainForCausalLM(config)
    moe_model = moe_model.to(weight.dtype).to_empty(device=weight.device)
    state = model.state_dict()
    moe_layers = set(config.moe_layers)
    dense_part = {n: t for n, t in state.items() if not any(n.startswith(f"model.layers.{i}.mlp.") for i in moe_layers)}
    moe_model.load_state_dict(dense_part, strict=False)  # missing: only the MoE layers' FFNs, replaced next
    for i in moe_layers:
        moe_model.model.layers[i].mlp = upcycle_ffn(model.model.layers[i].mlp, config, scaling, router_init)
    if config.tie_word_embeddings:
        moe_model.tie_weights()
    return moe_model.train(model.training)
