"""Named configurations: the released SpikingBrain-7B and the report's SpikingBrain-76B-A12B.

Both build on the Qwen2.5-7B backbone (hidden 3584, 28 layers, 28 query / 4 key-value heads,
FFN 18944, vocabulary 152064, RoPE theta 1e6, untied embeddings, q/k/v biases). Every field
can be overridden, so either family can be built at any size; the layer-indexed fields of
SpikingBrain-76B follow the layer count (see :func:`spikingbrain_76b`).

Layer indexing: the report numbers the 76B's full-attention layers 7, 14, 21, 28 and its
dense-FFN layers 1, 2, 3, 5, 7, 9, 11. Layer 28 exists only when counting from 1, so both lists
are read as 1-indexed: 0-indexed full-attention layers 6, 13, 20, 27 and dense-FFN layers
0, 1, 2, 4, 6, 8, 10 (``dense_ffn_layers`` and ``layer_mixers`` are always 0-indexed).
"""

from __future__ import annotations

from .config import SpikingBrainConfig
from .names import PRESET_NAMES, alternating_layers

__all__ = ["PRESETS", "preset_config", "spikingbrain_7b", "spikingbrain_76b", "REPORT_76B_DENSE_FFN_LAYERS"]

#: The Qwen2.5-7B shapes both SpikingBrain models were converted from.
_BACKBONE = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    sliding_window=4096,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=131072,
    attention_bias=True,
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151643,
)

#: The report's dense-FFN layers of SpikingBrain-76B, 1-indexed as printed (1, 2, 3, 5, 7, 9, 11), made 0-indexed.
REPORT_76B_DENSE_FFN_LAYERS = (0, 1, 2, 4, 6, 8, 10)
#: Every 7th layer of SpikingBrain-76B has full attention in its softmax branch (1-indexed 7, 14, 21, 28).
_76B_FULL_ATTENTION_PERIOD = 7


def _with_backbone(defaults: dict, overrides: dict) -> dict:
    """Backbone fields, then ``defaults``, then ``overrides``; Qwen's special token ids only when they fit the vocabulary."""
    fields = {**_BACKBONE, **defaults, **overrides}
    for name in ("bos_token_id", "eos_token_id"):
        if name not in overrides and fields[name] >= fields["vocab_size"]:
            fields[name] = None
    return fields


def spikingbrain_7b(**overrides) -> SpikingBrainConfig:
    """SpikingBrain-7B as released: GLA (ReLU, low-rank gate) on even layers, 4096-token SWA on odd ones."""
    fields = _with_backbone({}, overrides)
    fields.setdefault("layer_mixers", alternating_layers(fields["num_hidden_layers"]))
    return SpikingBrainConfig(**fields)


def spikingbrain_76b(**overrides) -> SpikingBrainConfig:
    """SpikingBrain-76B-A12B as described in the report (weights never released).

    Every layer runs key-tied GLA (sigmoid features, decay ``1 - k``) in parallel with
    sliding-window attention, or with full attention on every 7th layer (0-indexed 6, 13, 20,
    27), sharing q/k/v/o; 128 sink tokens per layer; MoE FFNs of 16 routed experts (top-1,
    softmax router, weights not renormalised, as the report's upcycling rule assumes) plus one
    shared expert, with dense FFNs at 0-indexed layers 0, 1, 2, 4, 6, 8, 10. With another
    ``num_hidden_layers`` the same rules apply: full attention where ``(i + 1) % 7 == 0``, dense
    FFNs at those of 0, 1, 2, 4, 6, 8, 10 that exist; ``num_experts=0`` gives dense FFNs everywhere.
    """
    defaults = {
        "gla_gate": "key_tied",
        "gla_feature_map": "sigmoid",
        "parallel_combine": "learned",
        "parallel_shared_projections": True,
        "num_sink_tokens": 128,
        "num_experts": 16,
    }
    if overrides.get("num_experts", defaults["num_experts"]):
        defaults.update(num_experts_per_tok=1, num_shared_experts=1, moe_router="softmax", norm_topk_prob=False)
    fields = _with_backbone(defaults, overrides)
    layers = fields["num_hidden_layers"]
    fields.setdefault(
        "layer_mixers",
        ["parallel-full" if (i + 1) % _76B_FULL_ATTENTION_PERIOD == 0 else "parallel-swa" for i in range(layers)],
    )
    if fields["num_experts"]:
        fields.setdefault("dense_ffn_layers", [i for i in REPORT_76B_DENSE_FFN_LAYERS if i < layers])
    return SpikingBrainConfig(**fields)


#: Preset names (as ``spikingbrain info --preset NAME`` takes them) and their builders.
PRESETS = dict(zip(PRESET_NAMES, (spikingbrain_7b, spikingbrain_76b)))


def preset_config(name: str, **overrides) -> SpikingBrainConfig:
    """The configuration of preset ``name`` with ``overrides`` applied (any field of SpikingBrainConfig)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
