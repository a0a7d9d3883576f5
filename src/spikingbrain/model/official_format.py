"""Writing the released SpikingBrain-7B layout (``model_type: gla_swa``): its config.json fields and sharded safetensors.

Parameter names of the release are the names our model uses, so only ``config.json`` differs
(see :mod:`spikingbrain.model.official` for the fields). :meth:`SpikingBrainForCausalLM.save_pretrained`
with ``official_format=True`` and the ``gla_swa`` config class both build on this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

from .config import SpikingBrainConfig

__all__ = ["OFFICIAL_MODEL_TYPE", "OFFICIAL_ARCHITECTURE", "official_config_dict", "save_official"]

#: ``model_type`` and architecture of the release's config.json.
OFFICIAL_MODEL_TYPE = "gla_swa"
OFFICIAL_ARCHITECTURE = "GLAswaForCausalLM"


def official_config_dict(config: SpikingBrainConfig) -> dict:
    """The release's ``config.json`` fields for a GLA/SWA ``config``; raises if it has no official form."""
    problems = []
    if any(m not in ("gla", "swa") for m in config.layer_mixers):
        problems.append(f"layer_mixers {config.layer_mixers} (only gla and swa exist in the official format)")
    if config.gla_feature_map != "relu":
        problems.append(f"gla_feature_map={config.gla_feature_map!r} (official: relu)")
    if config.gla_gate != "lowrank" or config.gla_gate_rank == 0:
        problems.append(f"gla_gate={config.gla_gate!r} of rank {config.gla_gate_rank} (official: lowrank, rank >= 1)")
    if config.gla_update != "additive":
        problems.append(f"gla_update={config.gla_update!r} (official: additive GLA)")
    if config.num_sink_tokens:
        problems.append(f"num_sink_tokens={config.num_sink_tokens} (the official format has no sinks)")
    if config.num_experts:
        problems.append(f"num_experts={config.num_experts} (the official format has dense FFNs only)")
    if not config.gla_output_norm:
        problems.append("gla_output_norm=false (official: per-head RMSNorm)")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim {config.head_dim} x heads {config.num_attention_heads} != hidden_size {config.hidden_size}")
    if problems:
        raise ValueError("this model cannot be written in the official gla_swa format: " + "; ".join(problems))
    return {
        "architectures": [OFFICIAL_ARCHITECTURE],
        "model_type": OFFICIAL_MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "swish",
        "max_position_embeddings": config.max_position_embeddings,
        "sliding_window": config.attention_window,
        "norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "attn_layers": [i for i, m in enumerate(config.layer_mixers) if m == "swa"],
        "gate_low_rank_dim": config.gla_gate_rank,
        "gate_logit_normalizer": config.gla_gate_normalizer,
        "attn_mode": "chunk",
        "use_short_conv": False,
        "conv_size": 4,
        "elementwise_affine": True,
        "fuse_cross_entropy": True,
        "attention_dropout": 0.0,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": False,
        "torch_dtype": str(getattr(config, "dtype", None) or "float32").replace("torch.", ""),
    }


def save_official(model: nn.Module, folder: str | Path, max_shard_size: str | int = "5GB") -> Path:
    """Write ``model`` in the release layout: official config.json, sharded safetensors and an index."""
    folder = Path(folder)
    config = official_config_dict(model.config)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"].clone()  # the release never ties embeddings
    for i in range(model.config.num_hidden_layers):  # the release has q/k/v biases everywhere
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{i}.attn.{proj}"
            if f"{name}.bias" not in state:
                weight = state[f"{name}.weight"]
                state[f"{name}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    folder.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata.get("total_size")}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
