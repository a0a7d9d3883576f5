"""INT8 products for the frozen weights of conversion training (as SwitchBack does for CLIP): an option, off by default.

A LoRA step multiplies every frozen projection weight twice: ``x Wᵀ`` forward and ``g W`` for the input's gradient
(no weight gradient: the weight is frozen). With ``int8_frozen_products: true`` both run as ``torch._int_mm``
(int8 x int8, int32 sums): ``x`` and ``g`` quantized per row (``max|row| / 127``, rounded half up), ``W`` per output
channel for the forward and per input channel for the backward, then scaled back in fp32. The quantizing and the
scaling are each one compiled pass (``spiking.int8.Fused``). So the student trains on W8A8 numbers: its forward is
the W8A8 simulation of the same layer (tested), its input gradients are those of the int8-rounded ``g`` and ``W``,
while the LoRA adapters (and everything else) stay fp32. Products outside a training step (evaluation, generation)
keep the fp32 weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..ops.int8 import int8_matmul_available
from ..spiking.int8 import Fused, per_token_int8_scale, quantize_groups
from ..spiking.neuron import round_half_up

__all__ = ["FrozenInt8Weight", "frozen_int8_linear", "int8_frozen_products"]


class FrozenInt8Weight(NamedTuple):
    """A frozen ``W`` ``[N, K]`` in the two int8 layouts ``torch._int_mm`` takes: ``forward_codes`` ``[K, N]`` with one
    scale per output channel (``forward_scales`` ``[N]``), ``backward_codes`` ``[N, K]`` with one scale per input
    channel (``backward_scales`` ``[K]``); and which weight tensor, at which version, it was made from."""

    forward_codes: torch.Tensor
    forward_scales: torch.Tensor
    backward_codes: torch.Tensor
    backward_scales: torch.Tensor
    source: tuple


def _source_of(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight._version, tuple(weight.shape)


def frozen_int8_weight(weight: torch.Tensor) -> FrozenInt8Weight:
    """Both int8 layouts of a frozen ``weight`` ``[N, K]``, round to nearest, no clipping."""
    w = weight.detach().float()
    codes, scales = quantize_groups(w, 0)  # per output channel
    codes_in, scales_in = quantize_groups(w.t(), 0)  # per input channel
    return FrozenInt8Weight(codes.t().contiguous(), scales.reshape(-1).contiguous(), codes_in.t().contiguous(),
                            scales_in.reshape(-1).contiguous(), _source_of(weight))


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 codes ``round_half_up(x / s)`` and ``s = max|row| / 127`` ``[M, 1]`` (W8A8's per-token scale)."""
    scale = per_token_int8_scale(x)
    return round_half_up(x / scale).clamp(-127, 127).to(torch.int8), scale


def _scale_back(products: torch.Tensor, row_scales: torch.Tensor, column_scales: torch.Tensor) -> torch.Tensor:
    return products.float() * row_scales * column_scales


_fused_quantize_rows, _fused_scale_back = Fused(_quantize_rows), Fused(_scale_back)


class _FrozenInt8Product(torch.autograd.Function):
    """``x Wᵀ`` forward and ``g W`` backward, both as int8 products (module docstring); no gradient for ``W``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: FrozenInt8Weight) -> torch.Tensor:
        codes, scales = _fused_quantize_rows(x.detach().reshape(-1, x.shape[-1]).float())
        y = _fused_scale_back(torch._int_mm(codes, weight.forward_codes), scales, weight.forward_scales)
        ctx.weight, ctx.dtype = weight, x.dtype
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, scales = _fused_quantize_rows(grad.reshape(-1, grad.shape[-1]).float())
        gx = _fused_scale_back(torch._int_mm(codes, ctx.weight.backward_codes), scales, ctx.weight.backward_scales)
        return gx.to(ctx.dtype).view(*grad.shape[:-1], gx.shape[-1]), None


def frozen_int8_linear(x: torch.Tensor, weight: FrozenInt8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` through int8 products forward and backward (the weight and bias frozen)."""
    y = _FrozenInt8Product.apply(x, weight)
    return y if bias is None else y + bias.detach()


class _Int8Base:
    """What a ``LoRALinear`` holds as ``int8_base``: its frozen weight's int8 layouts, made again when the weight changes."""

    def __init__(self, linear: nn.Linear):
        self.linear, self.weight = linear, frozen_int8_weight(linear.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.source != _source_of(self.linear.weight):
            self.weight = frozen_int8_weight(self.linear.weight)
        return frozen_int8_linear(x, self.weight, self.linear.bias)


def int8_frozen_products(model: nn.Module, enabled: bool) -> int:
    """Turn the int8 products of every LoRA layer's frozen base weight on or off for training steps (on CPU, where
    ``torch._int_mm`` works); returns how many layers changed. Evaluation and generation keep the fp32 products."""
    from .lora import LoRALinear

    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if enabled and layers and not int8_matmul_available(layers[0].base.weight.device):
        raise ValueError(f"int8_frozen_products needs torch._int_mm, which this torch lacks on {layers[0].base.weight.device}; "
                         "set int8_frozen_products: false")
    for layer in layers:
        layer.int8_base = _Int8Base(layer.base) if enabled else None
    return len(layers)
