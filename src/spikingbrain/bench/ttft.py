"""``spikingbrain bench ttft``: time to first token against prompt length, a SpikingBrain model against a baseline Transformer.

Time to first token (TTFT) is one prefill call ``model(ids, use_cache=True, logits_to_keep=1)``
followed by the greedy choice of the first new token, under ``torch.inference_mode()``, on
the same random token ids for both models, in the same process with the same threads.

- **Ours** (default ``spikingbrain-smollm2``, the shipped GLA + SWA conversion) runs the lengths
  from 512 to 1M tokens; it streams long prompts through its cache.
- **The baseline** (default: the teacher SmolLM2-135M-Instruct run by Hugging Face
  transformers' own Llama code with ``attn_implementation="sdpa"``) runs the same lengths up
  to a time cap. Past the teacher's ``max_position_embeddings`` (8192) it still runs: RoPE is
  defined at every position, so the timing is the cost a user would pay, but the teacher was
  never trained there (such rows say ``beyond_trained_context``).

At each length the models alternate (the order flips every repeat) and each repeats up to
``--repeats`` times or ``--max-seconds``; the median is reported. A length is skipped when the
previous length's time, scaled linearly (ours) or quadratically (baseline), predicts more
than ``--cap`` seconds for one run. The baseline's times are fitted with
``a + b L + c L^2`` and ours with ``a + b L`` (non-negative least squares on relative
errors) to extrapolate the ratio to lengths the baseline did not run; such ratios are marked
``extrapolated``. The JSON is rewritten after every length, so an interrupted run keeps
its partial results (``complete: false``).
"""

from __future__ import annotations

import itertools
import os
import resource
import statistics
import threading
import time
from pathlib import Path

from ..runtime.candidates import Candidate, check_lengths
from ..runtime.lengths import format_length

__all__ = ["run", "first_token", "fit_cost", "predict", "PeakMemory", "format_report", "DEFAULT_LENGTHS"]

DEFAULT_LENGTHS = tuple(512 * 2**i for i in range(12))  # 512 ... 1M
WARMUP = 1024  # tokens of the untimed warm-up call of each model
TARGETS = {
    "ratio_32k": 5.0,
    "ratio_128k": 20.0,
    "long_over_4k_throughput": 0.90,
    "short_prompt_throughput": 0.90,
}


def first_token(model, ids) -> int:
    """Prefill ``ids`` and return the greedy first new token (the work of time to first token)."""
    out = model(ids, use_cache=True, logits_to_keep=1)
    return int(out.logits[0, -1].argmax())


def _rss_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager sampling the process's resident memory every ``interval`` s: ``peak - before`` in ``extra_bytes``."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.before = self.peak = self.extra_bytes = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and rss > self.peak:
                self.peak = rss

    def __enter__(self) -> "PeakMemory":
        self.before = self.peak = _rss_bytes()
        if self.before is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.before is None:
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)
        self.extra_bytes = self.peak - self.before


# ----------------------------------------------------------------------------- cost fits


