"""The released SpikingBrain-7B checkpoint format (``model_type: gla_swa``): its config and model classes, for reading.

Parameter names of the release are the names our model uses, so only ``config.json``
differs. Released fields: ``attn_layers`` (0-indexed sliding-window layers; the rest are
GLA), ``sliding_window`` (flash-attn window: W + 1 keys), ``norm_eps``, ``rope_theta``,
``hidden_act: swish``, q/k/v biases everywhere, head_dim = hidden_size / heads. Importing
this module registers ``gla_swa`` with transformers' Auto classes; writing the format lives in
:mod:`spikingbrain.model.official_format`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .config import SpikingBrainConfig
from .modeling import SpikingBrainForCausalLM
from .official_format import OFFICIAL_MODEL_TYPE, official_config_dict

__all__ = ["GLAswaConfig", "GLAswaForCausalLM"]


class GLAswaConfig(SpikingBrainConfig):
    """Config of the released SpikingBrain-7B format, read into SpikingBrain's fields."""

    model_type = OFFICIAL_MODEL_TYPE

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


AutoConfig.register(GLAswaConfig.model_type, GLAswaConfig, exist_ok=True)
AutoModelForCausalLM.register(GLAswaConfig, GLAswaForCausalLM, exist_ok=True)
