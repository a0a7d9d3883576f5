"""Configuration of SpikingBrain hybrid models."""

from __future__ import annotations

import inspect

from transformers import PretrainedConfig

from ..spiking.apply import spiking_settings
from ..spiking.int8 import weight_quantization_settings
from .names import MIXER_TYPES, alternating_layers

__all__ = ["SpikingBrainConfig"]

GLA_FEATURE_MAPS = ("relu", "identity", "sigmoid")
GLA_GATES = ("lowrank", "key_tied")
#: How a GLA layer writes its state: add ``k^T v`` (GLA), or move the value stored under ``k`` towards ``v`` (gated delta rule).
GLA_UPDATES = ("additive", "delta")
PARALLEL_COMBINES = ("sum", "mean", "learned", "residual")
MOE_ROUTERS = ("softmax", "sigmoid")
WINDOW_SEMANTICS = ("flash", "sdpa")
#: How sliding-window layers store the keys and values of one-token decode steps: in the model's dtype (None), in
#: float16 (half the bytes each decode step reads) or int8 (codes with one fp32 scale per position and head: about a
#: quarter); each key is rounded once, when it enters the cache, and the attention itself stays fp32.
WINDOW_KV_DTYPES = (None, "float16", "int8")
#: How W8ASpike's integer attention kernel sums its weighted values: in fp32 (the simulation's numbers) or, where the
#: CPU has AVX-512 BF16, each weight times its value's scale rounded to bf16 (faster; see ``ops.integer_attention``).
ATTENTION_VALUES_DTYPES = ("float32", "bfloat16")


def checked_window_kv_dtype(value: str | None) -> str | None:
    """``value`` if it is one of ``WINDOW_KV_DTYPES``, else a ValueError naming it and the choices."""
    if value not in WINDOW_KV_DTYPES:
        raise ValueError(f"window_kv_dtype={value!r}; use one of {list(WINDOW_KV_DTYPES)} (None: the model's dtype)")
    return value


def checked_attention_values_dtype(value: str) -> str:
    """``value`` if it is one of ``ATTENTION_VALUES_DTYPES``, else a ValueError naming it and the choices."""
    if value not in ATTENTION_VALUES_DTYPES:
        raise ValueError(f"attention_values_dtype={value!r}; use one of {list(ATTENTION_VALUES_DTYPES)}")
    return value


