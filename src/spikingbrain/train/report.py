"""The training curve of a run: held-out perplexity ratio (student / teacher), and pass-key accuracy where the run
measured it, against training tokens."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["training_curve", "plot_training_curve"]


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


def plot_training_curve(run: str | Path) -> tuple[Path, Path]:
    """Write ``curve.json`` and ``curve.png`` into the run folder; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    curve = training_curve(run)
    json_path, png_path = run / "curve.json", run / "curve.png"
    json_path.write_text(json.dumps(curve, indent=1))
    with_passkey = [p for p in curve["points"] if "passkey" in p]
    fig, axes = plt.subplots(1, 2 if with_passkey else 1, figsize=(13 if with_passkey else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    stages = list(dict.fromkeys(p["stage"] for p in curve["points"]))
    for stage in stages:
        pts = [p for p in curve["points"] if p["stage"] == stage]
        # the untrained conversion sits at 0 tokens: plot it at 1 token on the log axis
        ax.plot([max(p["tokens_seen"], 1) for p in pts], [p["ppl_ratio"] for p in pts], "o-", label=stage)
    if with_passkey:
        _plot_passkey(axes[0][1], with_passkey, curve["teacher_passkey"] or {})
    ax.set_xscale("log")
    ratios = [p["ppl_ratio"] for p in curve["points"]]
    if max(ratios) > 3 * min(ratios):  # a conversion from far away: a log axis; a narrow range reads better linear
        ax.set_yscale("log")
    ax.axhline(1.15, color="gray", linestyle="--", linewidth=1, label="target 1.15")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("training tokens (the untrained conversion is drawn at 1)")
    ax.set_ylabel("held-out perplexity / teacher's")
    ax.set_title(f"{run.name}: teacher perplexity {curve['teacher_ppl']:.2f}" if curve["teacher_ppl"] else run.name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def _plot_passkey(ax, points: list[dict], teacher: dict[str, float]) -> None:
    """Pass-key accuracy by prompt length against training tokens; the teacher's as dashed lines."""
    lengths = sorted({n for p in points for n in p["passkey"]}, key=int)
    for i, length in enumerate(lengths):
        pts = [p for p in points if length in p["passkey"]]
        line = ax.plot([max(p["tokens_seen"], 1) for p in pts], [100 * p["passkey"][length] for p in pts], "o-", label=f"{length} tokens")
        if length in teacher:
            ax.axhline(100 * teacher[length], color=line[0].get_color(), linestyle="--", linewidth=1,
                       label="teacher (dashed)" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("training tokens (the untrained conversion is drawn at 1)")
    ax.set_ylabel("pass-key accuracy, % (dashed: the teacher)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
