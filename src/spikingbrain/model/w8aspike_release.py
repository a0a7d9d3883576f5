"""Reading the released W8ASpike layout (``Abel2076/SpikingBrain-7B-W8ASpike``) into our INT8 spiking model.

Derived from the release's code (BICLab/SpikingBrain-7B, ``W8ASpike/``): ``config.json`` is the
BF16 release's (``model_type: gla_swa``). Every attention and MLP projection is a ``QuantLinear``
whose file holds its floating ``weight``, its ``bias`` where it has one, and a buffer
``weight_quantizer.scales`` of shape ``[out, in / 128, 1]`` (symmetric INT8 per group of 128 input
channels, no zero points). At run time the release multiplies with ``round(weight / scale) · scale``
(rounded in the file's dtype, not clipped to int8) and spikes the layer's input with k = 3; the SWA
layers also spike the query after RoPE and fake-quantise K/V to INT8. The GLA gate ``gk_proj`` is
one full-rank ``QuantLinear`` with a bias (our ``gla_gate_rank: 0``). The MLP's ``down_proj`` is stored
as a ``QuantLinear`` too, but the release's forward multiplies its raw weight with its unspiked
input: by default it loads as a dense linear with that raw weight (its scales unused) and its input
stays dense; ``spike_every_projection=True`` quantises and spikes it like the others, as the
report's text says. A layer with a code outside [-128, 127] (the release does not clip) stays a
dense linear holding exactly ``round(weight / scale) · scale``, run by simulation.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..spiking.apply import DEFAULT_TARGETS, spiking_settings
from ..spiking.int8 import weight_quantization_settings
from .checkpoint import CheckpointError, read_config, read_shapes, read_state_dict
from .config import SpikingBrainConfig
from .modeling import SpikingBrainForCausalLM
from .official import GLAswaConfig

__all__ = ["SCALES_SUFFIX", "RELEASE_GROUP_SIZE", "is_w8aspike_release", "release_targets", "load_w8aspike_release"]

#: The name ending of a ``QuantLinear``'s scale buffer in the release's files.
SCALES_SUFFIX = ".weight_quantizer.scales"
#: ``QuantLinear``'s default group (the release never passes another).
RELEASE_GROUP_SIZE = 128


def is_w8aspike_release(folder: str | Path) -> bool:
    """Whether a folder's safetensors hold ``QuantLinear`` scale buffers (reads headers only)."""
    return any(name.endswith(SCALES_SUFFIX) for name in read_shapes(folder))


def release_targets(spike_every_projection: bool = False) -> list[str]:
    """Projections that spike and hold INT8 weights: the released code's (all but ``down_proj``), or every one."""
    return list(DEFAULT_TARGETS) if spike_every_projection else [t for t in DEFAULT_TARGETS if t != "down_proj"]


def _release_codes(path: str, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``round(weight / scale)`` per group, in the file's dtype as the release computes it (not clipped)."""
    out, inp = weight.shape
    if scales.dim() != 3 or scales.shape[0] != out or scales.shape[2] != 1 or scales.shape[1] * RELEASE_GROUP_SIZE != inp:
        raise CheckpointError(
            f"{path}{SCALES_SUFFIX}: shape {tuple(scales.shape)}, expected ({out}, {inp // RELEASE_GROUP_SIZE}, 1) "
            f"for a weight of shape {tuple(weight.shape)} (groups of {RELEASE_GROUP_SIZE}); re-export the folder"
        )
    dtype = torch.promote_types(weight.dtype, scales.dtype)
    groups = weight.to(dtype).view(out, -1, RELEASE_GROUP_SIZE)
    return torch.round(groups / scales.to(dtype)).view(out, inp).float()


def load_w8aspike_release(folder: str | Path, dtype: torch.dtype = torch.float32, spike_every_projection: bool = False) -> SpikingBrainForCausalLM:
    """A released W8ASpike folder as our model (eval mode): INT8 spiking projections, spiked SWA query, INT8 K/V."""
    folder = Path(folder)
    raw = read_config(folder)
    official = GLAswaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")})
    state = read_state_dict(folder)
    targets = release_targets(spike_every_projection)
    dense = []
    for key in sorted(k for k in state if k.endswith(SCALES_SUFFIX)):
        name = key.removesuffix(SCALES_SUFFIX)
        scales = state.pop(key)
        if name.rsplit(".", 1)[-1] not in targets:
            continue  # down_proj by default: the release uses its raw weight
        if f"{name}.weight" not in state:
            raise CheckpointError(f"{folder}: {key} has no {name}.weight beside it; the folder is incomplete")
        codes = _release_codes(f"{folder}: {name}", state[f"{name}.weight"], scales)
        if codes.min() < -128 or codes.max() > 127:
            dense.append(name)
            state[f"{name}.weight"] = codes * scales.float().repeat_interleave(RELEASE_GROUP_SIZE, 1).squeeze(-1)
        else:
            state[f"{name}.weight"] = codes.to(torch.int8)
            state[f"{name}.weight_scale"] = scales.float().squeeze(-1)
    if dense:
        warnings.warn(
            f"{folder}: {len(dense)} projections have weight codes outside [-128, 127] (the release does not clip); "
            "they stay dense with the release's rounded weight and run without integer matmuls",
            stacklevel=2,
        )
    fields = SpikingBrainConfig.to_dict(official)
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    fields.update(
        gla_gate_rank=0,
        weight_quantization=weight_quantization_settings(RELEASE_GROUP_SIZE, targets, dense),
        spiking=spiking_settings(3.0, targets, spike_query=True, int8_kv=True),
    )
    model = SpikingBrainForCausalLM(SpikingBrainConfig(**fields)).to(dtype)
    problems = sorted(set(model.state_dict()) ^ set(state))
    if problems:
        raise CheckpointError(
            f"{folder}: tensors do not match the W8ASpike layout of config.json: {problems[:8]} ({len(problems)} in all); "
            "check that config.json belongs to these weights"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{folder}: weights do not match config.json ({err}); check that config.json belongs to these weights") from err
    return model.eval()