def fit_cost(lengths: list[int], seconds: list[float], degree: int) -> dict:
    """Non-negative least-squares fit of ``seconds ~ sum_i c_i L^i`` (``i <= degree``) on relative errors.

    Every subset of the terms is fitted by least squares and the best fit whose coefficients
    are all non-negative is kept (exact for these few terms), so a noisy quadratic term never
    turns negative and bends the extrapolation down.
    """
    import numpy as np

    if len(lengths) != len(seconds) or len(lengths) < degree + 1:
        raise ValueError(f"a degree-{degree} fit needs at least {degree + 1} measured lengths, got {len(lengths)}")
    L = np.asarray(lengths, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    design = np.stack([L**i for i in range(degree + 1)], axis=1) / t[:, None]  # rows scaled by 1/t
    target = np.ones_like(t)
    best = None
    for size in range(1, degree + 2):
        for terms in itertools.combinations(range(degree + 1), size):
            coef, *_ = np.linalg.lstsq(design[:, terms], target, rcond=None)
            if (coef < 0).any():
                continue
            error = float(np.sum((design[:, terms] @ coef - target) ** 2))
            if best is None or error < best[0] - 1e-15:
                full = np.zeros(degree + 1)
                full[list(terms)] = coef
                best = (error, full)
    coefficients = [float(c) for c in best[1]]
    fitted = [predict(coefficients, n) for n in lengths]
    return {
        "degree": degree,
        "coefficients": coefficients,
        "formula": " + ".join(f"{c:.4g}" + ("" if i == 0 else " L" if i == 1 else f" L^{i}") for i, c in enumerate(coefficients)),
        "max_relative_error": max(abs(f - s) / s for f, s in zip(fitted, seconds)),
        "lengths": list(lengths),
    }


def predict(coefficients: list[float], length: int) -> float:
    """The fitted cost ``sum_i c_i L^i`` at ``length``."""
    return sum(c * float(length) ** i for i, c in enumerate(coefficients))


def _predicted(candidate: Candidate, length: int) -> float | None:
    """One run's time at ``length``: the cost fit once enough lengths are measured, else the longest row scaled
    linearly (ours) or quadratically (baseline)."""
    if not candidate.rows:
        return None
    if len(candidate.rows) > candidate.degree + 1:
        fit = fit_cost([r["length"] for r in candidate.rows], [r["median_s"] for r in candidate.rows], candidate.degree)
        return predict(fit["coefficients"], length)
    last = candidate.rows[-1]
    return last["median_s"] * (length / last["length"]) ** candidate.degree


def run(
    candidates: list[Candidate],
    lengths: dict[str, list[int]],
    out: Path,
    cap: float = 300.0,
    repeats: int = 3,
    max_seconds: float = 60.0,
    extrapolate: list[int] = (131072, 1048576, 4194304),
    seed: int = 0,
    plot_png: bool = True,
    notes: list[str] = (),
    bar_desc: str = "bench ttft",
    deadline: float | None = None,
) -> dict:
    """Time every candidate at its lengths (alternating, medians), fit, extrapolate, write JSON (and PNG).

    With ``deadline`` (a ``time.time()`` value) a length whose predicted runs would end after it is skipped.
    """
    import torch

    from ..runtime.machine import load_average, machine_info, thread_env
    from ..runtime.progress import progress
    from ..runtime.records import command_line, write_json

    if cap <= 0 or repeats < 1 or max_seconds <= 0:
        raise ValueError(f"--cap and --max-seconds must be > 0 and --repeats >= 1 (got {cap}, {max_seconds}, {repeats})")
    notes = list(notes)
    plan = {c.name: sorted(set(lengths[c.name])) for c in candidates}
    for c in candidates:
        notes += check_lengths(c, plan[c.name])
    all_lengths = sorted(set().union(*plan.values()))
    vocab = min(int(c.model.config.vocab_size) for c in candidates)
    ids = torch.randint(0, vocab, (1, max(all_lengths)), generator=torch.Generator().manual_seed(seed))
    skipped: list[dict] = []
    stopped: dict[str, str] = {}
    started = time.time()
    result = {
        "benchmark": "ttft",
        "argv": command_line(),
        "machine": machine_info(),
        "thread_env": thread_env(),
        "load_average": {"start": load_average()},
        "settings": {"lengths": plan, "cap_s": cap, "repeats": repeats, "max_seconds": max_seconds, "seed": seed,
                     "dtype": str(torch.get_default_dtype()).replace("torch.", ""),
                     "tokens": "random ids, the same prefix for every model", "timed": "model(ids, use_cache=True, logits_to_keep=1) + argmax"},
        "notes": notes,
        "complete": False,
    }
    out = Path(out)
    result["files"] = {"json": str(out / "ttft.json")}

    def save() -> None:
        result.update(
            candidates={c.name: {"label": c.label, "fit_degree": c.degree, "trained_length": c.trained_length, "rows": c.rows}
                        for c in candidates},
            skipped=skipped, wall_seconds=time.time() - started,
        )
        result["load_average"]["end"] = load_average()
        result.update(_analysis(candidates, extrapolate))
        write_json(out / "ttft.json", result)

    with torch.inference_mode(), progress(sum(len(v) for v in plan.values()), bar_desc) as bar:
        for c in candidates:  # warm-up at up to WARMUP tokens; a cap below the first run it predicts stops the model
            first = plan[c.name][0]
            warm = min(first, WARMUP)
            bar.set_postfix_str(f"warm-up {c.name}")
            start = time.perf_counter()
            first_token(c.model, ids[:, :warm])
            guess = (time.perf_counter() - start) * (first / warm) ** c.degree
            if guess > cap:
                stopped[c.name] = (
                    f"--cap {cap:g} s is shorter than one run of {c.label} at {first} tokens "
                    f"(about {guess:.1f} s from a warm-up at {warm}); raise --cap"
                )
        for length in all_lengths:
            active = []
            for c in candidates:
                if length not in plan[c.name]:
                    continue
                guess = _predicted(c, length)
                reason = stopped.get(c.name)
                if not reason and guess is not None and guess > cap:
                    reason = f"predicted {guess:.0f} s > cap {cap:g} s"
                if not reason and guess is not None and deadline is not None and time.time() + guess > deadline:
                    reason = f"predicted {guess:.0f} s would pass the time budget"
                if reason:
                    skipped.append({"candidate": c.name, "length": length, "reason": reason})
                    stopped.setdefault(c.name, reason)
                    bar.update(1)
                else:
                    active.append(c)
            times = {c.name: [] for c in active}
            memory = {c.name: None for c in active}
            for r in range(repeats):
                order = active if r % 2 == 0 else active[::-1]
                for c in order:
                    if times[c.name] and sum(times[c.name]) >= max_seconds:
                        continue
                    bar.set_postfix_str(f"{c.name} T={format_length(length)} run {r + 1}")
                    try:
                        with PeakMemory() as mem:
                            start = time.perf_counter()
                            first_token(c.model, ids[:, :length])
                            times[c.name].append(time.perf_counter() - start)
                    except (RuntimeError, MemoryError) as err:
                        stopped[c.name] = f"failed at {length} tokens: {type(err).__name__}: {str(err)[:200]}"
                        skipped.append({"candidate": c.name, "length": length, "reason": stopped[c.name]})
                        break
                    memory[c.name] = max(memory[c.name] or 0, mem.extra_bytes or 0) if mem.extra_bytes is not None else None
            for c in active:
                if times[c.name]:
                    median = statistics.median(times[c.name])
                    c.rows.append({
                        "length": length, "times_s": times[c.name], "median_s": median, "tokens_per_s": length / median,
                        "peak_extra_rss_bytes": memory[c.name], "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                        "load_average": load_average(),
                        "beyond_trained_context": bool(c.trained_length and length > c.trained_length),
                    })
                bar.update(1)
            save()
    result["complete"] = True
    if plot_png and any(c.rows for c in candidates):
        result["files"]["png"] = str(plot(result, out / "ttft.png"))
    save()
    return result


def _analysis(candidates: list[Candidate], extrapolate: list[int]) -> dict:
    """Fits, measured and extrapolated ratios (baseline / ours) and the issue's targets."""
    fits, notes = {}, []
    for c in candidates:
        if len(c.rows) >= c.degree + 1:
            fits[c.name] = fit_cost([r["length"] for r in c.rows], [r["median_s"] for r in c.rows], c.degree)
        elif c.rows:
            notes.append(f"{c.name}: {len(c.rows)} measured length(s), too few for a degree-{c.degree} fit")
    rows = {c.name: {r["length"]: r for r in c.rows} for c in candidates}
    ratios = []
    if "ours" in rows and "baseline" in rows:
        targets_lengths = set(rows["ours"]) | set(rows["baseline"]) | set(extrapolate)
        for length in sorted(targets_lengths):
            seconds, from_fit = {}, {}
            for name in ("ours", "baseline"):
                if length in rows[name]:
                    seconds[name], from_fit[name] = rows[name][length]["median_s"], False
                elif name in fits:
                    seconds[name], from_fit[name] = predict(fits[name]["coefficients"], length), True
            if len(seconds) == 2 and seconds["ours"] > 0:
                ratios.append({"length": length, "ours_s": seconds["ours"], "baseline_s": seconds["baseline"],
                               "ratio": seconds["baseline"] / seconds["ours"], "extrapolated": any(from_fit.values()),
                               "ours_extrapolated": from_fit["ours"], "baseline_extrapolated": from_fit["baseline"]})
    return {"fits": fits, "ratios": ratios, "fit_notes": notes, "targets": _targets(rows, ratios)}


def _targets(rows: dict[str, dict[int, dict]], ratios: list[dict]) -> dict:
    """The issue's TTFT targets that this run could evaluate (measured or marked extrapolated)."""
    targets = {}
    by_length = {r["length"]: r for r in ratios}
    for key, length, measured_only in (("ratio_32k", 32768, True), ("ratio_128k", 131072, False)):
        r = by_length.get(length)
        if r and not (measured_only and r["extrapolated"]):
            targets[key] = {"name": f"baseline / ours TTFT at {format_length(length)}", "value": r["ratio"], "target": TARGETS[key],
                            "pass": r["ratio"] >= TARGETS[key], "extrapolated": r["extrapolated"]}
    ours = rows.get("ours", {})
    if 4096 in ours and max(ours, default=0) > 4096:
        longest = max(ours)
        value = ours[longest]["tokens_per_s"] / ours[4096]["tokens_per_s"]
        targets["long_over_4k_throughput"] = {"name": f"ours tokens/s at {format_length(longest)} / at 4k", "value": value,
                                              "target": TARGETS["long_over_4k_throughput"],
                                              "pass": value >= TARGETS["long_over_4k_throughput"], "extrapolated": False}
    base = rows.get("baseline", {})
    if 512 in ours and 512 in base:
        value = ours[512]["tokens_per_s"] / base[512]["tokens_per_s"]
        targets["short_prompt_throughput"] = {"name": "ours / baseline prefill tokens/s at 512", "value": value,
                                              "target": TARGETS["short_prompt_throughput"],
                                              "pass": value >= TARGETS["short_prompt_throughput"], "extrapolated": False}
    return targets


def plot(result: dict, path: Path) -> Path:
    """Log-log TTFT curves (measured points, fitted lines) and the baseline / ours ratio, as a PNG."""
    from ..runtime.plots import colors_of, machine_title, new_figure, save_loglog

    fig, (ax1, ax2) = new_figure()
    span = [r["length"] for r in result["ratios"]] + [row["length"] for c in result["candidates"].values() for row in c["rows"]]
    colors = colors_of(result["candidates"])
    for name, c in result["candidates"].items():
        if not c["rows"]:
            continue
        x = [r["length"] for r in c["rows"]]
        ax1.plot(x, [r["median_s"] for r in c["rows"]], "o", color=colors[name], label=f"{c['label']} (measured)")
        if name in result["fits"]:
            grid = sorted({*span, *x})
            ax1.plot(grid, [predict(result["fits"][name]["coefficients"], n) for n in grid], "--", color=colors[name],
                     label=f"{name} fit: {result['fits'][name]['formula']} s")
    ax1.set_ylabel("time to first token (s)")
    ax1.set_title("TTFT (log-log)")
    measured = [r for r in result["ratios"] if not r["extrapolated"]]
    guessed = [r for r in result["ratios"] if r["extrapolated"]]
    ax2.plot([r["length"] for r in measured], [r["ratio"] for r in measured], "o-", color="tab:green", label="measured")
    ax2.plot([r["length"] for r in guessed], [r["ratio"] for r in guessed], "o", mfc="none", color="tab:green", label="extrapolated (fits)")
    ax2.axhline(1, color="black", lw=0.8)
    ax2.set_ylabel("baseline TTFT / ours")
    ax2.set_title("speed-up of ours")
    if not result["ratios"]:
        ax2.set_axis_off()  # no baseline measured: no ratio to show
    axes = (ax1, ax2) if result["ratios"] else (ax1,)
    return save_loglog(fig, axes, path, "prompt length (tokens)", machine_title(result, "time to first token"))


def format_report(result: dict) -> str:
    """The readable table of a TTFT result."""
    lines = [f"{'model':<9} {'T':>6} {'TTFT s':>9} {'runs':>5} {'tokens/s':>9} {'extra RSS MiB':>14}"]
    for name, c in result["candidates"].items():
        for r in c["rows"]:
            extra = "-" if r["peak_extra_rss_bytes"] is None else f"{r['peak_extra_rss_bytes'] / 2**20:.0f}"
            flag = "  (beyond trained context)" if r["beyond_trained_context"] else ""
            lines.append(f"{name:<9} {format_length(r['length']):>6} {r['median_s']:9.3f} {len(r['times_s']):5d} "
                         f"{r['tokens_per_s']:9.1f} {extra:>14}{flag}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['candidate']} at {format_length(s['length'])}: {s['reason']}")
    for name, fit in result["fits"].items():
        lines.append(f"fit {name}: t = {fit['formula']} s (max relative error {fit['max_relative_error']:.1%})")
    if result["ratios"]:
        lines.append(f"{'T':>6} {'ratio':>8}")
        for r in result["ratios"]:
            lines.append(f"{format_length(r['length']):>6} {r['ratio']:7.2f}x" + ("  extrapolated" if r["extrapolated"] else ""))
    for t in result["targets"].values():
        lines.append(f"{t['name']:<44} {t['value']:8.2f} (target >= {t['target']:g}) {'PASS' if t['pass'] else 'MISS'}"
                     + (" (extrapolated)" if t["extrapolated"] else ""))
    lines += result["notes"] + result["fit_notes"]
    lines.append(f"load average: start {result['load_average']['start']}, end {result['load_average']['end']}")
    return "\n".join(lines)
