"""Model facts without loading weights: layers, parameters, state size against a Transformer's KV cache."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from transformers import AutoConfig

from .checkpoint import CheckpointError, read_config
from .config import SpikingBrainConfig
from .hf_import import TRANSFORMER_FAMILIES, config_from_transformer
from .loading import NATIVE_TYPES, resolve_folder
from .modeling import SpikingBrainForCausalLM

__all__ = ["load_config", "state_bytes", "kv_cache_bytes", "model_info"]


def load_config(ref: str | Path) -> SpikingBrainConfig:
    """The SpikingBrain config of a model reference (Llama-family folders as all-full layers)."""
    folder = resolve_folder(ref)
    raw = read_config(folder)
    if raw["model_type"] in NATIVE_TYPES:
        return AutoConfig.from_pretrained(folder)
    if raw["model_type"] in TRANSFORMER_FAMILIES:
        return config_from_transformer(raw, path=str(folder / "config.json"))
    raise CheckpointError(f"{folder / 'config.json'}: model_type {raw['model_type']!r} is not supported")


def state_bytes(config: SpikingBrainConfig, length: int, kv_bytes_per_value: int = 4) -> int:
    """Inference-state bytes of one sequence of ``length`` tokens (fp32 GLA states)."""
    D, Hkv = config.head_dim, config.num_key_value_heads
    total = 0
    for mixer in config.layer_mixers:
        if mixer == "gla":
            total += Hkv * D * D * 4
        elif mixer == "swa":
            total += 2 * min(length, config.attention_window) * Hkv * D * kv_bytes_per_value
        else:
            total += 2 * length * Hkv * D * kv_bytes_per_value
    return total


def kv_cache_bytes(config: SpikingBrainConfig, length: int, kv_bytes_per_value: int = 4) -> int:
    """KV-cache bytes of a Transformer with the same layers and heads at ``length`` tokens."""
    return 2 * config.num_hidden_layers * length * config.num_key_value_heads * config.head_dim * kv_bytes_per_value


def model_info(ref: str | Path, length: int = 131072) -> dict:
    """A summary of a model for ``spikingbrain info``."""
    config = load_config(ref)
    source_type = read_config(resolve_folder(ref))["model_type"]
    with torch.device("meta"):
        model = SpikingBrainForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    ours, theirs = state_bytes(config, length), kv_cache_bytes(config, length)
    return {
        "model": str(ref),
        "model_type": source_type,
        "loaded_as": "SpikingBrain" if source_type in NATIVE_TYPES else "SpikingBrain with all layers full (imported)",
        "layers": config.num_hidden_layers,
        "layer_mixers": dict(Counter(config.layer_mixers)),
        "layer_layout": "".join({"gla": "L", "swa": "S", "full": "F"}[m] for m in config.layer_mixers),
        "hidden_size": config.hidden_size,
        "heads": f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value, head_dim {config.head_dim}",
        "sliding_window": config.sliding_window,
        "parameters": params,
        "length": length,
        "state_bytes_per_sequence": ours,
        "transformer_kv_cache_bytes": theirs,
        "state_vs_kv_ratio": round(ours / theirs, 6),
    }
