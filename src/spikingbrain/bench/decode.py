"""``spikingbrain bench decode``: per-token decode latency and throughput against context length, and memory per sequence.

For every context length each model decodes ``--tokens`` greedy tokens, one
``model(token, cache=cache, use_cache=True)`` call each, from a cache that holds that
context; the models alternate and repeat, and the median step time is reported.

How the caches are made (the cost of a decode step depends on the cache's shapes, not on
its values, so the context is not prefilled token by token at 256k):

- **ours**: a real prefill of the last ``min(L, window)`` tokens (all ``L`` when the model
  has full-attention layers), after which the cache's position counter is set to ``L``:
  the GLA states and rolling windows then have exactly the shapes a real ``L``-token prefill
  leaves, and rotary positions continue from ``L``.
- **baseline** (transformers, SDPA): a ``DynamicCache`` filled with random keys and values
  of ``L`` positions per layer, the shapes its own prefill would leave; contexts whose KV
  cache would exceed ``--max-kv-gib`` are skipped (a 256k context of SmolLM2-135M needs 11 GiB).
- **llama.cpp** (``--llama-cpp``, :mod:`spikingbrain.bench.llama_cpp`): a real prefill of ``L`` random tokens into
  its context (llama.cpp's cache cannot be set from outside), so only contexts up to its ``n_ctx`` are timed.

Memory per sequence is measured on these caches (bytes of their tensors) and computed
analytically (:func:`spikingbrain.model.info.state_bytes` / ``kv_cache_bytes``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..runtime.candidates import Candidate, check_lengths
from ..runtime.lengths import format_length
from .llama_cpp import is_llama_cpp

__all__ = ["run", "context_cache", "cache_nbytes", "analytic_cache_bytes", "format_report", "DEFAULT_CONTEXTS"]

DEFAULT_CONTEXTS = (1024, 4096, 16384, 65536, 262144)
TARGETS = {"flat_64k_over_1k": 1.10, "speedup_64k": 5.0}


def _is_ours(model) -> bool:
    return hasattr(model, "new_cache")


def analytic_cache_bytes(model, length: int) -> int:
    """Bytes per sequence at ``length`` tokens: our state (GLA + windows), a Transformer's KV cache (fp32) or
    llama.cpp's (f16)."""
    from ..model.info import state_bytes

    if is_llama_cpp(model):
        return model.kv_bytes(length)
    config = model.config
    if _is_ours(model):
        return state_bytes(config, length)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * length * config.num_key_value_heads * head_dim * 4


def cache_nbytes(cache) -> int:
    """Bytes held by the tensors of our cache or of a transformers ``DynamicCache``; for llama.cpp the KV cache it
    allocated for its whole ``n_ctx``."""
    if is_llama_cpp(cache):
        return cache.kv_bytes(cache.n_ctx)
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def context_cache(model, length: int, seed: int = 0):
    """A cache holding a context of ``length`` tokens, made as the module docstring says."""
    import torch

    if is_llama_cpp(model):
        return model.fill(length, seed)
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    if _is_ours(model):
        needs_all = any(m.endswith("full") for m in config.layer_mixers)
        span = length if needs_all else min(length, config.window_cache_positions)
        cache = model.new_cache()
        model(torch.randint(0, config.vocab_size, (1, span), generator=gen), cache=cache, use_cache=True, logits_to_keep=1)
        cache.seen_tokens = length
        return cache
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, length, head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), layer)
    return cache


def _decode_steps(model, cache, token: int, steps: int) -> tuple[list[float], int]:
    """Seconds of ``steps`` greedy decode calls from ``cache``, and the last token."""
    import torch

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        times.append(time.perf_counter() - start)
    return times, token


