"""Load Llama / Qwen2 / Mistral checkpoints as SpikingBrain models (every projection reused by name)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_state_dict, read_config, read_state_dict
from .config import SpikingBrainConfig
from .mixers import GatedLinearAttention
from .modeling import SpikingBrainForCausalLM

__all__ = ["TRANSFORMER_FAMILIES", "config_from_transformer", "map_transformer_weights", "load_transformer"]

#: Source model types whose checkpoints map onto SpikingBrain blocks.
TRANSFORMER_FAMILIES = ("llama", "qwen2", "mistral")

_RENAMES = [
    (r"^model\.embed_tokens\.", "model.embeddings."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.mlp_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"model.layers.\1.attn."),
]
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _rope_theta(src: dict, path: str) -> float:
    params = src.get("rope_parameters") or src.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{path}: rope type {rope_type!r} is not supported yet; only default RoPE is")
    theta = params.get("rope_theta", src.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{path}: no rope_theta in rope_parameters or at top level; add it")
    return float(theta)


def config_from_transformer(src: dict, layer_mixers: list[str] | None = None, path: str = "config.json") -> SpikingBrainConfig:
    """SpikingBrain config with the shapes of a Llama/Qwen2/Mistral ``config.json`` dict.

    Without ``layer_mixers`` every layer is ``full`` (or ``swa`` with the source's window when
    the source uses sliding-window attention, e.g. Mistral-7B-v0.1), so outputs are unchanged.
    """
    family = src.get("model_type")
    if family not in TRANSFORMER_FAMILIES:
        raise CheckpointError(f"{path}: model_type {family!r} cannot be imported; supported: {list(TRANSFORMER_FAMILIES)}")
    if src.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{path}: hidden_act {src['hidden_act']!r}; only SwiGLU (silu) MLPs can be imported")
    if src.get("mlp_bias"):
        raise CheckpointError(f"{path}: mlp_bias=true is not supported (SpikingBrain MLPs have no biases)")
    if family == "llama" and src.get("attention_bias"):
        raise CheckpointError(f"{path}: attention_bias=true puts a bias on o_proj, which SpikingBrain attention lacks")
    if family == "qwen2" and src.get("use_sliding_window"):
        raise CheckpointError(f"{path}: Qwen2 use_sliding_window=true (per-layer windows) is not supported")
    layers = src["num_hidden_layers"]
    window = src.get("sliding_window") if family == "mistral" else None
    default_mixers = ["swa" if window else "full"] * layers
    heads = src["num_attention_heads"]
    return SpikingBrainConfig(
        vocab_size=src["vocab_size"],
        hidden_size=src["hidden_size"],
        intermediate_size=src["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=src.get("num_key_value_heads") or heads,
        head_dim=src.get("head_dim") or src["hidden_size"] // heads,
        layer_mixers=layer_mixers if layer_mixers is not None else default_mixers,
        sliding_window=window or 4096,
        window_semantics="sdpa" if window else "flash",  # transformers' windows hold W keys, the query included
        rope_theta=_rope_theta(src, path),
        attention_bias=family == "qwen2",
        rms_norm_eps=src.get("rms_norm_eps", 1e-6),
        max_position_embeddings=src.get("max_position_embeddings", 131072),
        tie_word_embeddings=bool(src.get("tie_word_embeddings", False)),
        pad_token_id=src.get("pad_token_id"),
        bos_token_id=src.get("bos_token_id"),
        eos_token_id=src.get("eos_token_id"),
    )


def map_transformer_weights(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename Llama-family tensors to SpikingBrain names; returns ``(mapped, dropped_names)``."""
    mapped, dropped = {}, []
    for name, tensor in state.items():
        if _DROPPED.search(name):
            dropped.append(name)
            continue
        new = name
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        mapped[new] = tensor
    return mapped, dropped


def load_transformer(
    folder: str | Path, layer_mixers: list[str] | None = None, dtype: torch.dtype = torch.float32
) -> SpikingBrainForCausalLM:
    """A SpikingBrain model holding the weights of a Llama/Qwen2/Mistral folder.

    Parameters that the source lacks (GLA gates and output norms when ``layer_mixers`` has
    ``gla`` layers) are freshly initialised; everything else must match exactly.
    """
    folder = Path(folder)
    config = config_from_transformer(read_config(folder), layer_mixers, str(folder / "config.json"))
    state, _ = map_transformer_weights(read_state_dict(folder, dtype))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = SpikingBrainForCausalLM(config)
    expected = {n: p.shape for n, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    new_params = {n for n in expected if ".attn.gk_proj." in n or ".attn.g_norm." in n}
    check_state_dict(str(folder), {n: t.shape for n, t in state.items()}, expected, allowed_missing=new_params)
    model.load_state_dict(state, strict=False, assign=True)
    _materialize_new_parameters(model, dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _materialize_new_parameters(model: SpikingBrainForCausalLM, dtype: torch.dtype) -> None:
    """Allocate and initialise the parameters still on the meta device (new mixer parameters)."""
    for module in list(model.modules()):
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False).to(dtype)
            model._init_weights(module)
    for module in model.modules():
        if isinstance(module, GatedLinearAttention):
            model._init_weights(module)  # the gate's own initialisation rule
