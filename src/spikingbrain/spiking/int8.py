"""W8ASpike weights: symmetric INT8 per group of input channels, with clipping calibrated on sample inputs.

A weight row is cut into groups of ``group_size`` input channels (the last group may be
shorter); each group has one scale ``s = clip · max|w| / 127`` and stores ``round(w / s)`` in
[-127, 127]. ``Int8Linear`` keeps the codes (int8) and scales (fp32) and multiplies with the
dequantised weight; with spiking inputs the product equals ``V_th · Σ_g s_g (W_g · counts_g)``,
integer arithmetic inside each group. Calibration picks, per row and group, the clip ratio that
minimises the output error ``e H eᵀ`` where ``H = XᵀX`` is the Gram matrix of the layer's
inputs on calibration text (the inputs as the layer sees them: spiked when spiking is on).
The settings live in ``config.weight_quantization`` so a saved INT8 model reloads as INT8.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .apply import DEFAULT_TARGETS, current_spiking, spikify, spiking_linears

__all__ = [
    "CLIP_GRID",
    "Int8Linear",
    "quantize_groups",
    "dequantize_groups",
    "clip_ratios",
    "weight_quantization_settings",
    "prepare_int8_layers",
    "quantize_model_int8",
    "fake_quantize_int8",
]

#: Clip ratios tried by calibration (1.0 = no clipping, the round-to-nearest default).
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, G, group_size]`` view of the rows, the last group zero-padded."""
    out, inp = weight.shape
    count = -(-inp // group_size)
    padded = F.pad(weight, (0, count * group_size - inp))
    return padded.view(out, count, group_size)


def quantize_groups(weight: torch.Tensor, group_size: int = 128, clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [out, in], scales fp32 [out, groups])`` of a 2-D weight; ``clip`` ``[out, groups]`` scales the range."""
    if weight.dim() != 2:
        raise ValueError(f"INT8 weight quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    groups = _groups(weight.detach().float(), group_size)
    amax = groups.abs().amax(-1)
    if clip is not None:
        amax = amax * clip
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    codes = torch.round(groups / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.view(weight.shape[0], -1)[:, : weight.shape[1]].contiguous(), scales


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight ``codes · scale`` of each group."""
    return codes.float() * scales.repeat_interleave(group_size, dim=1)[:, : codes.shape[1]]


def clip_ratios(weight: torch.Tensor, gram: torch.Tensor, group_size: int = 128, grid: Iterable[float] = CLIP_GRID) -> torch.Tensor:
    """Per row and group, the clip ratio in ``grid`` with the least output error ``e H_gg eᵀ`` (``gram`` = ``XᵀX``)."""
    weight = weight.detach().float()
    inp = weight.shape[1]
    if gram.shape != (inp, inp):
        raise ValueError(f"Gram matrix has shape {tuple(gram.shape)}, expected ({inp}, {inp}) for this weight")
    groups = _groups(weight, group_size)
    count = groups.shape[1]
    padded = F.pad(gram.float(), (0, count * group_size - inp, 0, count * group_size - inp))
    blocks = torch.stack([padded[g * group_size : (g + 1) * group_size, g * group_size : (g + 1) * group_size] for g in range(count)])
    best_error, best_clip = None, None
    for ratio in grid:
        clip = torch.full(groups.shape[:2], float(ratio))
        codes, scales = quantize_groups(weight, group_size, clip)
        error = _groups(dequantize_groups(codes, scales, group_size) - weight, group_size)
        cost = torch.einsum("ogi,gij,ogj->og", error, blocks, error)
        if best_error is None:
            best_error, best_clip = cost, clip
        else:
            better = cost < best_error
            best_error, best_clip = torch.where(better, cost, best_error), torch.where(better, clip, best_clip)
    return best_clip


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as INT8 codes with one fp32 scale per group of input channels."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 128):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = -(-in_features // group_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, clip: torch.Tensor | None = None) -> "Int8Linear":
        """Quantize a dense linear layer (optionally with calibrated clip ratios)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        codes, scales = quantize_groups(linear.weight, group_size, clip)
        layer.weight.copy_(codes)
        layer.weight_scale.copy_(scales)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as fp32."""
        return dequantize_groups(self.weight, self.weight_scale, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 groups of {self.group_size}"


def weight_quantization_settings(group_size: int = 128, targets: Iterable[str] = DEFAULT_TARGETS) -> dict:
    """The validated ``config.weight_quantization`` dictionary."""
    if int(group_size) != group_size or group_size < 1:
        raise ValueError(f"weight_quantization group_size must be a positive integer (W8ASpike uses 128), got {group_size}")
    targets = list(targets)
    if not targets:
        raise ValueError(f"weight_quantization targets must name projections like {list(DEFAULT_TARGETS)}")
    return {"bits": 8, "group_size": int(group_size), "targets": targets}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prepare_int8_layers(model: nn.Module, settings: dict) -> None:
    """Swap the target linear layers for empty ``Int8Linear`` ones, so INT8 weights can be loaded into them."""
    for name, linear in spiking_linears(model, settings["targets"]).items():
        if isinstance(linear, nn.Linear):
            _replace(model, name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, settings["group_size"]))


def quantize_model_int8(
    model: nn.Module,
    group_size: int = 128,
    targets: Iterable[str] = DEFAULT_TARGETS,
    calibration: Iterable[torch.Tensor] | None = None,
    grid: Iterable[float] = CLIP_GRID,
) -> dict:
    """Quantize the target projections of ``model`` to INT8 in place; returns ``{name: clip ratios}``.

    ``calibration`` yields input-id batches; the model is run on them to collect each layer's
    input Gram matrix, and the clip ratios are chosen to minimise the output error. Without it,
    plain round-to-nearest (clip 1.0).
    """
    settings = weight_quantization_settings(group_size, targets)
    linears = {n: m for n, m in spiking_linears(model, settings["targets"]).items() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"no dense projection of this model matches {settings['targets']} (already INT8?)")
    grams: dict[str, torch.Tensor] = {}
    if calibration is not None:
        grams = _input_grams(model, linears, calibration)
    clips = {}
    for name, linear in linears.items():
        clip = clip_ratios(linear.weight, grams[name], group_size, grid) if name in grams else None
        _replace(model, name, Int8Linear.from_linear(linear, group_size, clip))
        clips[name] = clip
    spiking = current_spiking(model)
    if spiking:  # the spiking hooks sat on the replaced layers
        spikify(model, **spiking)
    if hasattr(model, "config"):
        model.config.weight_quantization = settings
    return clips


def _input_grams(model: nn.Module, linears: dict[str, nn.Linear], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``XᵀX`` of each layer's input over the calibration batches (fp64)."""
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}
    last: list = [None, None]  # the previous input and its XᵀX: q/k/v (and gate/up) read the same input

    def collect(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if last[0] is None or last[0].shape != x.shape or not torch.equal(last[0], x):
                last[:] = x, (x.T @ x).double()
            grams[name] += last[1]

        return hook

    # registered after any spiking hooks, so they see the inputs the layer really gets
    handles = [m.register_forward_pre_hook(collect(n)) for n, m in linears.items()]
    seen = 0
    try:
        with torch.inference_mode():
            for ids in batches:
                model(ids, use_cache=False)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError("calibration gave no batches; give at least one sample of text")
    return grams


def fake_quantize_int8(x: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 round trip over the last dimension (one scale per vector): W8ASpike's K/V quantization."""
    amax = x.detach().abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x / scale).clamp(-127, 127) * scale
