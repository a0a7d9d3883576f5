"""Normalisation and feed-forward layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["RMSNorm", "SwiGLU"]


def _plain_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` without hooks (its own or global): nothing else sees its output."""
    from torch.nn.modules import module as module_mod

    hooks = [module._forward_hooks, module._forward_pre_hooks]
    hooks += [getattr(module_mod, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")]
    return type(module) is nn.Linear and not any(hooks)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """Gated MLP ``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() or not (_plain_linear(self.gate_proj) and _plain_linear(self.up_proj)):
            return self.down_proj(F.silu(gate) * up)
        # Inference on plain linears (no hook can hold their outputs): the same arithmetic with the
        # activation and the product in place, saving two [tokens, intermediate] temporaries.
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))