def run(
    candidates: list[Candidate],
    contexts: list[int],
    out: Path,
    tokens: int = 16,
    repeats: int = 3,
    max_kv_gib: float = 4.0,
    seed: int = 0,
    plot_png: bool = True,
    notes: list[str] = (),
    bar_desc: str = "bench decode",
) -> dict:
    """Decode latency and cache bytes of every candidate at every context; write JSON (and PNG)."""
    import torch

    from ..runtime.machine import load_average, machine_info, thread_env
    from ..runtime.progress import progress
    from ..runtime.records import command_line, write_json

    if tokens < 1 or repeats < 1:
        raise ValueError(f"--tokens and --repeats must be >= 1 (got {tokens}, {repeats})")
    contexts = sorted(set(contexts))
    notes = list(notes)
    for c in candidates:
        timed = [n for n in contexts if not _beyond_context(c.model, n, tokens * repeats + 1)]
        notes += check_lengths(c, timed) if timed else []  # llama.cpp: only the contexts its n_ctx holds
    skipped = []
    started = time.time()
    out = Path(out)
    result = {
        "benchmark": "decode",
        "argv": command_line(),
        "machine": machine_info(),
        "thread_env": thread_env(),
        "load_average": {"start": load_average()},
        "settings": {"contexts": contexts, "tokens": tokens, "repeats": repeats, "max_kv_gib": max_kv_gib, "seed": seed,
                     "timed": "model(token, cache=cache, use_cache=True) + argmax, one token per call"},
        "notes": notes,
        "files": {"json": str(out / "decode.json")},
    }
    with torch.inference_mode(), progress(len(contexts) * len(candidates), bar_desc) as bar:
        for length in contexts:
            caches, last, nbytes = {}, {}, {}
            for c in candidates:
                reason = _skip_reason(c.model, length, tokens * repeats + 1, max_kv_gib)
                if reason:
                    skipped.append({"candidate": c.name, "length": length, "reason": reason})
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"{c.name} cache T={format_length(length)}")
                caches[c.name] = context_cache(c.model, length, seed)
                nbytes[c.name] = cache_nbytes(caches[c.name])  # before decoding adds positions
                _, last[c.name] = _decode_steps(c.model, caches[c.name], 0, 1)  # warm-up step
            times = {name: [] for name in caches}
            active = [c for c in candidates if c.name in caches]
            for r in range(repeats):
                for c in active if r % 2 == 0 else active[::-1]:
                    bar.set_postfix_str(f"{c.name} decode T={format_length(length)} block {r + 1}")
                    steps, last[c.name] = _decode_steps(c.model, caches[c.name], last[c.name], tokens)
                    times[c.name] += steps
            for c in active:
                median = statistics.median(times[c.name])
                c.rows.append({
                    "length": length, "step_times_s": times[c.name], "median_step_s": median, "tokens_per_s": 1 / median,
                    "cache_bytes_measured": nbytes[c.name], "cache_bytes_analytic": analytic_cache_bytes(c.model, length),
                    "cache_bytes_decoding": cache_nbytes(caches[c.name]),  # after the steps: a decode buffer in its own dtype
                    "load_average": load_average(), "beyond_trained_context": bool(c.trained_length and length > c.trained_length),
                })
                bar.update(1)
            del caches
            result.update(candidates={c.name: {"label": c.label, "trained_length": c.trained_length, "rows": c.rows} for c in candidates},
                          skipped=skipped, wall_seconds=time.time() - started)
            write_json(out / "decode.json", result)
    result["load_average"]["end"] = load_average()
    result["comparison"], result["targets"] = _compare(candidates)
    if plot_png and any(c.rows for c in candidates):
        result["files"]["png"] = str(plot(result, out / "decode.png"))
    write_json(out / "decode.json", result)
    return result


def _beyond_context(model, length: int, steps: int) -> bool:
    """Whether ``length`` tokens and ``steps`` decode calls exceed llama.cpp's context (ours and transformers' have none)."""
    return is_llama_cpp(model) and length + steps > model.n_ctx


def _skip_reason(model, length: int, steps: int, max_kv_gib: float) -> str | None:
    """Why ``model`` is not timed at ``length`` (``steps`` decode calls after it), or None."""
    if _beyond_context(model, length, steps):
        return f"{length} + {steps} tokens exceed llama.cpp's n_ctx of {model.n_ctx} (--llama-cpp-context)"
    analytic = analytic_cache_bytes(model, length)
    if not _is_ours(model) and analytic > max_kv_gib * 2**30:
        return f"KV cache would need {analytic / 2**30:.1f} GiB > --max-kv-gib {max_kv_gib:g}"
    return None


