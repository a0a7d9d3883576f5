"""Firing statistics, sparsity and energy estimates of a spiking model's projection inputs.

``SpikeStatistics`` is an observer for ``apply.observe_spikes``: it tallies, per module, the
spike counts it sees (streaming: nothing is kept but sums, a histogram and which channels
ever fired) and summarises them per layer, per projection and overall. Spikes per coding are
counted exactly (``|c|`` for ternary, the set bits of ``|c|`` for bidirectional bitwise, the set
bits of the two's-complement word for two's complement); binary coding is not counted because
it cannot carry signed counts.

Energy follows the report (section 5.5): a dense projection costs one multiply-accumulate
(MAC) per weight per token; a spiking one costs one accumulate per spike per output channel
(synaptic operations). Two conventions are given: the report's 45 nm figures (FP16 MAC
1.5 pJ, INT8 MAC 0.23 pJ, INT8 add 0.03 pJ) and the SNN literature's (MAC 4.6 pJ, AC 0.9 pJ).
Memory traffic is not counted.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .apply import projection_name
from .coding import steps_for_range

__all__ = [
    "CODINGS",
    "ENERGY_REPORT_45NM",
    "ENERGY_SNN_LITERATURE",
    "MEMORY_NOTE",
    "HISTOGRAM_BINS",
    "spikes_per_coding",
    "SpikeStatistics",
    "energy_estimate",
]

#: Codings for signed counts whose spikes are counted.
CODINGS = ("ternary", "bidirectional", "twos_complement")
#: pJ per operation, 45 nm (the SpikingBrain report, section 5.5).
ENERGY_REPORT_45NM = {"fp16_mac": 1.5, "int8_mac": 0.23, "int8_add": 0.03}
#: pJ per operation as commonly used in the SNN literature (45 nm, 32-bit).
ENERGY_SNN_LITERATURE = {"mac": 4.6, "ac": 0.9}
MEMORY_NOTE = (
    "Energy counts arithmetic only (MACs for dense projections, accumulates per spike and output channel for "
    "spiking ones); memory traffic (weights, activations, caches), control and data movement are not counted, "
    "so these are idealised lower bounds, as in the report."
)
#: |count| histogram bins 0 .. HISTOGRAM_BINS - 2, the last bin holds everything larger.
HISTOGRAM_BINS = 65


_BYTE_BITS = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def _set_bits(values: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each non-negative integer below 2^32 (int64)."""
    values = values.long()
    total = torch.zeros(values.shape, dtype=torch.long)
    for shift in (0, 8, 16, 24):
        total += _BYTE_BITS[(values >> shift) & 255]
    return total


def spikes_per_coding(counts: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, int]:
    """Total spikes needed to send these signed counts, per coding in ``CODINGS``; ``weights`` = how often each occurs."""
    counts = counts.long()
    weights = torch.ones_like(counts) if weights is None else weights.long()
    magnitude = counts.abs()
    low, high = (int(counts.min()), int(counts.max())) if counts.numel() else (0, 0)
    width = steps_for_range(low, high, "twos_complement")
    return {
        "ternary": int((weights * magnitude).sum()),
        "bidirectional": int((weights * _set_bits(magnitude)).sum()),
        "twos_complement": int((weights * _set_bits(counts & ((1 << width) - 1))).sum()),
    }


