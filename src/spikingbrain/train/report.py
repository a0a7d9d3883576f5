"""The training curve of a run: held-out perplexity ratio (student / teacher) against training tokens."""

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
    points = [
        {k: r[k] for k in ("step", "stage", "tokens_seen", "ppl", "ppl_ratio", "fraction_of_teacher_pretraining") if k in r}
        for r in records
        if "ppl_ratio" in r
    ]
    return {"run": str(run), "teacher_ppl": teacher, "points": points}


def plot_training_curve(run: str | Path) -> tuple[Path, Path]:
    """Write ``curve.json`` and ``curve.png`` into the run folder; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    curve = training_curve(run)
    json_path, png_path = run / "curve.json", run / "curve.png"
    json_path.write_text(json.dumps(curve, indent=1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    stages = list(dict.fromkeys(p["stage"] for p in curve["points"]))
    for stage in stages:
        pts = [p for p in curve["points"] if p["stage"] == stage]
        # the untrained conversion sits at 0 tokens: plot it at 1 token on the log axis
        ax.plot([max(p["tokens_seen"], 1) for p in pts], [p["ppl_ratio"] for p in pts], "o-", label=stage)
    ax.set_xscale("log")
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
