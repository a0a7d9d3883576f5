"""Figures of the benchmark, evaluation and demo reports: matplotlib (Agg) figures with log-log axes, saved as PNG."""

from __future__ import annotations

from pathlib import Path

__all__ = ["COLORS", "colors_of", "new_figure", "save_loglog", "save_figure", "machine_title"]

#: Line colours of the two models of a side-by-side measurement.
COLORS = {"ours": "tab:blue", "baseline": "tab:gray", "teacher": "tab:gray"}
#: Colours of further models in one figure (``--also``), in order; none of them is ``COLORS``'.
FURTHER_COLORS = ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def colors_of(names) -> dict[str, str]:
    """A colour per model name: ``COLORS`` for ours and the baseline, then ``FURTHER_COLORS`` in turn (cycling)."""
    further = iter(FURTHER_COLORS * (1 + len(list(names)) // len(FURTHER_COLORS)))
    return {name: COLORS[name] if name in COLORS else next(further) for name in names}


def new_figure(columns: int = 2, size: tuple[float, float] = (12, 4.5)):
    """A matplotlib figure (Agg backend) and its row of ``columns`` axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=size, squeeze=False)
    return fig, list(axes[0])


def machine_title(result: dict, what: str) -> str:
    """``what``, the CPU, the threads and the load average at the start of a benchmark result."""
    m = result["machine"]
    return f"{what}, {m['cpu']}, {m['torch_threads']} threads, load {result['load_average']['start']}"


def save_figure(fig, path: str | Path, title: str | None = None) -> Path:
    """Lay out, title and save ``fig`` as a PNG at ``path`` (creating its folder); close it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_loglog(fig, axes, path: str | Path, xlabel: str, title: str | None = None) -> Path:
    """Give ``axes`` log2-x / log-y scales, grids, legends and ``xlabel``, then :func:`save_figure`."""
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path, title)
