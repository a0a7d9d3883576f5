"""Model facts without loading weights: layers, parameters, state size against a Transformer's KV cache."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from transformers import AutoConfig

from .config import SpikingBrainConfig
from .hf_import import config_from_transformer
from .loading import read_source_config, resolve_folder
from .modeling import SpikingBrainForCausalLM

__all__ = ["state_bytes", "kv_cache_bytes", "model_info"]


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
    folder = resolve_folder(ref)
    raw, native = read_source_config(folder)
    config = AutoConfig.from_pretrained(folder) if native else config_from_transformer(raw, path=str(folder / "config.json"))
    source_type = raw["model_type"]
    with torch.device("meta"):
        model = SpikingBrainForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    ours, theirs = state_bytes(config, length), kv_cache_bytes(config, length)
    return {
        "model": str(ref),
        "model_type": source_type,
        "loaded_as": "SpikingBrain" if native else "SpikingBrain with all layers full (imported)",
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
