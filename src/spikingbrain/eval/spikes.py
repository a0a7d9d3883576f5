"""``spikingbrain spikes``: perplexity with and without spiking, firing statistics, sparsity, energy, plots and events.

The model reads the text in windows twice, spiking off then on (same windows); while spiking,
every projection input's spike counts are tallied (``spiking.stats``). Optional: a sweep over
k (the report's Table 11), the spike events of one forward pass (``spiking.events``), and PNGs
(a spike raster, per-layer sparsity, a count histogram, the k sweep).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..spiking.apply import observe_spikes, spikify, spiking_linears, spiking_off
from ..spiking.coding import encode
from ..spiking.events import SpikeEventRecorder, write_events
from ..spiking.stats import HISTOGRAM_BINS, SpikeStatistics
from .options import SWEEP_K
from .perplexity import perplexity

__all__ = ["RasterCapture", "spiking_report", "sweep_k", "export_events", "plot_report", "write_spikes_report", "format_summary"]


class RasterCapture:
    """Observer keeping the first ``tokens`` x ``channels`` counts of one module's first call."""

    def __init__(self, module: str, tokens: int = 24, channels: int = 16):
        self.module, self.tokens, self.channels = module, tokens, channels
        self.counts: torch.Tensor | None = None

    def __call__(self, name: str, counts: torch.Tensor, threshold: torch.Tensor) -> None:
        if name == self.module and self.counts is None:
            self.counts = counts.reshape(-1, counts.shape[-1])[: self.tokens, : self.channels].clone()


def _observers(*observers):
    def call(name, counts, threshold):
        for observer in observers:
            observer(name, counts, threshold)

    return call


def _dense_perplexity(model, token_ids, context, progress) -> dict:
    """Perplexity with spiking off; the model's spiking settings are restored afterwards."""
    with spiking_off(model):
        return perplexity(model, token_ids, context, progress=progress)


def spiking_report(
    model,
    token_ids: torch.LongTensor,
    k: float = 3.0,
    context: int = 2048,
    spike_query: bool = False,
    int8_kv: bool = False,
    dense: dict | None = None,
    raster: RasterCapture | None = None,
    progress: bool = False,
) -> dict:
    """``ppl`` (spiking off), ``ppl_spiking`` (on, same windows), their ratio and the firing statistics.

    The model is left spiking with ``k`` (``unspikify`` to undo). ``dense`` reuses an earlier
    spiking-off result.
    """
    dense = dense or _dense_perplexity(model, token_ids, context, progress)
    spikify(model, k=k, spike_query=spike_query, int8_kv=int8_kv)
    stats = SpikeStatistics({name: module.weight.shape[0] for name, module in spiking_linears(model).items()})
    observer = stats if raster is None else _observers(stats, raster)
    with observe_spikes(model, observer):
        spiking = perplexity(model, token_ids, context, progress=progress)
    return {
        "k": k,
        "spike_query": spike_query,
        "int8_kv": int8_kv,
        "ppl": dense["ppl"],
        "ppl_spiking": spiking["ppl"],
        "ppl_ratio": spiking["ppl"] / dense["ppl"],
        "tokens": spiking["tokens"],
        "context": context,
        "windows": spiking["windows"],
        **stats.summary(),
        "count_histogram": {"bins": f"|count| = 0 .. {HISTOGRAM_BINS - 2}, last bin larger", "values": stats.histogram().tolist()},
    }