class SpikingBrainConfig(PretrainedConfig):
    """Shapes and per-layer mixers of a SpikingBrain model.

    ``layer_mixers`` names the mixer of every layer: ``gla``, ``swa``, ``full`` (SpikingBrain-7B
    style, one mixer per layer) or ``parallel-swa`` / ``parallel-full`` (SpikingBrain-76B style:
    GLA in parallel with sliding-window / full attention in the same layer, each branch's
    per-head output RMS-normalised, then combined by ``parallel_combine``: ``sum``, ``mean`` or
    ``learned`` per-branch scalars initialised to 1/2; or ``residual``: the softmax branch as it
    is (not normalised) plus the normalised linear branch times per-head weights that start at
    zero, so that a converted layer starts as the teacher's attention; the branches share q/k/v/o unless
    ``parallel_shared_projections`` is false).
    ``sliding_window`` is W in flash-attn's ``window_size=(W, 0)`` sense (W + 1 keys per
    query) unless ``window_semantics="sdpa"`` (W keys, as in the release's SDPA fallback).
    ``keep_first_tokens`` first positions of a sequence stay visible to every sliding-window
    query after the window has passed them (StreamingLLM's attention sinks; 0 = plain window).
    ``window_kv_dtype`` and ``attention_values_dtype``: see ``WINDOW_KV_DTYPES`` and ``ATTENTION_VALUES_DTYPES``.
    GLA options: ``gla_feature_map`` on q and k; ``gla_gate="lowrank"`` (7B: gate of rank
    ``gla_gate_rank`` with log decay ``logsigmoid(gate) / gla_gate_normalizer``; rank 0: one
    full-rank ``gk_proj`` linear, the released W8ASpike layout) or
    ``"key_tied"`` (76B: decay ``1 - k`` with sigmoid features, no gate parameters); per-head
    output RMSNorm. ``gla_update="delta"`` makes the state write a gated delta rule (unit-length q and k,
    a write strength ``sigmoid(beta_proj(x))`` per key/value head; see ``ops.delta_rule``) instead of GLA's sum.
    ``num_sink_tokens`` learnable sink states per layer give keys and values
    that every query of every softmax attention sees (never in outputs, no position shift).
    Mixture-of-Experts (``num_experts > 0``): every layer not in ``dense_ffn_layers`` (0-indexed)
    has ``num_experts`` routed SwiGLU experts of ``moe_intermediate_size``, ``num_experts_per_tok``
    of them per token (``moe_router`` softmax or sigmoid scores, top-k weights renormalised when
    ``norm_topk_prob``), plus ``num_shared_experts`` always-on experts; the causal LM adds
    ``router_aux_loss_coef`` times the load-balancing loss to the loss when given labels.
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
        keep_first_tokens: int = 0,
        window_kv_dtype: str | None = None,
        attention_values_dtype: str = "float32",
        gla_feature_map: str = "relu",
        gla_gate: str = "lowrank",
        gla_gate_rank: int = 16,
        gla_gate_normalizer: float = 16.0,
        gla_output_norm: bool = True,
        gla_chunk_size: int = 64,
        gla_update: str = "additive",
        parallel_combine: str = "learned",
        parallel_shared_projections: bool = True,
        num_sink_tokens: int = 0,
        num_experts: int = 0,
        num_experts_per_tok: int = 1,
        num_shared_experts: int = 0,
        moe_intermediate_size: int | None = None,
        moe_router: str = "softmax",
        norm_topk_prob: bool = False,
        dense_ffn_layers: list[int] | None = None,
        router_aux_loss_coef: float = 0.001,
        spiking: dict | None = None,
        weight_quantization: dict | None = None,
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
        self.keep_first_tokens = keep_first_tokens
        self.window_kv_dtype = checked_window_kv_dtype(window_kv_dtype)
        self.attention_values_dtype = checked_attention_values_dtype(attention_values_dtype)
        self.gla_feature_map = gla_feature_map
        self.gla_gate = gla_gate
        self.gla_gate_rank = gla_gate_rank
        self.gla_gate_normalizer = gla_gate_normalizer
        self.gla_output_norm = gla_output_norm
        self.gla_chunk_size = gla_chunk_size
        self.gla_update = gla_update
        self.parallel_combine = parallel_combine
        self.parallel_shared_projections = parallel_shared_projections
        self.num_sink_tokens = num_sink_tokens
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.moe_intermediate_size = intermediate_size if moe_intermediate_size is None else moe_intermediate_size
        self.moe_router = moe_router
        self.norm_topk_prob = norm_topk_prob
        self.dense_ffn_layers = sorted(dense_ffn_layers or [])
        self.router_aux_loss_coef = router_aux_loss_coef
        self.spiking = spiking_settings(**spiking) if spiking else None
        if weight_quantization:
            quant = dict(weight_quantization)
            if quant.pop("bits", 8) != 8:
                raise ValueError(f"weight_quantization.bits={weight_quantization['bits']}; only 8-bit weights are implemented")
            weight_quantization = weight_quantization_settings(**quant)
        self.weight_quantization = weight_quantization or None
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

    @classmethod
    def derived_from(cls, config: "SpikingBrainConfig", **changes) -> "SpikingBrainConfig":
        """A plain SpikingBrainConfig with the fields of ``config`` (any subclass) and ``changes`` applied."""
        names = inspect.signature(cls.__init__).parameters
        fields = {k: v for k, v in SpikingBrainConfig.to_dict(config).items() if k in names}
        return cls(**{**fields, **changes})

    @property
    def attention_window(self) -> int:
        """Previous keys a sliding-window query sees (flash-attn's left window)."""
        return self.sliding_window if self.window_semantics == "flash" else self.sliding_window - 1

    @property
    def window_cache_positions(self) -> int:
        """Positions a sliding-window layer's cache holds at most: the kept first ones and the window."""
        return self.attention_window + self.keep_first_tokens

    @property
    def moe_layers(self) -> list[int]:
        """0-indexed layers whose FFN is a Mixture-of-Experts (empty without experts)."""
        if not self.num_experts:
            return []
        dense = set(self.dense_ffn_layers)
        return [i for i in range(self.num_hidden_layers) if i not in dense]

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
        if self.gla_gate not in GLA_GATES:
            problems.append(f"gla_gate={self.gla_gate!r}; use one of {list(GLA_GATES)}")
        elif self.gla_gate == "key_tied" and self.gla_feature_map != "sigmoid":
            problems.append(
                f"gla_gate='key_tied' needs keys in (0, 1) for the decay 1 - k, but gla_feature_map="
                f"{self.gla_feature_map!r}; set gla_feature_map='sigmoid'"
            )
        if self.gla_update not in GLA_UPDATES:
            problems.append(f"gla_update={self.gla_update!r}; use one of {list(GLA_UPDATES)}")
        if self.parallel_combine not in PARALLEL_COMBINES:
            problems.append(f"parallel_combine={self.parallel_combine!r}; use one of {list(PARALLEL_COMBINES)}")
        elif self.parallel_combine == "residual" and not self.parallel_shared_projections:
            problems.append(
                "parallel_combine='residual' weighs the linear branch per head before the shared o_proj; "
                "set parallel_shared_projections=true or choose another parallel_combine"
            )
        if self.num_sink_tokens < 0:
            problems.append(f"num_sink_tokens must be >= 0 (0 = no sinks), got {self.num_sink_tokens}")
        problems += self._moe_problems()
        if self.window_semantics not in WINDOW_SEMANTICS:
            problems.append(f"window_semantics={self.window_semantics!r}; use one of {list(WINDOW_SEMANTICS)}")
        if self.keep_first_tokens < 0:
            problems.append(f"keep_first_tokens must be >= 0 (0 = plain sliding window), got {self.keep_first_tokens}")
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

    def _moe_problems(self) -> list[str]:
        """What is wrong with the Mixture-of-Experts fields (nothing to check without experts)."""
        N, k, S = self.num_experts, self.num_experts_per_tok, self.num_shared_experts
        if N < 0:
            return [f"num_experts must be >= 0 (0 = dense FFN everywhere), got {N}"]
        if N == 0:
            if S or self.dense_ffn_layers:
                return [
                    f"num_shared_experts={S} / dense_ffn_layers={self.dense_ffn_layers} need num_experts > 0; "
                    "set num_experts or drop them"
                ]
            return []
        problems = []
        if not 1 <= k <= N:
            problems.append(f"num_experts_per_tok={k} must be between 1 and num_experts ({N}); set it to e.g. 1")
        if S < 0:
            problems.append(f"num_shared_experts must be >= 0, got {S}")
        if self.moe_intermediate_size < 1:
            problems.append(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
        if self.moe_router not in MOE_ROUTERS:
            problems.append(f"moe_router={self.moe_router!r}; use one of {list(MOE_ROUTERS)}")
        bad = [i for i in self.dense_ffn_layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(self.dense_ffn_layers)) != len(self.dense_ffn_layers):
            problems.append(
                f"dense_ffn_layers={self.dense_ffn_layers} must be distinct 0-indexed layers in 0..{self.num_hidden_layers - 1}; "
                "remove the out-of-range or repeated entries"
            )
        if self.router_aux_loss_coef < 0:
            problems.append(f"router_aux_loss_coef must be >= 0 (0 = no auxiliary loss), got {self.router_aux_loss_coef}")
        return problems
