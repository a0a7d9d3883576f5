"""Model facts without loading weights: layers, parameters (total and active), state size against a Transformer's KV cache."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from transformers import AutoConfig

from .config import SpikingBrainConfig
from .hf_import import config_from_transformer
from .loading import read_source_config, resolve_folder
from .modeling import SpikingBrainForCausalLM
from .moe import MoEFeedForward
from .presets import preset_config

__all__ = ["state_bytes", "kv_cache_bytes", "parameter_counts", "config_info", "model_info", "preset_info", "LAYOUT_LETTERS"]

#: One letter per mixer in ``layer_layout``: upper case for one mixer, lower case for GLA in parallel with it.
LAYOUT_LETTERS = {"gla": "L", "swa": "S", "full": "F", "parallel-swa": "s", "parallel-full": "f"}


def state_bytes(config: SpikingBrainConfig, length: int, kv_bytes_per_value: int = 4) -> int:
    """Inference-state bytes of one sequence of ``length`` tokens (fp32 GLA states, sink keys/values and
    the kept first positions included)."""
    D, Hkv = config.head_dim, config.num_key_value_heads
    kv_per_token = 2 * Hkv * D * kv_bytes_per_value
    total = 0
    for mixer in config.layer_mixers:
        if mixer == "gla" or mixer.startswith("parallel-"):
            total += Hkv * D * D * 4
        if mixer.endswith("swa"):
            total += min(length, config.window_cache_positions) * kv_per_token
        elif mixer.endswith("full"):
            total += length * kv_per_token
        if mixer != "gla":
            total += config.num_sink_tokens * kv_per_token
    return total


def kv_cache_bytes(config: SpikingBrainConfig, length: int, kv_bytes_per_value: int = 4) -> int:
    """KV-cache bytes of a Transformer with the same layers and heads at ``length`` tokens."""
    return 2 * config.num_hidden_layers * length * config.num_key_value_heads * config.head_dim * kv_bytes_per_value


def parameter_counts(config: SpikingBrainConfig) -> tuple[int, int]:
    """Total parameters and parameters active per token (all but the routed experts a token skips),
    counted on the meta device without allocating weights."""
    with torch.device("meta"):
        model = SpikingBrainForCausalLM(config)
    total = active = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            routed = sum(p.numel() for p in module.experts.parameters())
            active -= routed // module.num_experts * (module.num_experts - module.top_k)
    return total, active


def config_info(config: SpikingBrainConfig, length: int = 131072) -> dict:
    """Layers, shapes, parameter counts and state size of ``config`` (no weights allocated)."""
    total, active = parameter_counts(config)
    ours, theirs = state_bytes(config, length), kv_cache_bytes(config, length)
    return {
        "layers": config.num_hidden_layers,
        "layer_mixers": dict(Counter(config.layer_mixers)),
        "layer_layout": "".join(LAYOUT_LETTERS[m] for m in config.layer_mixers),
        "hidden_size": config.hidden_size,
        "heads": f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value, head_dim {config.head_dim}",
        "sliding_window": config.sliding_window,
        "sink_tokens": config.num_sink_tokens,
        "experts": (
            f"{config.num_experts} routed (top-{config.num_experts_per_tok}) + {config.num_shared_experts} shared, "
            f"MoE layers {config.moe_layers}"
            if config.num_experts
            else "none (dense FFN)"
        ),
        "parameters": total,
        "active_parameters": active,
        "length": length,
        "state_bytes_per_sequence": ours,
        "transformer_kv_cache_bytes": theirs,
        "state_vs_kv_ratio": round(ours / theirs, 6),
    }


def model_info(ref: str | Path, length: int = 131072) -> dict:
    """A summary of a model folder for ``spikingbrain info --model``."""
    folder = resolve_folder(ref)
    raw, native = read_source_config(folder)
    config = AutoConfig.from_pretrained(folder) if native else config_from_transformer(raw, path=str(folder / "config.json"))
    return {
        "model": str(ref),
        "model_type": raw["model_type"],
        "loaded_as": "SpikingBrain" if native else "SpikingBrain with all layers full (imported)",
        **config_info(config, length),
    }


def preset_info(name: str, length: int = 131072) -> dict:
    """A summary of a named preset for ``spikingbrain info --preset``."""
    return {"preset": name, **config_info(preset_config(name), length)}