def sweep_k(
    model, token_ids, ks=SWEEP_K, context: int = 2048, progress: bool = False, done: dict | None = None, **options
) -> list[dict]:
    """The report's Table 11 for this model: perplexity ratio and sparsity for each k.

    ``done`` is a ``spiking_report`` already run on the same tokens: its k is not rerun and its
    dense perplexity is reused.
    """
    dense = {"ppl": done["ppl"]} if done else _dense_perplexity(model, token_ids, context, progress)
    rows = []
    for k in ks:
        same = done is not None and done["k"] == k
        report = done if same else spiking_report(model, token_ids, k, context, dense=dense, progress=progress, **options)
        overall = report["overall"]
        rows.append(
            {
                "k": k,
                "ppl_spiking": report["ppl_spiking"],
                "ppl_ratio": report["ppl_ratio"],
                "sparsity_bitwise3": overall["sparsity_bitwise3"],
                "zero_fraction": overall["zero_fraction"],
                "share_at_most_7": overall["share_at_most_7"],
                "spikes_per_channel_bidirectional": overall["spikes_per_channel"]["bidirectional"],
            }
        )
    return rows


def export_events(model, token_ids: torch.LongTensor, path: str | Path, coding: str = "bidirectional") -> dict:
    """Write the spike events of one forward pass over ``token_ids`` (a spiking model) to ``path``; returns a summary."""
    recorder = SpikeEventRecorder(coding)
    with observe_spikes(model, recorder), torch.inference_mode():
        model(token_ids.view(1, -1), use_cache=False)
    path = write_events(path, recorder)
    events = sum(len(s["token"]) for s in recorder.streams)
    return {"path": str(path), "tokens": token_ids.numel(), "coding": coding, "events": events, "bytes": path.stat().st_size}


# ----------------------------------------------------------------------------- plots


