"""Low-rank adapters (LoRA) on a model's linear projections: add, list, merge."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LoRALinear", "add_lora", "lora_parameters", "merge_lora", "DEFAULT_LORA_TARGETS"]

#: Projection names that receive adapters by default: attention and MLP projections.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x Aᵀ Bᵀ`` with the base layer frozen; B starts at zero, so nothing changes at first."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        #: the base product as int8 in training steps (``train.int8_products.int8_frozen_products``), or None: fp32
        self.int8_base = None

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that reads ``.weight`` sees the frozen matrix)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base(x) if self.int8_base is None or not torch.is_grad_enabled() else self.int8_base(x)
        return base + nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_LORA_TARGETS) -> list[str]:
    """Wrap every ``nn.Linear`` whose attribute name is in ``targets`` with an adapter; returns the wrapped names."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    alpha = 2.0 * rank if alpha is None else alpha
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named any of {list(targets)} in the model; check lora targets")
    return wrapped


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters of a model by name."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))}


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and remove the wrappers; returns how many were merged."""
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, child_name, child.merged())
                count += 1
    return count
