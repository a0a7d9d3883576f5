"""``spikingbrain demo`` (``make demo``): the main job on the embedded default, offline, in about ten minutes on 2 cores.

It loads the teacher (SmolLM2-135M-Instruct, run by Hugging Face transformers with SDPA)
and our model (the shipped conversion ``spikingbrain-smollm2``; for another ``--teacher``, or
when the shipped delta is missing, a quick conversion made first by
:func:`spikingbrain.train.quick.quick_conversion`), then measures, with progress shown:

1. quality: held-out perplexity of both (the held-out split of Python's ``pydoc_data``
   topics, seed 0, 10 %, its first 8192 tokens in 2048-token windows: the measurement of
   docs/spikingbrain-smollm2-curve.json) and pass-key retrieval at a few lengths, beside the
   training curves the shipped models' deltas carry (:func:`training_section`);
2. a few sample generations (greedy, chat template);
3. decode latency per token and cache bytes per sequence at a few contexts
   (:mod:`spikingbrain.bench.decode`);
4. spiking sparsity and energy (:func:`spiking_section`);
5. time to first token against prompt length (:mod:`spikingbrain.bench.ttft`): ours to 64k,
   the teacher as far as the time budget allows, the ratio extrapolated beyond.

It writes ``report.md``, ``demo.json`` and the PNGs to ``--out`` and prints a summary
table. A step that fails is reported and the others still run; an interrupted run
(Ctrl-C) writes what it has, marked partial. ``--long`` runs longer lengths.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from .runtime.lengths import format_length

__all__ = ["run_demo", "also_models", "held_out_ids", "spiking_section", "training_section", "summary_rows", "format_summary", "SAMPLE_PROMPTS", "QUICK", "LONG"]

SAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is a Python list? Answer in one sentence.",
)
SPIKING_TOKENS = 1024  # held-out tokens read with spiking off and on
MEMORY_LENGTHS = (131072, 1048576)  # cache bytes per sequence computed (not allocated) at these lengths
QUICK = {"ttft": [1024, 4096, 16384, 65536], "baseline_ttft": [1024, 2048, 4096, 8192, 16384],
         "passkey": [1024, 4096], "decode": [1024, 16384, 65536]}
LONG = {"ttft": [512 * 2**i for i in range(10)], "baseline_ttft": [512 * 2**i for i in range(7)],
        "passkey": [2048, 8192, 32768], "decode": [1024, 4096, 16384, 65536, 262144]}


def held_out_ids(tokenizer, max_tokens: int = 8192, seed: int = 0, fraction: float = 0.1):
    """The first ``max_tokens`` of the held-out pydoc documents joined by EOS (as conversion training measures them)."""
    from .train.data import joined_token_ids, load_documents, split_held_out

    _, held = split_held_out(load_documents(["pydoc"]), fraction, seed)
    return joined_token_ids(held, tokenizer, max_tokens)


def spiking_section(ours, ids, report_dir: Path, context: int) -> dict:
    """Spiking (k = 3) perplexity cost, sparsity and energy of ``ours`` on the token ids ``ids``, with the ``spikes`` PNGs.

    Returns ``{"markdown": str, "summary": [(metric, teacher, ours, ratio), ...], "json": dict}``;
    ``ours`` computes as it did before (its spiking settings are restored).
    """
    from .eval.spikes import RasterCapture, plot_report, spiking_report
    from .spiking.apply import spiking_linears, spiking_off

    raster = RasterCapture(next(iter(spiking_linears(ours))))
    with spiking_off(ours):
        report = spiking_report(ours, ids, k=3.0, context=min(context, len(ids)), raster=raster, progress=True)
    plots = plot_report(report, raster, None, report_dir / "spikes")
    o, e = report["overall"], report["energy"]["report_45nm"]
    summary = [
        ("perplexity with spiking k=3 (ours)", "-", f"{report['ppl_spiking']:.2f}", f"spiking/dense {report['ppl_ratio']:.3f}"),
        ("spike sparsity (bitwise, 3 steps)", "-", f"{o['sparsity_bitwise3']:.1%}", "report 69.15 %"),
        ("spiking energy below FP16 MAC (arithmetic only)", "-", f"{e['saving_vs_fp16']:.1%}", "report 97.7 %"),
    ]
    markdown = "\n".join([
        f"Spiking at k = 3 on {report['tokens']} held-out tokens: perplexity {report['ppl']:.2f} dense, "
        f"{report['ppl_spiking']:.2f} spiking ({report['ppl_ratio']:.3f}x). Zero counts {o['zero_fraction']:.1%}, "
        f"|count| <= 7 {o['share_at_most_7']:.1%}, spikes per value (bidirectional) {o['spikes_per_channel']['bidirectional']:.2f}, "
        f"sparsity_bitwise3 {o['sparsity_bitwise3']:.1%}. Energy (report's 45 nm figures): {e['saving_vs_fp16']:.1%} below FP16 MAC, "
        f"{e['saving_vs_int8']:.1%} below INT8 MAC; memory traffic is not counted. `spikingbrain spikes` gives the full report.",
        "",
        *[f"![{path.stem}](spikes/{path.name})" for path in plots],
    ])
    keep = ("k", "ppl", "ppl_spiking", "ppl_ratio", "tokens", "overall", "energy")
    return {"markdown": markdown, "summary": summary, "json": {key: report[key] for key in keep}}


def training_section(names: list[str], out: Path) -> dict | None:
    """The training curves the shipped models among ``names`` carry: each one's tokens, share of the teacher's
    pretraining and last evaluation, and ``training-curves.png`` with all of them; None when none carries one."""
    from .model.names import SHIPPED_MODELS
    from .model.shipped import shipped_training_curve
    from .train.report import plot_training_curves

    curves = {name: curve for name in names if name in SHIPPED_MODELS and (curve := shipped_training_curve(name))}
    if not curves:
        return None
    models = {}
    for name, curve in curves.items():
        last = curve["points"][-1]
        models[name] = {key: last[key] for key in ("tokens_seen", "fraction_of_teacher_pretraining", "ppl_ratio", "passkey") if key in last}
    png = plot_training_curves(curves, out / "training-curves.png", "shipped conversions of the teacher, as trained")
    return {"models": models, "files": {"png": str(png)}}


def _samples(models: dict, tokenizer, new_tokens: int) -> list[dict]:
    """Greedy answers of every model to :data:`SAMPLE_PROMPTS`, with their speed and whether they degenerate into
    repetition (``eval.needle.is_degenerate``)."""
    from .eval.needle import is_degenerate
    from .eval.passkey import greedy_tokens
    from .train.data import chat_prompt_ids

    rows = []
    for prompt in SAMPLE_PROMPTS:
        ids = chat_prompt_ids(tokenizer, prompt)
        row = {"prompt": prompt}
        for name, model in models.items():
            start = time.perf_counter()
            tokens = greedy_tokens(model, ids, new_tokens)
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            row[name] = {"text": text, "seconds": time.perf_counter() - start, "degenerate": is_degenerate(text)}
        rows.append(row)
    return rows


def also_models(refs: list[str], teacher_ref: str, model_ref: str) -> list[str]:
    """The further models a demo scores beside ours: ``refs``, where ``auto`` stands for every shipped conversion of
    ``teacher_ref`` other than ``model_ref``."""
    from .model.shipped import shipped_conversions_of

    found: list[str] = []
    for ref in refs:
        for name in (shipped_conversions_of(teacher_ref) if ref == "auto" else [ref]):
            if name != model_ref and name not in found:
                found.append(name)
    return found


def _error(result: dict, name: str) -> str | None:
    """The error of the step ``name`` in ``result``."""
    return next(s.get("error") for s in result["steps"] if s["name"] == name)


def _step(result: dict, name: str, title: str, fn) -> object:
    """Run one demo step with a header on stderr; a failure is recorded (the demo goes on)."""
    index = len(result["steps"]) + 1
    print(f"[{index}] {title}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    entry = {"name": name, "title": title}
    result["steps"].append(entry)
    try:
        value = fn()
        entry["status"] = "done"
        return value
    except (RuntimeError, ValueError, OSError, MemoryError) as err:
        entry["status"] = "failed"
        entry["error"] = f"{type(err).__name__}: {err}"
        result["partial"] = True
        print(f"    failed: {entry['error']}", file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)
        return None
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 2)
        print(f"    {entry.get('status', 'interrupted')} in {entry['seconds']:.1f} s", file=sys.stderr, flush=True)


def _quick_conversion(teacher_ref: str, out: Path, steps: int) -> dict:
    """The demo step that converts the teacher quickly; returns where the model is and how it was trained."""
    from .train.quick import quick_conversion

    folder, summary = quick_conversion(teacher_ref, out / "quick-conversion", distill_steps=steps)
    return {"folder": str(folder), **{key: summary[key] for key in ("steps", "tokens_seen", "ppl", "ppl_ratio", "teacher_ppl")}}


def run_demo(model_ref: str, teacher_ref: str, out: Path, settings: dict, threads: int | None = None) -> dict:
    """Run the demo steps (see the module docstring), write the report folder and return the collected result."""
    import torch

    from .bench import decode, ttft
    from .eval.passkey import plot_heatmap, run_passkey
    from .eval.perplexity import perplexity
    from .model.loading import load_model, load_tokenizer
    from .model.shipped import shipped_conversion_of
    from .runtime.candidates import load_baseline, make_candidates
    from .runtime.machine import load_average, machine_info, set_threads, thread_env
    from .runtime.records import write_json

    started = time.time()
    deadline = started + settings["budget_s"]
    set_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"demo": "spikingbrain", "model": str(model_ref), "teacher": str(teacher_ref), "settings": settings,
              "machine": machine_info(), "thread_env": thread_env(), "load_average": {"start": load_average()}, "steps": [], "partial": False,
              "files": {"markdown": str(out / "report.md"), "json": str(out / "demo.json")}}
    try:
        if model_ref == "auto":
            model_ref = shipped_conversion_of(teacher_ref)
            if model_ref is None:
                steps = settings["convert_steps"]
                made = _step(result, "convert", f"quick conversion of {teacher_ref} (no shipped conversion of it here; "
                             f"calibration and {steps} distillation steps)", lambda: _quick_conversion(teacher_ref, out, steps))
                if made is None:
                    raise ValueError(f"the quick conversion of {teacher_ref!r} failed: {_error(result, 'convert')}")
                result["quick_conversion"] = made
                model_ref = made["folder"]
            result["model"] = str(model_ref)
        tokenizer = load_tokenizer(model_ref)
        ours = _step(result, "load_ours", f"loading our model {model_ref}", lambda: load_model(model_ref))
        teacher = _step(result, "load_teacher", f"loading the teacher {teacher_ref} with transformers (SDPA)",
                        lambda: load_baseline(teacher_ref))
        models = {name: m for name, m in (("teacher", teacher), ("ours", ours)) if m is not None}
        if "ours" not in models:
            raise ValueError(f"our model {model_ref!r} could not be loaded: {_error(result, 'load_ours')}")
        result["also"] = []
        for ref in also_models(settings.get("also", []), teacher_ref, str(model_ref)):
            loaded = _step(result, f"load {ref}", f"loading {ref} (quality, pass keys and samples only)", lambda ref=ref: load_model(ref))
            if loaded is not None:
                models[ref] = loaded
                result["also"].append(ref)
        result["training"] = _step(result, "training", "training curves of the shipped models",
                                   lambda: training_section([str(model_ref), *result["also"]], out))
        held_out = held_out_ids(tokenizer, settings["ppl_tokens"])

        def quality():
            context = min(settings["ppl_context"], len(held_out))
            return {name: perplexity(m, held_out, context, progress=True) for name, m in models.items()}

        result["perplexity"] = _step(result, "perplexity", f"held-out perplexity ({settings['ppl_tokens']} pydoc tokens)", quality)

        def passkey():
            found = run_passkey(models, tokenizer, settings["passkey"], [0.5], trials=1)
            found["files"] = {"png": str(plot_heatmap(found, out / "passkey.png"))}
            return found

        result["passkey"] = _step(result, "passkey", f"pass-key retrieval at {', '.join(map(format_length, settings['passkey']))} tokens", passkey)
        result["samples"] = _step(result, "samples", "sample generations", lambda: _samples(models, tokenizer, settings["max_new_tokens"]))
        for ref in result["also"]:  # the speed steps measure our main model only
            del models[ref]
        pair = make_candidates(ours, model_ref, teacher, teacher_ref)
        if teacher is not None:
            result["memory"] = {str(n): {"teacher": decode.analytic_cache_bytes(teacher, n), "ours": decode.analytic_cache_bytes(ours, n)}
                                for n in MEMORY_LENGTHS}
        result["decode"] = _step(result, "decode", f"decode latency and memory at {', '.join(map(format_length, settings['decode']))}",
                                 lambda: decode.run(pair, settings["decode"], out / "decode", tokens=4, repeats=2, bar_desc="decode"))
        for c in pair:
            c.rows = []
        result["spiking"] = _step(result, "spiking", "spiking sparsity and energy",
                                  lambda: spiking_section(ours, held_out[:SPIKING_TOKENS], out, settings["ppl_context"]))
        lengths = {"ours": settings["ttft"], "baseline": settings["baseline_ttft"]}
        result["ttft"] = _step(result, "ttft", "time to first token (the teacher as far as the time budget allows)",
                               lambda: ttft.run(pair, lengths, out / "ttft", cap=settings["budget_s"], repeats=1,
                                                extrapolate=[65536, 131072, 1048576], bar_desc="ttft",
                                                deadline=deadline - 20))
    except KeyboardInterrupt:
        result["partial"] = True
        result["interrupted"] = True
        partial_ttft = out / "ttft" / "ttft.json"  # rewritten by ttft.run after every length
        if result.get("ttft") is None and partial_ttft.is_file():
            result["ttft"] = json.loads(partial_ttft.read_text())
        print("interrupted: writing the report of the steps done so far", file=sys.stderr)
    result["load_average"]["end"] = load_average()
    result["wall_seconds"] = round(time.time() - started, 1)
    result["torch_threads"] = torch.get_num_threads()
    write_markdown(result, out / "report.md")
    write_json(out / "demo.json", result)
    return result


# ----------------------------------------------------------------------------- report


def _by_length(rows: list[dict]) -> dict[int, dict]:
    return {r["length"]: r for r in rows}


def summary_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """``(metric, teacher, ours, teacher/ours or ours/teacher)`` rows of the summary table, from what was measured."""
    rows = []
    ppl = result.get("perplexity") or {}
    if "ours" in ppl and "teacher" in ppl:
        rows.append(("held-out perplexity (lower is better)", f"{ppl['teacher']['ppl']:.2f}", f"{ppl['ours']['ppl']:.2f}",
                     f"ours/teacher {ppl['ours']['ppl'] / ppl['teacher']['ppl']:.2f}"))
    passkey = result.get("passkey") or {}
    for n in passkey.get("lengths", []):
        acc = {name: m["accuracy_by_length"][str(n)] for name, m in passkey["models"].items()}
        rows.append((f"pass-key accuracy at {format_length(n)}", f"{acc.get('teacher', float('nan')):.0%}", f"{acc.get('ours', float('nan')):.0%}", ""))
    for name in result.get("also", []):  # further models: their quality rows, the model named in the metric
        if name in ppl and "teacher" in ppl:
            rows.append((f"{name}: held-out perplexity", f"{ppl['teacher']['ppl']:.2f}", f"{ppl[name]['ppl']:.2f}",
                         f"ours/teacher {ppl[name]['ppl'] / ppl['teacher']['ppl']:.2f}"))
        for n in passkey.get("lengths", []) if name in passkey.get("models", {}) else []:
            acc = {key: m["accuracy_by_length"][str(n)] for key, m in passkey["models"].items()}
            rows.append((f"{name}: pass-key accuracy at {format_length(n)}", f"{acc.get('teacher', float('nan')):.0%}",
                         f"{acc[name]:.0%}", ""))
    trained = (result.get("training") or {}).get("models", {})
    for name, label in ((str(result["model"]), ""), *((name, f"{name}: ") for name in result.get("also", []))):
        if name in trained:
            t = trained[name]
            rows.append((f"{label}training tokens (share of the teacher's pretraining)", "-",
                         f"{t['tokens_seen']:,} ({t['fraction_of_teacher_pretraining']:.1e})", ""))
    samples = result.get("samples") or []
    if samples:
        def degenerate(name: str) -> str:
            if name not in samples[0]:
                return "-"
            return f"{sum(row[name]['degenerate'] for row in samples)} of {len(samples)}"

        rows.append(("degenerate sample answers (repetition)", degenerate("teacher"), degenerate("ours"), ""))
        rows += [(f"{name}: degenerate sample answers", degenerate("teacher"), degenerate(name), "")
                 for name in result.get("also", [])]
    ttft = result.get("ttft") or {}
    ratios = _by_length(ttft.get("ratios", []))
    measured = [n for n, r in ratios.items() if not r["extrapolated"]]
    for n in sorted(ratios):
        if n >= 16384 or n == max(measured, default=0):
            r = ratios[n]

            def mark(flag: bool) -> str:
                return " (extrapolated)" if flag else ""

            rows.append((f"time to first token at {format_length(n)} (s)", f"{r['baseline_s']:.1f}{mark(r['baseline_extrapolated'])}",
                         f"{r['ours_s']:.1f}{mark(r['ours_extrapolated'])}", f"teacher/ours {r['ratio']:.1f}x{mark(r['extrapolated'])}"))
    dec = result.get("decode") or {}
    cands = dec.get("candidates", {})
    if "ours" in cands:
        ours_rows, base_rows = _by_length(cands["ours"]["rows"]), _by_length(cands.get("baseline", {}).get("rows", []))
        for n in sorted(ours_rows):
            b = base_rows.get(n)
            rows.append((f"decode ms/token at {format_length(n)}", f"{1000 * b['median_step_s']:.1f}" if b else "-",
                         f"{1000 * ours_rows[n]['median_step_s']:.1f}",
                         f"teacher/ours {b['median_step_s'] / ours_rows[n]['median_step_s']:.1f}x" if b else ""))
        n = max(n for n in ours_rows if n in base_rows) if set(ours_rows) & set(base_rows) else None
        if n is not None:
            b = base_rows[n]["cache_bytes_measured"]
            rows.append((f"cache per sequence at {format_length(n)} (MiB, measured)", f"{b / 2**20:.1f}",
                         f"{ours_rows[n]['cache_bytes_measured'] / 2**20:.1f}", f"teacher/ours {b / ours_rows[n]['cache_bytes_measured']:.0f}x"))
    for n, m in sorted((result.get("memory") or {}).items(), key=lambda item: int(item[0])):
        rows.append((f"cache per sequence at {format_length(int(n))} (MiB, computed)", f"{m['teacher'] / 2**20:.0f}",
                     f"{m['ours'] / 2**20:.1f}", f"teacher/ours {m['teacher'] / m['ours']:.0f}x"))
    for row in ((result.get("spiking") or {}).get("summary") or []):
        rows.append(tuple(row))
    return rows


def format_summary(result: dict) -> str:
    """The summary table printed at the end of the demo."""
    rows = [("metric", "teacher", "ours", "ratio"), *summary_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = [s for s in result["steps"] if s.get("status") != "done"]
    for s in failed:
        lines.append(f"step '{s['title']}' {s.get('status', 'interrupted')}: {s.get('error', '')}")
    lines.append(f"{result['wall_seconds']:.0f} s on {result['machine']['cpu']} with {result['torch_threads']} threads; "
                 f"load average {result['load_average']['start']} -> {result['load_average']['end']}")
    return "\n".join(lines)


def _markdown_table(rows: list[tuple]) -> list[str]:
    header, *body = rows
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |" for r in body]


def write_markdown(result: dict, path: Path) -> Path:
    """The demo's Markdown report: summary table, each step's table and plot, samples and notes."""
    from .bench.decode import format_report as decode_report
    from .bench.ttft import format_report as ttft_report

    lines = [f"# SpikingBrain demo: {result['model']} against {result['teacher']}", ""]
    if result["partial"]:
        lines += ["**Partial results**: a step failed or the run was interrupted (see Steps).", ""]
    quick = result.get("quick_conversion")
    if quick:
        lines += [f"**Our model is a quick conversion** made by this run ({quick['steps']} steps on {quick['tokens_seen']} tokens; "
                  f"its training held-out perplexity is {quick['ppl_ratio']:.2f}x the teacher's). A full conversion "
                  "(`spikingbrain train`, see configs/spikingbrain-smollm2.yaml) is much closer to the teacher.", ""]
    lines += ["## Summary", "", *_markdown_table([("metric", "teacher", "ours", "ratio"), *summary_rows(result)]), ""]
    ppl = result.get("perplexity")
    if ppl:
        any_ppl = next(iter(ppl.values()))
        lines += ["## Quality", "",
                  f"Held-out perplexity on {any_ppl['tokens']} scored tokens of the pydoc held-out split "
                  f"(windows of {any_ppl['context']} tokens): " + ", ".join(f"{k} {v['ppl']:.2f}" for k, v in ppl.items()) + ".", ""]
    if result.get("training"):
        lines += ["Training curves of the shipped models (held-out perplexity ratio and pass-key accuracy as each was "
                  "trained, from its delta file):", "", "![training curves](training-curves.png)", ""]
    if result.get("passkey"):
        lines += ["Pass-key retrieval (key at half depth, one random key per length):", "", "![passkey](passkey.png)", ""]
    if result.get("ttft"):
        lines += ["## Time to first token", "", "![ttft](ttft/ttft.png)", "", "```", ttft_report(result["ttft"]), "```", ""]
    if result.get("decode"):
        lines += ["## Decoding and memory per sequence", "",
                  "Caches hold the context as `spikingbrain bench decode` describes (ours: real prefill of the last window, "
                  "position counter set to the context; teacher: random keys/values of the context's shape).", "",
                  "![decode](decode/decode.png)", "", "```", decode_report(result["decode"]), "```", ""]
    lines += ["## Spiking sparsity and energy", ""]
    spiking = result.get("spiking")
    lines += [spiking["markdown"] if spiking else "Not measured: the step failed (see the steps above).", ""]
    if result.get("samples"):
        lines += ["## Sample generations (greedy)", ""]
        for row in result["samples"]:
            lines.append(f"**{row['prompt']}**")
            lines += [f"- {name}: {row[name]['text']!r} ({row[name]['seconds']:.1f} s"
                      f"{', degenerate' if row[name]['degenerate'] else ''})" for name in row if name != "prompt"]
            lines.append("")
    lines += ["## Steps", "", *_markdown_table([("step", "status", "seconds", "error")] + [
        (s["title"], s.get("status", "interrupted"), s.get("seconds", ""), s.get("error", "")) for s in result["steps"]]), ""]
    m = result["machine"]
    lines += [f"Machine: {m['cpu']}, {m['nproc']} cores, torch {m['torch']} with {result['torch_threads']} threads; "
              f"load average at start {result['load_average']['start']}, at end {result['load_average']['end']}; "
              f"{result['wall_seconds']:.0f} s in all.", ""]
    path.write_text("\n".join(lines))
    return path
