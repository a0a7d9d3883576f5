"""Time to first token of several models and the teacher, side by side in one run (fp32, streaming prefill).

Usage: python benchmarks/prefill_side_by_side.py --model w1024=FOLDER --model w4096=FOLDER [--lengths 4k,16k]
    [--teacher default] [--repeats 1] [--threads 2] [--json F] [--png F]

For example the same weights served with two sliding windows (a folder whose ``config.json`` says
another ``sliding_window``; ``scripts/set_delta_window.py`` does the same to a delta file). Each
model reads the same random prompt of every length (``model(ids, use_cache=True,
logits_to_keep=1)`` under ``torch.inference_mode()``, one untimed warm-up), then the teacher
through transformers (SDPA, fp32); the JSON gives seconds and the teacher's seconds over each
model's, with the machine and the load average before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from int8_prefill import time_prefill

from spikingbrain.runtime.lengths import format_length, parse_lengths


def plot(result: dict, path: Path) -> Path:
    """Seconds against prompt length per model (log-log), as a PNG."""
    from spikingbrain.runtime.plots import new_figure, save_loglog

    fig, (ax,) = new_figure(1, (7, 4))
    lengths = [row["length"] for row in result["rows"]]
    for name in result["models"]:
        ax.plot(lengths, [row[name]["seconds"] for row in result["rows"]], marker="o", label=name)
    ax.set_ylabel("time to first token (s)")
    return save_loglog(fig, [ax], path, "prompt tokens", f"prefill side by side, {result['machine']['torch_threads']} threads")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER", help="repeat for several")
    parser.add_argument("--lengths", default="4k,16k")
    parser.add_argument("--teacher", default="default", help="the Transformer to compare with ('none': skip)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default="runs/prefill-side-by-side/prefill.json")
    parser.add_argument("--png", default=None, help="default: beside the JSON")
    args = parser.parse_args()
    for item in args.model:
        if "=" not in item or item.startswith("teacher="):
            parser.error(f"--model {item!r}: write NAME=FOLDER with a name other than 'teacher'")

    from spikingbrain.model.loading import load_model
    from spikingbrain.runtime.candidates import load_baseline
    from spikingbrain.runtime.machine import load_average, machine_info, set_threads
    from spikingbrain.runtime.records import command_line, write_json

    threads = set_threads(args.threads)
    refs = dict(item.split("=", 1) for item in args.model)
    models = {name: load_model(ref) for name, ref in refs.items()}
    if args.teacher != "none":
        models["teacher"] = load_baseline(args.teacher)
    result = {"command": command_line(), "machine": {**machine_info(), "torch_threads": threads},
              "load_average_before": load_average(), "models": {**refs, **({"teacher": args.teacher} if "teacher" in models else {})},
              "rows": []}
    for length in parse_lengths(args.lengths):
        row = {"length": length}
        for name, model in models.items():
            row[name] = time_prefill(model, length, args.repeats, max_seconds=None, warmup=0 if name == "teacher" else 1)
            print(f"{format_length(length)} {name}: {row[name]['seconds']:.2f} s", file=sys.stderr, flush=True)
        if "teacher" in row:
            row["teacher_over"] = {name: row["teacher"]["seconds"] / row[name]["seconds"] for name in refs}
        result["rows"].append(row)
    result["load_average_after"] = load_average()
    out = Path(args.json)
    png = plot(result, Path(args.png) if args.png else out.with_suffix(".png"))
    write_json(out, {**result, "png": str(png)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
