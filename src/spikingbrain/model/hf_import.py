"""Load Llama / Qwen2 / Mistral checkpoints as SpikingBrain models (every projection reused by name)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_state_dict, read_config, read_state_dict
from .config import SpikingBrainConfig
from .mixers import GatedLinearAttention
from .modeling import SpikingBrainForCausalLM

__all__ = [
    "TRANSFORMER_FAMILIES",
    "ImportReport",
    "is_source_parameter",
    "config_from_transformer",
    "map_transformer_weights",
    "import_transformer",
    "load_transformer",
]

#: Source model types whose checkpoints map onto SpikingBrain blocks.
TRANSFORMER_FAMILIES = ("llama", "qwen2", "mistral")

_RENAMES = [
    (r"^model\.embed_tokens\.", "model.embeddings."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.mlp_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"model.layers.\1.attn."),
]
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
#: Names of parameters a Llama-family checkpoint provides (after renaming); any other parameter is new.
_SOURCE_PARAMETER = re.compile(
    r"^(model\.embeddings\.weight|model\.norm\.weight|lm_head\.weight"
    r"|model\.layers\.\d+\.(attn_norm|mlp_norm)\.weight"
    r"|model\.layers\.\d+\.attn\.[qkvo]_proj\.(weight|bias)"
    r"|model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight)$"
)


def is_source_parameter(name: str) -> bool:
    """Whether a SpikingBrain parameter name is one a Llama-family checkpoint provides (else it is new)."""
    return bool(_SOURCE_PARAMETER.match(name))


@dataclass
class ImportReport:
    """What happened to every tensor of a source checkpoint and which parameters are new."""

    source: str
    mapped: dict[str, str] = field(default_factory=dict)  # source name -> SpikingBrain name
    dropped: dict[str, str] = field(default_factory=dict)  # source name -> reason
    new: list[str] = field(default_factory=list)  # SpikingBrain parameters the source lacks


def _rope_theta(src: dict, path: str) -> float:
    params = src.get("rope_parameters") or src.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{path}: rope type {rope_type!r} is not supported yet; only default RoPE is")
    theta = params.get("rope_theta", src.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{path}: no rope_theta in rope_parameters or at top level; add it")
    return float(theta)


def config_from_transformer(
    src: dict, layer_mixers: list[str] | None = None, path: str = "config.json", **overrides
) -> SpikingBrainConfig:
    """SpikingBrain config with the shapes of a Llama/Qwen2/Mistral ``config.json`` dict.

    Without ``layer_mixers`` every layer is ``full`` (or ``swa`` with the source's window when
    the source uses sliding-window attention, e.g. Mistral-7B-v0.1), so outputs are unchanged.
    ``overrides`` set further SpikingBrain config fields (e.g. ``sliding_window``).
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
    fields = dict(
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
    return SpikingBrainConfig(**{**fields, **overrides})


def _rename(name: str) -> str:
    """The SpikingBrain name of a Llama-family tensor."""
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def map_transformer_weights(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename Llama-family tensors to SpikingBrain names; returns ``(mapped, dropped_names)``."""
    dropped = [name for name in state if _DROPPED.search(name)]
    return {_rename(name): t for name, t in state.items() if name not in dropped}, dropped


def import_transformer(
    folder: str | Path, layer_mixers: list[str] | None = None, dtype: torch.dtype = torch.float32, **overrides
) -> tuple[SpikingBrainForCausalLM, ImportReport]:
    """A SpikingBrain model holding the weights of a Llama/Qwen2/Mistral folder, and what was mapped.

    Parameters that the source lacks (e.g. GLA gates and output norms) are freshly
    initialised and listed as new; every source tensor must be used or reported as dropped.
    """
    folder = Path(folder)
    config = config_from_transformer(read_config(folder), layer_mixers, str(folder / "config.json"), **overrides)
    source = read_state_dict(folder, dtype)
    report = ImportReport(source=str(folder))
    state, dropped = map_transformer_weights(source)
    report.dropped = {name: "rotary frequencies are recomputed from rope_theta" for name in dropped}
    report.mapped = {name: _rename(name) for name in source if name not in dropped}
    if config.tie_word_embeddings and "lm_head.weight" in state:
        state.pop("lm_head.weight")
        source_name = next(s for s, t in report.mapped.items() if t == "lm_head.weight")
        del report.mapped[source_name]
        report.dropped[source_name] = "tied to the input embeddings (tie_word_embeddings)"
    with torch.device("meta"):
        model = SpikingBrainForCausalLM(config)
    expected = {n: p.shape for n, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    report.new = sorted(n for n in expected if not is_source_parameter(n))
    check_state_dict(str(folder), {n: t.shape for n, t in state.items()}, expected, allowed_missing=set(report.new))
    model.load_state_dict(state, strict=False, assign=True)
    _materialize_new_parameters(model, dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), report


def load_transformer(
    folder: str | Path, layer_mixers: list[str] | None = None, dtype: torch.dtype = torch.float32, **overrides
) -> SpikingBrainForCausalLM:
    """A SpikingBrain model holding the weights of a Llama/Qwen2/Mistral folder (see ``import_transformer``)."""
    return import_transformer(folder, layer_mixers, dtype, **overrides)[0]


def _materialize_new_parameters(model: SpikingBrainForCausalLM, dtype: torch.dtype) -> None:
    """Allocate and initialise the parameters still on the meta device (new mixer parameters)."""
    for module in list(model.modules()):
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False).to(dtype)
            model._init_weights(module)
    for module in model.modules():
        if isinstance(module, GatedLinearAttention):
            model._init_weights(module)  # the gate's own initialisation rule
