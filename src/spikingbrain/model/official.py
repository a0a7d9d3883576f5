"""The released SpikingBrain-7B checkpoint format (``model_type: gla_swa``): reading and writing.

Parameter names of the release are the names our model uses, so only ``config.json``
differs. Released fields: ``attn_layers`` (0-indexed sliding-window layers; the rest are
GLA), ``sliding_window`` (flash-attn window: W + 1 keys), ``norm_eps``, ``rope_theta``,
``hidden_act: swish``, q/k/v biases everywhere, head_dim = hidden_size / heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from .config import SpikingBrainConfig
from .modeling import SpikingBrainForCausalLM

__all__ = ["GLAswaConfig", "GLAswaForCausalLM", "save_official", "official_config_dict"]

OFFICIAL_ARCHITECTURE = "GLAswaForCausalLM"


class GLAswaConfig(SpikingBrainConfig):
    """Config of the released SpikingBrain-7B format, read into SpikingBrain's fields."""

    model_type = "gla_swa"

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int = 4,
        intermediate_size: int = 18944,
        hidden_act: str = "swish",
        max_position_embeddings: int = 131072,
        sliding_window: int = 4096,
        norm_eps: float = 1e-6,
        rope_theta: float = 1e6,
        attn_layers: list[int] | None = None,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16,
        use_short_conv: bool = False,
        elementwise_affine: bool = True,
        attn_mode: str = "chunk",
        conv_size: int = 4,
        fuse_cross_entropy: bool = True,
        attention_dropout: float = 0.0,
        bos_token_id: int | None = 151643,
        eos_token_id: int | None = 151643,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if use_short_conv:
            raise ValueError("config.json: use_short_conv=true is not supported (the release never enables it); set it to false")
        if not elementwise_affine:
            raise ValueError("config.json: elementwise_affine=false is not supported; set it to true")
        if attn_layers is None:  # the release's config class always puts SWA on the odd layers
            attn_layers = list(range(1, num_hidden_layers, 2))
        bad = [i for i in attn_layers if not 0 <= i < num_hidden_layers]
        if bad:
            raise ValueError(f"config.json: attn_layers {bad} outside 0..{num_hidden_layers - 1}; fix attn_layers")
        for ours in ("layer_mixers", "rms_norm_eps", "attention_bias", "gla_gate_rank", "gla_gate_normalizer"):
            kwargs.pop(ours, None)  # derived from the official fields below
        self.attn_mode, self.conv_size, self.fuse_cross_entropy = attn_mode, conv_size, fuse_cross_entropy
        self.attention_dropout = attention_dropout
        super().__init__(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            layer_mixers=["swa" if i in set(attn_layers) else "gla" for i in range(num_hidden_layers)],
            sliding_window=sliding_window,
            window_semantics="flash",
            gla_gate_rank=gate_low_rank_dim,
            gla_gate_normalizer=gate_logit_normalizer,
            rope_theta=rope_theta,
            attention_bias=True,
            hidden_act="silu" if hidden_act == "swish" else hidden_act,
            rms_norm_eps=norm_eps,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def to_dict(self) -> dict:
        return official_config_dict(self)


class GLAswaForCausalLM(SpikingBrainForCausalLM):
    """Our model class bound to the official config (what ``AutoModelForCausalLM`` builds for ``gla_swa``)."""

    config_class = GLAswaConfig


def official_config_dict(config: SpikingBrainConfig) -> dict:
    """The release's ``config.json`` fields for a GLA/SWA ``config``; raises if it has no official form."""
    problems = []
    if any(m not in ("gla", "swa") for m in config.layer_mixers):
        problems.append(f"layer_mixers {config.layer_mixers} (only gla and swa exist in the official format)")
    if config.gla_feature_map != "relu":
        problems.append(f"gla_feature_map={config.gla_feature_map!r} (official: relu)")
    if config.gla_gate != "lowrank":
        problems.append(f"gla_gate={config.gla_gate!r} (official: lowrank)")
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
        "model_type": GLAswaConfig.model_type,
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


def save_official(model: SpikingBrainForCausalLM, folder: str | Path, max_shard_size: str | int = "5GB") -> Path:
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
