"""``spikingbrain eval ppl|passkey|needle|harness`` and ``spikingbrain spikes``: quality of a model, with and without spiking."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..eval.harness import TASK_NAMES
from ..eval.options import SWEEP_K
from .common import add_w8aspike_options, candidates_from_args, float_list, length_list, print_result

__all__ = ["register", "register_spikes"]


def register(subparsers) -> None:
    """Add the ``spikingbrain eval`` group."""
    evaluate = subparsers.add_parser("eval", help="evaluation: perplexity")
    eval_sub = evaluate.add_subparsers(dest="eval", required=True)
    _register_ppl(eval_sub)
    _register_passkey(eval_sub)
    _register_needle(eval_sub)
    _register_harness(eval_sub)


def _register_ppl(subparsers) -> None:
    p = subparsers.add_parser("ppl", help="perplexity of a model over a text file in windows of N tokens")
    p.add_argument("--model", default="default", help="model folder or short name ('default': the embedded model)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--context", type=int, default=2048, help="window length in tokens")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the context)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first K tokens of the file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_cmd_ppl)


def _cmd_ppl(args: argparse.Namespace) -> int:
    import torch

    from ..eval.perplexity import check_window, perplexity_of_text
    from ..model.loading import load_model, load_tokenizer
    from ..runtime.text import read_text

    text = read_text(args.text)
    check_window(args.context, args.stride)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    loaded = time.perf_counter()
    result = perplexity_of_text(
        model, tokenizer, text, args.context, args.stride, args.batch_size, progress=True, max_tokens=args.max_tokens
    )
    result.update(
        model=str(args.model), file=str(args.text), seconds=round(time.perf_counter() - loaded, 3),
        load_seconds=round(loaded - start, 3), threads=torch.get_num_threads(),
    )
    print_result(result, args.json)
    return 0


def _register_passkey(subparsers) -> None:
    p = subparsers.add_parser("passkey", help="pass-key retrieval accuracy over length x depth (JSON + heatmap PNG)")
    p.add_argument("--model", default="spikingbrain-smollm2", help="our model (folder or short name)")
    p.add_argument("--baseline", default="default", help="compared model run by transformers (SDPA); 'none' to skip")
    p.add_argument("--lengths", type=length_list, default=[2048, 8192, 32768], help="prompt lengths in tokens")
    p.add_argument("--depths", type=float_list("0,0.5,1"), default=[0.0, 0.25, 0.5, 0.75, 1.0], help="key depths (0 = start, 1 = end)")
    p.add_argument("--trials", type=int, default=2, help="random keys per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="runs/eval-passkey", help="folder for passkey.json and passkey.png")
    p.set_defaults(func=_cmd_passkey)


def _retrieval_candidates(args: argparse.Namespace):
    """The tokenizer, the models (ours and the baseline) and notes of a retrieval evaluation, after checking its arguments."""
    from ..model.loading import load_tokenizer
    from ..runtime.candidates import check_lengths

    if args.trials < 1 or any(not 0 <= d <= 1 for d in args.depths):
        raise ValueError(f"--trials must be >= 1 and --depths within 0..1 (got {args.trials}, {args.depths})")
    tokenizer = load_tokenizer(args.model)
    candidates, notes = candidates_from_args(args)
    for c in candidates:
        notes += check_lengths(c, args.lengths)
    return tokenizer, candidates, notes


def _cmd_passkey(args: argparse.Namespace) -> int:
    from ..eval.passkey import plot_heatmap, run_passkey
    from ..runtime.machine import load_average, machine_info
    from ..runtime.records import write_json

    tokenizer, candidates, notes = _retrieval_candidates(args)
    load_start = load_average()
    result = run_passkey({c.label: c.model for c in candidates}, tokenizer, sorted(set(args.lengths)), args.depths,
                         args.trials, args.seed)
    result.update(machine=machine_info(), load_average={"start": load_start, "end": load_average()}, notes=notes)
    out = Path(args.out)
    write_json(out / "passkey.json", result)
    png = plot_heatmap(result, out / "passkey.png")
    for name, m in result["models"].items():
        print(f"{name}: " + ", ".join(f"{n} tokens {acc:.0%}" for n, acc in m["accuracy_by_length"].items()))
    for note in notes:
        print(note)
    print(f"wrote {out / 'passkey.json'} and {png}")
    return 0


def _register_needle(subparsers) -> None:
    p = subparsers.add_parser("needle", help="needle-in-prose QA: a fictional fact in prose, a question in the chat template (JSON + PNG)")
    p.add_argument("--model", default="spikingbrain-smollm2", help="our model (folder or short name)")
    p.add_argument("--baseline", default="default", help="the teacher, run by transformers (SDPA); 'none' to skip")
    p.add_argument("--lengths", type=length_list, default=[1024, 4096], help="prompt lengths in tokens")
    p.add_argument("--depths", type=float_list("0.1,0.5,0.9"), default=[0.1, 0.5, 0.9], help="fact depths (0 = start, 1 = end)")
    p.add_argument("--trials", type=int, default=3, help="facts per cell (a different fact for every prompt)")
    p.add_argument("--filler", default=None,
                   help="prose to hide the fact in: a text file or a .jsonl with 'text' fields, e.g. a corpus's absent.jsonl "
                        "(default: Python's pydoc topics)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="runs/eval-needle", help="folder for needle.json and needle.png")
    p.set_defaults(func=_cmd_needle)


def _cmd_needle(args: argparse.Namespace) -> int:
    from ..eval.needle import plot_needle, run_needle
    from ..runtime.records import write_json

    tokenizer, candidates, notes = _retrieval_candidates(args)
    names = {"ours": "ours", "baseline": "teacher"}
    result = run_needle({names[c.name]: c.model for c in candidates}, tokenizer, sorted(set(args.lengths)), args.depths,
                        args.trials, args.seed, filler_path=args.filler)
    result.update(labels={names[c.name]: c.label for c in candidates}, filler=args.filler or "pydoc", notes=notes)
    out = Path(args.out)
    write_json(out / "needle.json", result)
    plot_needle(result, out / "needle.png")
    for name, m in result["models"].items():
        print(f"{name}: " + ", ".join(f"{n} tokens {acc:.0%}" for n, acc in m["accuracy_by_length"].items())
              + f"; degenerate answers {m['degenerate_fraction']:.0%}")
    if result.get("ratio"):
        print("ours / teacher: " + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in result["ratio"].items()))
    for note in notes:
        print(note)
    print(f"wrote {out / 'needle.json'} and {out / 'needle.png'}")
    return 0


def _register_harness(subparsers) -> None:
    p = subparsers.add_parser("harness", help="lm-evaluation-harness tasks on our model, in process and offline (JSON)")
    p.add_argument("--model", default="spikingbrain-smollm2", help="model folder or short name")
    p.add_argument("--tasks", default=",".join(TASK_NAMES),
                   help=f"comma-separated task names: shipped ({', '.join(TASK_NAMES)}) or lm-eval's, when their data is local")
    p.add_argument("--include-path", default=None, help="folder of your own lm-eval task YAML files")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval-harness", help="folder for harness.json")
    p.set_defaults(func=_cmd_harness)


def _cmd_harness(args: argparse.Namespace) -> int:
    from ..eval.harness import run_harness
    from ..model.loading import load_model, load_tokenizer
    from ..runtime.machine import load_average, machine_info, set_threads
    from ..runtime.records import write_json

    set_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    start, load_start = time.perf_counter(), load_average()
    result = run_harness(load_model(args.model), load_tokenizer(args.model), tasks, limit, args.batch_size,
                         args.include_path, args.num_fewshot, args.seed)
    result.update(model=str(args.model), seconds=time.perf_counter() - start, machine=machine_info(),
                  load_average={"start": load_start, "end": load_average()})
    path = write_json(Path(args.out) / "harness.json", result)
    for task, metrics in result["results"].items():
        shown = {k: v for k, v in metrics.items() if "stderr" not in k and k != "alias" and isinstance(v, (int, float))}
        print(f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()), file=sys.stdout)
    print(f"wrote {path}")
    return 0


def register_spikes(subparsers) -> None:
    """Add ``spikingbrain spikes``."""
    p = subparsers.add_parser("spikes", help="spiking report: perplexity with/without spiking, sparsity, energy, plots, events")
    p.add_argument("--model", default="default", help="model folder or short name (default: the embedded model)")
    p.add_argument("--text", required=True, help="UTF-8 text file to read (held-out text)")
    p.add_argument("--k", type=float, default=3.0, help="firing-rate parameter: threshold = mean|x| / k (default 3)")
    p.add_argument("--context", type=int, default=2048, help="window length in tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="read only the first N tokens of the text")
    add_w8aspike_options(p)
    p.add_argument("--sweep-k", type=float_list("2,2.5,3", positive="k values"), nargs="?", const=list(SWEEP_K), default=None, metavar="K,K,...",
                   help="also run a sweep over k (default list: 2,2.5,3,3.5,4)")
    p.add_argument("--events", default=None, metavar="FILE.npz", help="write the spike events of one forward pass")
    p.add_argument("--events-tokens", type=int, default=16, help="tokens of that forward pass (from the text's start)")
    p.add_argument("--out", default="reports/spikes", help="folder for spikes.json and the PNGs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON on stdout")
    p.set_defaults(func=_cmd_spikes)


def _cmd_spikes(args: argparse.Namespace) -> int:
    from ..eval.perplexity import check_window
    import torch

    from ..eval.spikes import format_summary, write_spikes_report
    from ..runtime.text import read_text

    check_window(args.context)
    if args.k <= 0:
        raise ValueError(f"--k must be > 0 (threshold = mean|x| / k), got {args.k}")
    if args.events and not args.events.endswith(".npz"):
        raise ValueError(f"--events {args.events}: give a file name ending in .npz")
    if args.events_tokens < 1:
        raise ValueError(f"--events-tokens must be >= 1, got {args.events_tokens}")
    text = read_text(args.text)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = write_spikes_report(
        args.model, text, args.out, k=args.k, context=args.context, max_tokens=args.max_tokens, sweep=args.sweep_k,
        events=args.events, events_tokens=args.events_tokens, spike_query=args.spike_query, int8_kv=args.int8_kv,
        source=str(args.text),
    )
    print(json.dumps(report) if args.json else format_summary(report))
    print(f"wrote {Path(args.out) / 'spikes.json'} and {len(report['plots'])} PNGs", file=sys.stderr)
    return 0
