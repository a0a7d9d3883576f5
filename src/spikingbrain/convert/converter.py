"""``spikingbrain convert``: a Llama/Qwen2/Mistral folder in, a SpikingBrain folder out, with a report."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..model.checkpoint import TOKENIZER_FILES, CheckpointError, read_config
from ..model.hf_import import TRANSFORMER_FAMILIES, import_transformer
from ..model.loading import resolve_folder
from .plan import plan_layers

__all__ = ["ConversionReport", "convert_transformer", "describe_init"]

_INITS = [
    (r"\.attn\.gk_proj\.\d+\.weight$", "xavier_uniform(gain=2^-2.5), as in the SpikingBrain release"),
    (r"\.attn\.gk_proj\.\d+\.bias$", "zeros"),
    (r"norm\.weight$", "ones (identity RMSNorm scale)"),
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

    def summary(self) -> str:
        """A few human-readable lines."""
        layout = "".join({"gla": "L", "swa": "S", "full": "F"}.get(m, "?") for m in self.layer_mixers)
        lines = [
            f"converted {self.source} -> {self.output}",
            f"layers ({len(self.layer_mixers)}): {layout}  (L = GLA, S = SWA window {self.sliding_window}, F = full)",
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


def convert_transformer(
    source: str | Path,
    output: str | Path,
    layout: str | list[str] = "alternating",
    full_layers: list[int] = (),
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    seed: int = 0,
    **overrides,
) -> ConversionReport:
    """Convert a Llama/Qwen2/Mistral folder (or ``default``) into a SpikingBrain folder at ``output``.

    Every source tensor is mapped or reported as dropped, new parameters are listed with their
    initialisation, and the tokenizer, chat template and generation config are carried over.
    The folder is written to a temporary sibling and renamed, so a failure leaves no half folder.
    New parameters are drawn from a generator seeded with ``seed``: the same command gives the same folder.
    """
    folder = resolve_folder(source)
    raw = read_config(folder)
    if raw["model_type"] not in TRANSFORMER_FAMILIES:
        raise CheckpointError(
            f"{folder / 'config.json'}: model_type {raw['model_type']!r} cannot be converted; "
            f"supported source families: {list(TRANSFORMER_FAMILIES)}"
        )
    output = Path(output).expanduser()
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; choose another folder or pass --force to replace it")
    mixers = plan_layers(raw["num_hidden_layers"], layout, list(full_layers))
    if sliding_window is not None:
        overrides["sliding_window"] = sliding_window
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, imported = import_transformer(folder, mixers, dtype, **overrides)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        copied = []
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, staging / name)
                copied.append(name)
        report = ConversionReport(
            source=str(source),
            output=str(output),
            layer_mixers=list(model.config.layer_mixers),
            sliding_window=model.config.sliding_window,
            parameters=sum(p.numel() for p in model.parameters()),
            mapped=imported.mapped,
            dropped=imported.dropped,
            new={name: describe_init(name) for name in imported.new},
            copied_files=copied,
        )
        (staging / "conversion_report.json").write_text(json.dumps(asdict(report), indent=1))
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report


def _layer_indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--full-layers {text!r}: give 0-indexed layer numbers separated by commas, e.g. 6,13") from None


def _run(args) -> int:
    report = convert_transformer(
        args.source,
        args.output,
        layout=args.layout,
        full_layers=_layer_indices(args.full_layers),
        sliding_window=args.window,
        overwrite=args.force,
        seed=args.seed,
    )
    print(json.dumps(asdict(report), indent=1) if args.json else report.summary())
    return 0


def register(subparsers) -> None:
    """Add ``spikingbrain convert`` to the CLI."""
    from .plan import LAYOUT_HELP

    parser = subparsers.add_parser("convert", help="convert a Llama/Qwen2/Mistral folder (or 'default') into a SpikingBrain model")
    parser.add_argument("source", help="source folder or 'default' (the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("output", help="folder to write (must not exist or be empty, unless --force)")
    parser.add_argument("--layout", default="alternating", help=f"layer layout: {LAYOUT_HELP}")
    parser.add_argument("--full-layers", default="", help="0-indexed layers that keep full attention, e.g. 6,13")
    parser.add_argument("--window", type=int, default=None, help="sliding window W of SWA layers (default 4096)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new parameters' initialisation")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.set_defaults(func=_run)