def _compare(candidates: list[Candidate]) -> tuple[list[dict], dict]:
    """Per-context ratios (baseline / ours latency and cache bytes) and the issue's decode targets."""
    rows = {c.name: {r["length"]: r for r in c.rows} for c in candidates}
    ours, base = rows.get("ours", {}), rows.get("baseline", {})
    comparison = [
        {"length": n, "latency_ratio": base[n]["median_step_s"] / ours[n]["median_step_s"],
         "memory_ratio": base[n]["cache_bytes_measured"] / ours[n]["cache_bytes_measured"]}
        for n in sorted(ours) if n in base
    ]
    targets = {}
    if 1024 in ours and 65536 in ours:
        value = ours[65536]["median_step_s"] / ours[1024]["median_step_s"]
        targets["flat_64k_over_1k"] = {"name": "ours step latency at 64k / at 1k", "value": value, "target": TARGETS["flat_64k_over_1k"],
                                       "pass": value <= TARGETS["flat_64k_over_1k"], "direction": "<="}
    by_length = {r["length"]: r for r in comparison}
    if 65536 in by_length:
        value = by_length[65536]["latency_ratio"]
        targets["speedup_64k"] = {"name": "baseline / ours step latency at 64k", "value": value, "target": TARGETS["speedup_64k"],
                                  "pass": value >= TARGETS["speedup_64k"], "direction": ">="}
    return comparison, targets


def plot(result: dict, path: Path) -> Path:
    """Per-token latency and cache bytes per sequence against context length (log-log), as a PNG."""
    from ..runtime.plots import colors_of, machine_title, new_figure, save_loglog

    fig, (ax1, ax2) = new_figure()
    colors = colors_of(result["candidates"])
    for name, c in result["candidates"].items():
        x = [r["length"] for r in c["rows"]]
        ax1.plot(x, [1000 * r["median_step_s"] for r in c["rows"]], "o-", color=colors[name], label=c["label"])
        ax2.plot(x, [r["cache_bytes_measured"] / 2**20 for r in c["rows"]], "o-", color=colors[name], label=f"{c['label']} (measured)")
    ax1.set_ylabel("decode latency per token (ms)")
    ax2.set_ylabel("cache per sequence (MiB)")
    return save_loglog(fig, (ax1, ax2), path, "context length (tokens)", machine_title(result, "decode"))


def format_report(result: dict) -> str:
    """The readable table of a decode result."""
    lines = [f"{'model':<9} {'context':>8} {'ms/token':>9} {'tokens/s':>9} {'cache MiB':>10} {'analytic MiB':>13} {'decoding MiB':>13}"]
    for name, c in result["candidates"].items():
        for r in c["rows"]:
            lines.append(f"{name:<9} {format_length(r['length']):>8} {1000 * r['median_step_s']:9.2f} {r['tokens_per_s']:9.1f} "
                         f"{r['cache_bytes_measured'] / 2**20:10.2f} {r['cache_bytes_analytic'] / 2**20:13.2f} "
                         f"{r['cache_bytes_decoding'] / 2**20:13.2f}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['candidate']} at {format_length(s['length'])}: {s['reason']}")
    for r in result["comparison"]:
        lines.append(f"{format_length(r['length']):>8}: baseline / ours latency {r['latency_ratio']:.2f}x, cache bytes {r['memory_ratio']:.1f}x")
    for t in result["targets"].values():
        lines.append(f"{t['name']:<40} {t['value']:7.2f} (target {t['direction']} {t['target']:g}) {'PASS' if t['pass'] else 'MISS'}")
    lines += result["notes"]
    lines.append(f"load average: start {result['load_average']['start']}, end {result['load_average']['end']}")
    return "\n".join(lines)