def _distinct_values(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of ``counts`` and how often each occurs (int64): one pass instead of one per statistic."""
    flat = counts.reshape(-1).long()
    low, high = int(flat.min()), int(flat.max())
    if high - low > 1 << 16:
        return torch.unique(flat, return_counts=True)
    occurrences = torch.bincount(flat - low, minlength=high - low + 1)
    present = occurrences > 0
    return torch.arange(low, high + 1)[present], occurrences[present]


class _Tally:
    """Running sums of one stream of spike counts (a module, or a merge of several)."""

    def __init__(self, channels: int = 0, out_features: int = 0):
        self.values = self.zeros = self.abs_sum = self.at_most_7 = self.bitwise3_spikes = 0
        self.macs = 0
        self.spikes = dict.fromkeys(CODINGS, 0)
        self.synaptic_ops = dict.fromkeys(CODINGS, 0)
        self.max_steps = dict.fromkeys(CODINGS, 0)
        self.histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.long)
        self.fired = torch.zeros(channels, dtype=torch.bool)  # per input channel (merges concatenate them)
        self.out_features = out_features

    def add(self, counts: torch.Tensor) -> None:
        counts = counts.reshape(-1, counts.shape[-1])
        values, occurrences = _distinct_values(counts)
        magnitude = values.abs()
        self.values += counts.numel()
        self.zeros += int(occurrences[values == 0].sum())
        self.abs_sum += int((occurrences * magnitude).sum())
        self.at_most_7 += int(occurrences[magnitude <= 7].sum())
        self.bitwise3_spikes += int((occurrences * _set_bits(magnitude.clamp(max=7))).sum())
        self.macs += counts.numel() * self.out_features
        low, high = int(values[0]), int(values[-1])
        for coding, spikes in spikes_per_coding(values, occurrences).items():
            self.spikes[coding] += spikes
            self.synaptic_ops[coding] += spikes * self.out_features
            self.max_steps[coding] = max(self.max_steps[coding], steps_for_range(low, high, coding))
        self.histogram.index_add_(0, magnitude.clamp(max=HISTOGRAM_BINS - 1), occurrences)
        self.fired |= (counts != 0).any(0)

    def merged(self, others: list["_Tally"]) -> "_Tally":
        """A tally of this one and ``others`` together."""
        tallies = [self, *others]
        total = _Tally()
        total.fired = torch.cat([tally.fired for tally in tallies])
        for tally in tallies:
            for field in ("values", "zeros", "abs_sum", "at_most_7", "bitwise3_spikes", "macs"):
                setattr(total, field, getattr(total, field) + getattr(tally, field))
            for coding in CODINGS:
                total.spikes[coding] += tally.spikes[coding]
                total.synaptic_ops[coding] += tally.synaptic_ops[coding]
                total.max_steps[coding] = max(total.max_steps[coding], tally.max_steps[coding])
            total.histogram += tally.histogram
        return total

    def channel_counts(self) -> tuple[int, int]:
        """``(channels, channels that never fired)``."""
        return self.fired.numel(), int((~self.fired).sum())

    def summary(self) -> dict:
        """The statistics as a JSON-ready dictionary."""
        n = max(self.values, 1)
        channels, silent = self.channel_counts()
        return {
            "counts": self.values,
            "zero_fraction": self.zeros / n,
            "mean_abs_count": self.abs_sum / n,
            "share_at_most_7": self.at_most_7 / n,
            "silent_channel_fraction": silent / channels if channels else 0.0,
            "spikes_per_channel": {coding: self.spikes[coding] / n for coding in CODINGS},
            "max_time_steps": dict(self.max_steps),
            "sparsity_bitwise3": 1 - self.bitwise3_spikes / (3 * n),
            "dense_macs": self.macs,
            "synaptic_ops": dict(self.synaptic_ops),
        }


class SpikeStatistics:
    """Observer that tallies spike counts per module; ``summary()`` gives per layer, per projection and overall figures."""

    def __init__(self, out_features: dict[str, int]):
        self.out_features = dict(out_features)
        self.tallies: dict[str, _Tally] = {}

    def __call__(self, name: str, counts: torch.Tensor, threshold: torch.Tensor) -> None:
        if name not in self.tallies:
            self.tallies[name] = _Tally(counts.shape[-1], self.out_features[name])
        self.tallies[name].add(counts)

    def histogram(self) -> torch.Tensor:
        """Counts of ``|count|`` = 0, 1, ..., with the last bin for everything larger, over all modules."""
        return sum((t.histogram for t in self.tallies.values()), torch.zeros(HISTOGRAM_BINS, dtype=torch.long))

    def summary(self) -> dict:
        """``overall``, ``by_projection`` (merged over layers) and ``layers`` (each with its projections and overall)."""
        if not self.tallies:
            raise ValueError("no spikes were observed; run the spiking model inside observe_spikes(model, statistics)")
        by_layer: dict[int | None, dict[str, list[_Tally]]] = defaultdict(lambda: defaultdict(list))
        by_projection: dict[str, list[_Tally]] = defaultdict(list)
        for name, tally in self.tallies.items():
            layer, projection = projection_name(name)
            by_layer[layer][projection].append(tally)
            by_projection[projection].append(tally)
        everything = list(self.tallies.values())
        overall = everything[0].merged(everything[1:])
        layers = []
        for layer in sorted(by_layer, key=lambda i: -1 if i is None else i):
            projections = {p: ts[0].merged(ts[1:]) for p, ts in by_layer[layer].items()}
            merged = list(projections.values())
            layers.append(
                {
                    "layer": layer,
                    "overall": merged[0].merged(merged[1:]).summary(),
                    "projections": {p: t.summary() for p, t in projections.items()},
                }
            )
        return {
            "overall": overall.summary(),
            "by_projection": {p: ts[0].merged(ts[1:]).summary() for p, ts in by_projection.items()},
            "layers": layers,
            "energy": energy_estimate(overall.summary()),
        }


def energy_estimate(stats: dict, coding: str = "bidirectional") -> dict:
    """Arithmetic energy (pJ) of the observed projections under both conventions, from a ``summary()`` entry."""
    if coding not in CODINGS:
        raise ValueError(f"energy needs a coding in {list(CODINGS)}, got {coding!r}")
    macs, ops = stats["dense_macs"], stats["synaptic_ops"][coding]
    report = {
        "fp16_mac_pJ": macs * ENERGY_REPORT_45NM["fp16_mac"],
        "int8_mac_pJ": macs * ENERGY_REPORT_45NM["int8_mac"],
        "spiking_int8_add_pJ": ops * ENERGY_REPORT_45NM["int8_add"],
    }
    snn = {"ann_mac_pJ": macs * ENERGY_SNN_LITERATURE["mac"], "snn_ac_pJ": ops * ENERGY_SNN_LITERATURE["ac"]}
    spiking = report["spiking_int8_add_pJ"]
    return {
        "coding": coding,
        "dense_macs": macs,
        "synaptic_ops": ops,
        "report_45nm": {
            **report,
            "saving_vs_fp16": 1 - spiking / report["fp16_mac_pJ"] if macs else 0.0,
            "saving_vs_int8": 1 - spiking / report["int8_mac_pJ"] if macs else 0.0,
        },
        "snn_literature": {**snn, "saving_vs_mac": 1 - snn["snn_ac_pJ"] / snn["ann_mac_pJ"] if macs else 0.0},
        "per_token_equivalent_pJ_per_mac": spiking / macs if macs else 0.0,
        "note": MEMORY_NOTE,
        "pJ_per_operation": {"report_45nm": ENERGY_REPORT_45NM, "snn_literature": ENERGY_SNN_LITERATURE},
    }