def plot_report(report: dict, raster: RasterCapture | None, sweep: list[dict] | None, folder: Path) -> list[Path]:
    """Write the PNGs: spike raster, per-layer sparsity, count histogram and (with ``sweep``) the k sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(folder / name)

    if raster is not None and raster.counts is not None:
        counts = raster.counts.long()
        train = encode(counts, "bidirectional")  # [T, tokens, channels]
        steps = max(train.shape[0], 1)
        fig, ax = plt.subplots(figsize=(11, 4))
        for polarity, color in ((1, "tab:red"), (-1, "tab:blue")):
            t, token, channel = torch.nonzero(train == polarity, as_tuple=True)
            ax.scatter((token * steps + t).numpy(), channel.numpy(), marker="|", s=60, color=color, label=f"{polarity:+d} spike")
        for boundary in range(counts.shape[0] + 1):
            ax.axvline(boundary * steps - 0.5, color="gray", lw=0.3)
        ax.set_xlabel(f"time step ({steps} bidirectional bitwise steps per token; grey lines separate tokens)")
        ax.set_ylabel("input channel")
        ax.set_title(f"spike raster, {raster.module}, k = {report['k']}", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
        save(fig, "spikes-raster.png")

    layers = [entry for entry in report["layers"] if entry["layer"] is not None]
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.bar([e["layer"] for e in layers], [e["overall"]["sparsity_bitwise3"] for e in layers], color="tab:green", label="sparsity (bitwise, 3 steps)")
    ax.plot([e["layer"] for e in layers], [e["overall"]["zero_fraction"] for e in layers], "o-", color="black", label="zero counts")
    ax.axhline(0.6915, color="gray", ls="--", label="report, SpikingBrain-7B: 69.15 %")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    ax.set_title(f"per-layer sparsity at k = {report['k']}; perplexity ratio {report['ppl_ratio']:.3f}", fontsize=10)
    save(fig, "spikes-layers.png")

    values = report["count_histogram"]["values"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(values)), values, color="tab:purple")
    ax.set_yscale("log")
    ax.set_xlabel(f"|spike count| (last bar: > {len(values) - 2})")
    ax.set_ylabel("values")
    ax.set_title(f"spike counts at all projection inputs, k = {report['k']}", fontsize=10)
    save(fig, "spikes-histogram.png")

    if sweep:
        fig, ax1 = plt.subplots(figsize=(7, 4))
        ks = [row["k"] for row in sweep]
        ax1.plot(ks, [row["ppl_ratio"] for row in sweep], "o-", color="tab:red")
        ax1.set_xlabel("k (threshold = mean|x| / k)")
        ax1.set_ylabel("perplexity ratio (spiking / dense)", color="tab:red")
        ax2 = ax1.twinx()
        ax2.plot(ks, [row["sparsity_bitwise3"] for row in sweep], "s--", color="tab:green")
        ax2.set_ylabel("sparsity (bitwise, 3 steps)", color="tab:green")
        ax1.set_title("k sweep (the report's Table 11 for this model)", fontsize=10)
        save(fig, "spikes-k-sweep.png")
    return written


def write_spikes_report(
    model_ref: str,
    text: str,
    out: str | Path,
    k: float = 3.0,
    context: int = 2048,
    max_tokens: int | None = None,
    sweep: list[float] | None = None,
    events: str | Path | None = None,
    events_tokens: int = 16,
    spike_query: bool = False,
    int8_kv: bool = False,
    source: str | None = None,
) -> dict:
    """The spiking report of ``model_ref`` on ``text`` (named ``source``), with its PNGs and ``spikes.json`` in ``out``.

    ``sweep`` adds a k sweep; ``events`` writes the spike events of the first ``events_tokens`` tokens to that file.
    """
    from ..model.loading import load_model, load_tokenizer
    from ..runtime.machine import machine_info
    from ..runtime.records import write_json
    from .perplexity import text_token_ids

    start = time.perf_counter()
    tokenizer = load_tokenizer(model_ref)
    model = load_model(model_ref)
    token_ids = text_token_ids(tokenizer, text, max_tokens)
    raster = RasterCapture(next(iter(spiking_linears(model))))
    options = {"spike_query": spike_query, "int8_kv": int8_kv}
    report = spiking_report(model, token_ids, k, context, raster=raster, progress=True, **options)
    swept = sweep_k(model, token_ids, sweep, context, True, report, **options) if sweep else None
    if events:
        spikify(model, k=k, **options)
        report["events"] = export_events(model, token_ids[:events_tokens], events)
    folder = Path(out)
    report.update(
        model=str(model_ref), file=source, k_sweep=swept, machine=machine_info(),
        seconds=round(time.perf_counter() - start, 1),
    )
    report["plots"] = [str(p) for p in plot_report(report, raster, swept, folder)]
    write_json(folder / "spikes.json", report)
    return report


def format_summary(report: dict) -> str:
    """A few lines for people: perplexities, sparsity, energy and the k sweep."""
    o, e = report["overall"], report["energy"]
    lines = [
        f"model {report['model']}, {report['tokens']} tokens scored, k = {report['k']}",
        f"perplexity: dense {report['ppl']:.3f}, spiking {report['ppl_spiking']:.3f} (ratio {report['ppl_ratio']:.4f})",
        f"zero counts {o['zero_fraction']:.1%}, mean |count| {o['mean_abs_count']:.3f}, |count| <= 7: {o['share_at_most_7']:.1%}, "
        f"silent channels {o['silent_channel_fraction']:.1%}",
        "spikes per channel: " + ", ".join(f"{c} {v:.3f}" for c, v in o["spikes_per_channel"].items()),
        f"sparsity_bitwise3 {o['sparsity_bitwise3']:.1%} (report, SpikingBrain-7B: 69.15 %)",
        f"energy ({e['coding']}): {e['report_45nm']['saving_vs_fp16']:.1%} below FP16 MAC, "
        f"{e['report_45nm']['saving_vs_int8']:.1%} below INT8 MAC (report's 45 nm figures); "
        f"{e['snn_literature']['saving_vs_mac']:.1%} below MAC (SNN literature's 4.6 / 0.9 pJ)",
        e["note"],
    ]
    for row in report.get("k_sweep") or []:
        lines.append(
            f"  k {row['k']:<4}: perplexity ratio {row['ppl_ratio']:.4f}, sparsity_bitwise3 {row['sparsity_bitwise3']:.1%}, "
            f"|count| <= 7 {row['share_at_most_7']:.1%}"
        )
    return "\n".join(lines)
