"""Mixture-of-Experts feed-forward layer (SpikingBrain-76B style): routed and shared SwiGLU experts.

Every token goes through the ``num_shared_experts`` shared experts and through the
``num_experts_per_tok`` routed experts with the highest router scores, weighted by those
scores::

    y = sum_s shared_s(x) + sum_{i in topk(p)} w_i expert_i(x)

``p = softmax(W_r x)`` or ``sigmoid(W_r x)`` (``moe_router``); ``w_i = p_i``, or ``p_i``
divided by the sum of the selected scores (``norm_topk_prob``). The computation is dropless
(no capacity limit): token copies are sorted by expert and each expert runs one matmul chain
over its contiguous group, whose outputs are added back with one ``index_add``.

Load balancing (Switch Transformer): with ``f_i`` the fraction of the token-to-expert
assignments that go to expert ``i`` and ``P_i`` the mean over tokens of its router score
(sigmoid scores divided by their sum per token, so that both routers give a distribution),

    L_aux = N * sum_i f_i * P_i

which is 1 when routing is uniform and up to N when everything goes to one expert. Only
``P`` carries gradients. Padded tokens are left out of the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import SpikingBrainConfig
from .layers import SwiGLU

__all__ = ["RouterStats", "MoEFeedForward", "load_balancing_loss"]


@dataclass
class RouterStats:
    """Routing statistics of one MoE layer over the (real) tokens of one forward."""

    tokens_per_expert: torch.Tensor  # [N] int64: token-to-expert assignments per expert
    score_sum: torch.Tensor  # [N] fp32: sum over tokens of the normalised router scores (carries gradients)
    num_tokens: int  # tokens counted
    top_k: int  # assignments per token

    def __add__(self, other: "RouterStats") -> "RouterStats":
        return RouterStats(
            self.tokens_per_expert + other.tokens_per_expert,
            self.score_sum + other.score_sum,
            self.num_tokens + other.num_tokens,
            self.top_k,
        )

    def load_balancing_loss(self) -> torch.Tensor:
        """``N * sum_i f_i * P_i`` for these statistics (0 without tokens)."""
        if not self.num_tokens:
            return self.score_sum.new_zeros(())
        f = self.tokens_per_expert.to(self.score_sum.dtype) / (self.num_tokens * self.top_k)
        P = self.score_sum / self.num_tokens
        return f.numel() * (f * P).sum()


def load_balancing_loss(stats: list[RouterStats]) -> torch.Tensor | None:
    """Mean over MoE layers of their load-balancing losses (None without MoE layers)."""
    if not stats:
        return None
    return torch.stack([s.load_balancing_loss() for s in stats]).mean()


class MoEFeedForward(nn.Module):
    """Routed SwiGLU experts with top-k routing plus always-on shared experts (dropless)."""

    def __init__(self, config: SpikingBrainConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.router_kind, self.norm_topk_prob = config.moe_router, config.norm_topk_prob
        self.router = nn.Linear(hidden, config.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden, inner) for _ in range(config.num_experts))
        self.shared_experts = nn.ModuleList(SwiGLU(hidden, inner) for _ in range(config.num_shared_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router scores ``[T, N]`` (fp32), the chosen experts ``[T, k]`` and their weights ``[T, k]``."""
        logits = self.router(x).float()
        scores = logits.softmax(-1) if self.router_kind == "softmax" else logits.sigmoid()
        weights, experts = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return scores, experts, weights

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats]:
        """Outputs like ``x`` ``[..., hidden]`` and the router statistics (``token_mask``: true = counted)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores, experts, weights = self.route(x)
        flat = experts.reshape(-1)  # [T*k]: the expert of every token copy
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        token = order // self.top_k  # token of every sorted copy
        groups = x[token].split(counts.tolist())
        outputs = [expert(group) for expert, group in zip(self.experts, groups) if group.shape[0]]
        y = x.new_zeros(x.shape)
        if outputs:
            routed = torch.cat(outputs) * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
            y = y.index_add(0, token, routed)
        for shared in self.shared_experts:
            y = y + shared(x)
        return y.view(shape), self._stats(scores, experts, counts, token_mask)

    def _stats(self, scores, experts, counts, token_mask: torch.Tensor | None) -> RouterStats:
        if self.router_kind == "sigmoid":
            scores = scores / scores.sum(-1, keepdim=True)
        if token_mask is not None:
            keep = token_mask.reshape(-1)
            scores = scores[keep]
            counts = torch.bincount(experts[keep].reshape(-1), minlength=self.num_experts)
        return RouterStats(counts, scores.sum(0), scores.shape[0], self.top_k)
