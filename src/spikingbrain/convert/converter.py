"""``spikingbrain convert``: a Llama/Qwen2/Mistral folder in, a SpikingBrain folder out, with a report."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..model.checkpoint import CheckpointError, copy_tokenizer_files, read_config, refuse_non_empty, written_folder
from ..model.hf_import import TRANSFORMER_FAMILIES, import_transformer
from ..model.info import LAYOUT_LETTERS
from ..model.loading import resolve_folder
from .plan import AUTO_LAYOUTS, plan_layers
from .selection import plan_from_ranking

__all__ = ["ConversionReport", "convert_transformer", "describe_init"]

_INITS = [
    (r"\.gk_proj\.\d+\.weight$", "xavier_uniform(gain=2^-2.5), as in the SpikingBrain release"),
    (r"\.gk_proj\.\d+\.bias$", "zeros"),
    (r"\.beta_proj\.", "zeros (delta-rule write strength sigmoid(0) = 1/2)"),
    (r"norm\.weight$", "ones (identity RMSNorm scale)"),
    (r"\.sinks$", "normal(0, initializer_range)"),
    (r"\.branch_weights$", "0.5 per branch"),
    (r"\.linear_weights$", "zeros (the layer starts as the softmax attention it replaces)"),
    (r"\.mlp\.router\.", "router: see upcycling (zeros for 'zeros', else normal(0, initializer_range))"),
    (r"\.mlp\.(shared_)?experts\.", "copy of the dense MLP, scaled (MoE upcycling)"),
]


def describe_init(name: str) -> str:
    """How a new parameter named ``name`` is initialised."""
    for pattern, text in _INITS:
        if re.search(pattern, name):
            return text
    return "SpikingBrainPreTrainedModel._init_weights (normal(0, initializer_range), zero bias)"


@dataclass
class ConversionReport:
    """The outcome of a conversion: layout, and the fate of every source tensor."""

    source: str
    output: str
    layer_mixers: list[str]
    sliding_window: int
    parameters: int
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    new: dict[str, str] = field(default_factory=dict)  # name -> initialisation
    copied_files: list[str] = field(default_factory=list)
    layer_ranking: list[dict] = field(default_factory=list)  # measured layer costs of an 'auto' layout

    def summary(self) -> str:
        """A few human-readable lines."""
        layout = "".join(LAYOUT_LETTERS[m] for m in self.layer_mixers)
        lines = [
            f"converted {self.source} -> {self.output}",
            f"layers ({len(self.layer_mixers)}): {layout}  (L = GLA, S = SWA window {self.sliding_window}, F = full; "
            "lower case: GLA in parallel with it)",
            f"parameters: {self.parameters:,}",
            f"source tensors mapped: {len(self.mapped)}; dropped: {len(self.dropped)}",
        ]
        lines += [f"  dropped {name}: {why}" for name, why in self.dropped.items()]
        lines.append(f"new parameters: {len(self.new)}")
        kinds: dict[str, list[str]] = {}
        for name, how in self.new.items():
            kinds.setdefault(re.sub(r"layers\.\d+\.", "layers.*.", name) + f": {how}", []).append(name)
        lines += [f"  {kind} (x{len(names)})" for kind, names in kinds.items()]
        lines.append(f"carried over: {', '.join(self.copied_files) or 'nothing'}")
        return "\n".join(lines)


def _upcycle(model, imported, fields: dict):
    """Upcycle ``model``'s MLPs into MoE layers and re-point the report: source MLP tensors map to expert copies."""
    from .upcycle import upcycle_model

    scaling, router_init = fields.pop("scaling", "exact"), fields.pop("router_init", "normal")
    model = upcycle_model(model, scaling=scaling, router_init=router_init, **fields)
    names = set(model.state_dict())
    for source, target in imported.mapped.items():
        if target not in names:  # an MLP weight now copied into every expert of its layer
            layer, matrix = re.match(r"(model\.layers\.\d+\.mlp)\.(\w+)\.weight$", target).groups()
            imported.mapped[source] = f"{layer}.{{experts,shared_experts}}.*.{matrix}.weight (upcycled, scaling={scaling})"
    copies = {n for n in names if re.search(r"\.mlp\.(shared_)?experts\.", n)}
    imported.new = sorted(names - set(imported.mapped.values()) - copies - {"lm_head.weight"})
    return model


