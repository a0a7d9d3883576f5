"""The two models of a side-by-side measurement: ours and a baseline Transformer run by Hugging Face transformers (SDPA).

Evaluations (pass key) and benchmarks (time to first token, decoding) and the demo compare the
same pair, loaded the same way and checked against the same length limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .lengths import format_length

__all__ = ["Candidate", "load_baseline", "make_candidates", "load_candidates", "check_lengths"]


@dataclass
class Candidate:
    """A model timed by a benchmark: a name (``ours``, ``baseline``, ``also1``, ...), a label, the model and its limits."""

    name: str
    label: str
    model: object
    degree: int  # of the cost fit: 1 linear, 2 quadratic
    max_length: int | None = None  # longest input the model accepts (None: no limit)
    trained_length: int | None = None  # positions the model was trained on (None: not known)
    rows: list[dict] = field(default_factory=list)


def load_baseline(ref: str):
    """A Transformer run by Hugging Face transformers with SDPA attention (``default``: the embedded teacher)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..model.loading import resolve_folder

    folder = resolve_folder(ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    except Exception as err:  # transformers raises many types for a folder it cannot read
        raise ValueError(
            f"the baseline {ref!r} ({folder}) could not be loaded with transformers (attn_implementation='sdpa'): "
            f"{type(err).__name__}: {err}; give a Llama-family folder or 'default'"
        ) from err
    return model.eval()


def _ours(name: str, model, ref: str) -> Candidate:
    """A model of ours: linear cost, limited by its max_sequence_length."""
    return Candidate(name, f"SpikingBrain {ref}", model, 1, max_length=model.config.max_sequence_length)


def make_candidates(ours, ours_ref: str, baseline=None, baseline_ref: str | None = None) -> list[Candidate]:
    """Candidates of loaded models: ours (linear cost, its max_sequence_length) and a transformers baseline (quadratic)."""
    candidates = [_ours("ours", ours, ours_ref)]
    if baseline is not None:
        trained = getattr(baseline.config, "max_position_embeddings", None)
        candidates.append(Candidate("baseline", f"transformers SDPA {baseline_ref}", baseline, 2, trained_length=trained))
    return candidates


def load_candidates(ours_ref: str, baseline_ref: str | None, also: list[str] = ()) -> tuple[list[Candidate], list[str]]:
    """Our model and the baseline (skipped with a message when it cannot load or is ``none``), then further models of
    ours (``also``, named ``also1``, ``also2``, ...); the messages."""
    from ..model.loading import load_model

    ours = load_model(ours_ref)
    baseline, notes = None, []
    if baseline_ref and baseline_ref != "none":
        try:
            baseline = load_baseline(baseline_ref)
        except (ValueError, OSError) as err:
            notes.append(f"baseline skipped: {err} (with --baseline; 'none' skips it)")
    candidates = make_candidates(ours, ours_ref, baseline, baseline_ref)
    candidates += [_ours(f"also{i}", load_model(ref), ref) for i, ref in enumerate(also, 1)]
    return candidates, notes


def check_lengths(candidate: Candidate, lengths: list[int]) -> list[str]:
    """Raise for lengths above the model's configured maximum; notes for lengths beyond its trained context."""
    if candidate.max_length is not None and max(lengths) > candidate.max_length:
        raise ValueError(
            f"{candidate.label}: length {max(lengths)} exceeds the model's max_sequence_length={candidate.max_length} "
            "(config.json); drop the longer lengths or raise max_sequence_length (null = unlimited)"
        )
    beyond = [n for n in lengths if candidate.trained_length and n > candidate.trained_length]
    if beyond:
        return [
            f"{candidate.label}: lengths {', '.join(map(format_length, beyond))} are beyond its max_position_embeddings="
            f"{candidate.trained_length}; it still runs (RoPE is defined at every position), so the time is real, "
            "but the model was not trained there (rows marked beyond_trained_context)"
        ]
    return []
