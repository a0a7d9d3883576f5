"""The training curve of a run: held-out perplexity ratio (student / teacher), and pass-key accuracy where the run
measured it, against training tokens; one run's curve, or several models' curves side by side."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean

__all__ = ["training_curve", "continued_curve", "plot_training_curve", "plot_training_curves"]

_TOKENS_LABEL = "training tokens (the untrained conversion is drawn at 1)"


def training_curve(run: str | Path) -> dict:
    """The evaluated points of a run's ``metrics.jsonl`` (step, stage, tokens, ppl, ratio)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no metrics; is {run} a training run folder (the 'out' of a config)?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    teacher = next((r["teacher_ppl"] for r in records if "teacher_ppl" in r), None)
    teacher_passkey = next((r["teacher_passkey"] for r in records if "teacher_passkey" in r), None)
    keys = ("step", "stage", "tokens_seen", "ppl", "ppl_ratio", "fraction_of_teacher_pretraining", "passkey")
    points = [{k: r[k] for k in keys if k in r} for r in records if "ppl_ratio" in r]
    return {"run": str(run), "teacher_ppl": teacher, "teacher_passkey": teacher_passkey, "points": points}


def continued_curve(before: dict | None, after: dict, steps: int, tokens: int, teacher_pretraining_tokens: float) -> dict:
    """The curve of a run started from a delta (``init_delta``) after that delta's own curve ``before``: its points
    moved on by the delta's ``steps`` and ``tokens``, so that both count from the delta's first run."""
    def moved(point: dict) -> dict:
        point = {**point, "step": point["step"] + steps, "tokens_seen": point["tokens_seen"] + tokens}
        if "fraction_of_teacher_pretraining" in point:
            point["fraction_of_teacher_pretraining"] = point["tokens_seen"] / teacher_pretraining_tokens
        return point

    before = before or {}
    teacher_passkey = {**(before.get("teacher_passkey") or {}), **(after.get("teacher_passkey") or {})}
    return {**after, "continues": before.get("run"), "teacher_passkey": teacher_passkey or None,
            "points": list(before.get("points", [])) + [moved(point) for point in after["points"]]}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tokens(points: list[dict]) -> list[int]:
    """Training tokens of each point; the untrained conversion (0 tokens) at 1, for the log axis."""
    return [max(p["tokens_seen"], 1) for p in points]


def _plot_ratio(ax, series: dict[str, list[dict]], title: str) -> None:
    """Perplexity ratio against training tokens, one line per series, with the 1.15 target."""
    for label, points in series.items():
        ax.plot(_tokens(points), [p["ppl_ratio"] for p in points], "o-", label=label)
    ax.set_xscale("log")
    ratios = [p["ppl_ratio"] for points in series.values() for p in points]
    if max(ratios) > 3 * min(ratios):  # a conversion from far away: a log axis; a narrow range reads better linear
        ax.set_yscale("log")
    ax.axhline(1.15, color="gray", linestyle="--", linewidth=1, label="target 1.15")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(_TOKENS_LABEL)
    ax.set_ylabel("held-out perplexity / teacher's")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_passkey(ax, series: dict[str, tuple[list[int], list[float], float | None]], ylabel: str) -> None:
    """Pass-key accuracy (%) against training tokens, one line per series; each series' teacher value dashed."""
    for i, (label, (tokens, accuracy, teacher)) in enumerate(series.items()):
        line = ax.plot(tokens, [100 * a for a in accuracy], "o-", label=label)
        if teacher is not None:
            ax.axhline(100 * teacher, color=line[0].get_color(), linestyle="--", linewidth=1, label="teacher (dashed)" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_ylim(-5, 105)
    ax.set_xlabel(_TOKENS_LABEL)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_training_curve(run: str | Path) -> tuple[Path, Path]:
    """Write ``curve.json`` and ``curve.png`` into the run folder; returns their paths."""
    plt = _pyplot()
    run = Path(run)
    curve = training_curve(run)
    json_path, png_path = run / "curve.json", run / "curve.png"
    json_path.write_text(json.dumps(curve, indent=1))
    with_passkey = [p for p in curve["points"] if "passkey" in p]
    fig, axes = plt.subplots(1, 2 if with_passkey else 1, figsize=(13 if with_passkey else 7, 4.5), squeeze=False)
    stages = {stage: [p for p in curve["points"] if p["stage"] == stage] for stage in dict.fromkeys(p["stage"] for p in curve["points"])}
    title = f"{run.name}: teacher perplexity {curve['teacher_ppl']:.2f}" if curve["teacher_ppl"] else run.name
    _plot_ratio(axes[0][0], stages, title)
    if with_passkey:
        teacher = curve["teacher_passkey"] or {}
        lengths = sorted({n for p in with_passkey for n in p["passkey"]}, key=int)
        by_length = {}
        for length in lengths:
            pts = [p for p in with_passkey if length in p["passkey"]]
            by_length[f"{length} tokens"] = (_tokens(pts), [p["passkey"][length] for p in pts], teacher.get(length))
        _plot_passkey(axes[0][1], by_length, "pass-key accuracy, % (dashed: the teacher)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def plot_training_curves(curves: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Several models' training curves (``training_curve`` dicts by model name) in one PNG: the perplexity ratio, and
    the pass-key accuracy averaged over the lengths each run measured (dashed: the teacher's, same lengths)."""
    plt = _pyplot()
    keyed = {name: [p for p in c["points"] if "passkey" in p] for name, c in curves.items()}
    keyed = {name: pts for name, pts in keyed.items() if pts}
    fig, axes = plt.subplots(1, 2 if keyed else 1, figsize=(13 if keyed else 7, 4.5), squeeze=False)
    _plot_ratio(axes[0][0], {name: c["points"] for name, c in curves.items()}, title or "training curves")
    if keyed:
        means = {}
        for name, pts in keyed.items():
            lengths = sorted(pts[-1]["passkey"], key=int)
            teacher = curves[name].get("teacher_passkey") or {}
            label = f"{name} ({', '.join(lengths)} tokens)"
            means[label] = (_tokens(pts), [fmean(p["passkey"].get(n, 0.0) for n in lengths) for p in pts],
                            fmean(teacher[n] for n in lengths) if all(n in teacher for n in lengths) else None)
        _plot_passkey(axes[0][1], means, "mean pass-key accuracy, % (dashed: the teacher)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