def convert_transformer(
    source: str | Path,
    output: str | Path,
    layout: str | list[str] = "alternating",
    full_layers: list[int] = (),
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    seed: int = 0,
    upcycle: dict | None = None,
    linear_layers: int | None = None,
    auto_full_layers: int = 0,
    ranking: list[dict] | None = None,
    progress: bool = True,
    **overrides,
) -> ConversionReport:
    """Convert a Llama/Qwen2/Mistral folder (or ``default``) into a SpikingBrain folder at ``output``.

    Every source tensor is mapped or reported as dropped, new parameters are listed with their
    initialisation, and the tokenizer, chat template and generation config are carried over.
    The folder is written to a temporary sibling and renamed, so a failure leaves no half folder.
    New parameters are drawn from a generator seeded with ``seed``: the same command gives the same folder.
    ``upcycle`` (MoE fields such as ``num_experts``, ``num_experts_per_tok``, ``num_shared_experts``,
    ``dense_ffn_layers``, plus optional ``scaling`` and ``router_init``) turns the dense MLPs into
    Mixture-of-Experts layers by copying them into every expert (``convert.upcycle.upcycle_model``).
    Layouts ``auto`` and ``auto-parallel`` choose layers by measurement (``convert.selection``):
    ``auto`` makes the ``linear_layers`` (default: half) cheapest layers GLA and the rest SWA,
    ``auto-parallel`` puts GLA in parallel with every layer; both give full attention to the
    ``auto_full_layers`` layers that retrieval depends on most. ``ranking`` reuses the
    ``layer_ranking`` of an earlier report instead of measuring again.
    """
    folder = resolve_folder(source)
    raw = read_config(folder)
    if raw["model_type"] not in TRANSFORMER_FAMILIES:
        raise CheckpointError(
            f"{folder / 'config.json'}: model_type {raw['model_type']!r} cannot be converted; "
            f"supported source families: {list(TRANSFORMER_FAMILIES)}"
        )
    output = Path(output).expanduser()
    if not overwrite:
        refuse_non_empty(output)
    if layout in AUTO_LAYOUTS:
        if full_layers:
            raise ValueError(f"layout {layout!r} chooses the full-attention layers itself; pass auto_full_layers=N, not full_layers")
        if ranking is None:
            from .selection import measure_ranking
            from ..model.loading import load_tokenizer

            ranking = measure_ranking(folder, load_tokenizer(folder), progress=progress)
        count = raw["num_hidden_layers"] // 2 if linear_layers is None else linear_layers
        mixers = plan_from_ranking(ranking, count, auto_full_layers, parallel=layout == "auto-parallel")
    else:
        mixers = plan_layers(raw["num_hidden_layers"], layout, list(full_layers))
    if sliding_window is not None:
        overrides["sliding_window"] = sliding_window
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, imported = import_transformer(folder, mixers, dtype, **overrides)
        if upcycle:
            model = _upcycle(model, imported, dict(upcycle))
    with written_folder(output) as staging:
        model.save_pretrained(staging)
        report = ConversionReport(
            source=str(source),
            output=str(output),
            layer_mixers=list(model.config.layer_mixers),
            sliding_window=model.config.sliding_window,
            parameters=sum(p.numel() for p in model.parameters()),
            mapped=imported.mapped,
            dropped=imported.dropped,
            new={name: describe_init(name) for name in imported.new},
            copied_files=copy_tokenizer_files(folder, staging),
            layer_ranking=list(ranking or []),
        )
        (staging / "conversion_report.json").write_text(json.dumps(asdict(report), indent=1))
    return report
