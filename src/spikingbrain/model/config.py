"""Configuration of SpikingBrain hybrid models."""

from __future__ import annotations

from transformers import PretrainedConfig

__all__ = ["SpikingBrainConfig", "MIXER_TYPES", "alternating_layers"]

#: Token mixers a layer can use: gated linear attention, sliding-window attention, full attention.
MIXER_TYPES = ("gla", "swa", "full")
GLA_FEATURE_MAPS = ("relu", "identity")
WINDOW_SEMANTICS = ("flash", "sdpa")


def alternating_layers(num_layers: int) -> list[str]:
    """The SpikingBrain-7B layout: GLA on even (0-indexed) layers, SWA on odd layers."""
    return ["gla" if i % 2 == 0 else "swa" for i in range(num_layers)]


class SpikingBrainConfig(PretrainedConfig):
    """Shapes and per-layer mixers of a SpikingBrain model.

    ``layer_mixers`` names the mixer of every layer (``gla``, ``swa`` or ``full``);
    ``sliding_window`` is W in flash-attn's ``window_size=(W, 0)`` sense (W + 1 keys per
    query) unless ``window_semantics="sdpa"`` (W keys, as in the release's SDPA fallback).
    GLA options: ``gla_feature_map`` on q and k, low-rank gate of rank ``gla_gate_rank``
    with log decay ``logsigmoid(gate) / gla_gate_normalizer``, per-head output RMSNorm.
    ``streaming_chunk_size`` is the token count of one step of streaming prefill;
    ``max_sequence_length`` (None = unlimited) rejects longer inputs.
    """

    model_type = "spikingbrain"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 30,
        num_attention_heads: int = 9,
        num_key_value_heads: int | None = 3,
        head_dim: int | None = None,
        layer_mixers: list[str] | None = None,
        sliding_window: int = 4096,
        window_semantics: str = "flash",
        gla_feature_map: str = "relu",
        gla_gate_rank: int = 16,
        gla_gate_normalizer: float = 16.0,
        gla_output_norm: bool = True,
        gla_chunk_size: int = 64,
        rope_theta: float = 10000.0,
        attention_bias: bool = True,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 131072,
        max_sequence_length: int | None = None,
        streaming_chunk_size: int = 4096,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.layer_mixers = list(layer_mixers) if layer_mixers is not None else alternating_layers(num_hidden_layers)
        self.sliding_window = sliding_window
        self.window_semantics = window_semantics
        self.gla_feature_map = gla_feature_map
        self.gla_gate_rank = gla_gate_rank
        self.gla_gate_normalizer = gla_gate_normalizer
        self.gla_output_norm = gla_output_norm
        self.gla_chunk_size = gla_chunk_size
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.max_sequence_length = max_sequence_length
        self.streaming_chunk_size = streaming_chunk_size
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_layout()

    @property
    def attention_window(self) -> int:
        """Previous keys a sliding-window query sees (flash-attn's left window)."""
        return self.sliding_window if self.window_semantics == "flash" else self.sliding_window - 1

    def validate_layout(self) -> None:
        """Raise ``ValueError`` naming the field when the configuration is inconsistent."""
        problems = []
        if len(self.layer_mixers) != self.num_hidden_layers:
            problems.append(
                f"layer_mixers has {len(self.layer_mixers)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted({t for t in self.layer_mixers if t not in MIXER_TYPES})
        if unknown:
            problems.append(f"layer_mixers contains unknown mixers {unknown}; use one of {list(MIXER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.gla_feature_map not in GLA_FEATURE_MAPS:
            problems.append(f"gla_feature_map={self.gla_feature_map!r}; use one of {list(GLA_FEATURE_MAPS)}")
        if self.window_semantics not in WINDOW_SEMANTICS:
            problems.append(f"window_semantics={self.window_semantics!r}; use one of {list(WINDOW_SEMANTICS)}")
        if self.sliding_window < 1:
            problems.append(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.hidden_act not in ("silu", "swish"):
            problems.append(f"hidden_act={self.hidden_act!r}; only the SwiGLU MLP ('silu'/'swish') is implemented")
        if self.gla_chunk_size < 1:
            problems.append(f"gla_chunk_size must be >= 1, got {self.gla_chunk_size}")
        if self.streaming_chunk_size < 1:
            problems.append(f"streaming_chunk_size must be >= 1, got {self.streaming_chunk_size}")
        if problems:
            raise ValueError("invalid SpikingBrain config: " + "; ".join(problems))
