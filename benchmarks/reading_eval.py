"""Can a conversion still read? Perplexity on unseen text, pass keys and needle QA against the teacher, in one run.

Usage:
    .venv/bin/python benchmarks/reading_eval.py --model hybrid=runs/exp/train-smollm2-hybrid2/final \
        --corpus runs/corpus --json docs/reading-eval-hybrid.json

Every model is scored beside the teacher (``--teacher``, default the embedded SmolLM2):
- perplexity of the first ``--ppl-tokens`` tokens of the corpus's ``held_out.jsonl`` (the split
  training never sees) and ``absent.jsonl`` (a source kept out of training), at each ``--contexts``;
- pass-key accuracy (``eval.passkey``) at ``--passkey-lengths``, depths 0.1 / 0.5 / 0.9,
  ``--passkey-trials`` keys each;
- needle-in-prose QA (``eval.needle``, filler from ``absent.jsonl``) at ``--needle-lengths``, with
  the fraction of degenerate answers.
The JSON holds every number and answer; the printed table gives each model's ratios to the
teacher next to the conversion issue's targets.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEPTHS = [0.1, 0.5, 0.9]


def score_models(models: dict, tokenizer, args) -> dict:
    """Perplexity, pass key and needle of every named model."""
    from spikingbrain.eval.needle import run_needle
    from spikingbrain.eval.passkey import run_passkey
    from spikingbrain.eval.perplexity import perplexity
    from spikingbrain.train.data import joined_token_ids, load_documents

    corpus = Path(args.corpus)
    texts = {part: joined_token_ids(load_documents([corpus / f"{part}.jsonl"]), tokenizer, args.ppl_tokens)
             for part in ("held_out", "absent")}
    result = {"perplexity": {name: {} for name in models}}
    for name, model in models.items():
        for part, ids in texts.items():
            for context in args.contexts:
                result["perplexity"][name][f"{part}_{context}"] = perplexity(model, ids, context, progress=True)["ppl"]
    passkey = run_passkey(models, tokenizer, args.passkey_lengths, DEPTHS, trials=args.passkey_trials, seed=args.seed)
    result["passkey"] = passkey
    result["needle"] = run_needle(models, tokenizer, args.needle_lengths, DEPTHS, trials=args.needle_trials, seed=args.seed,
                                  filler_path=corpus / "absent.jsonl")
    return result


def summary(result: dict) -> list[str]:
    """A Markdown table: each model's perplexity ratios, pass-key and needle accuracy beside the teacher's."""
    ppl, passkey, needle = result["perplexity"], result["passkey"]["models"], result["needle"]["models"]
    teacher = ppl["teacher"]
    keys = list(teacher)
    head = ["model", *(f"ppl {k}" for k in keys), *(f"pass key {n}" for n in result["passkey"]["lengths"]),
            *(f"needle {n}" for n in result["needle"]["lengths"]), "degenerate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ppl:
        cells = [name]
        for key in keys:
            value = ppl[name][key]
            cells.append(f"{value:.2f}" if name == "teacher" else f"{value:.2f} ({value / teacher[key]:.2f}x)")
        cells += [f"{100 * passkey[name]['accuracy_by_length'][str(n)]:.0f} %" for n in result["passkey"]["lengths"]]
        for n in result["needle"]["lengths"]:
            mine, theirs = needle[name]["accuracy_by_length"][str(n)], needle["teacher"]["accuracy_by_length"][str(n)]
            ratio = "" if name == "teacher" or not theirs else f" ({mine / theirs:.2f}x)"
            cells.append(f"{100 * mine:.0f} %{ratio}")
        cells.append(f"{100 * needle[name]['degenerate_fraction']:.0f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER",
                        help="a model to score (folder or short name); repeat for several")
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--corpus", default="runs/corpus", help="a folder written by 'spikingbrain data corpus'")
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--passkey-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--passkey-trials", type=int, default=3)
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--needle-trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", required=True, help="where the result goes")
    args = parser.parse_args()
    for item in args.model:
        if "=" not in item or item.startswith("teacher="):
            parser.error(f"--model {item!r}: write NAME=FOLDER with a name other than 'teacher'")
    for part in ("held_out", "absent"):
        if not (Path(args.corpus) / f"{part}.jsonl").is_file():
            parser.error(f"{args.corpus}/{part}.jsonl is missing; build the corpus with 'spikingbrain data corpus {args.corpus}'")

    from spikingbrain.model.loading import load_model, load_tokenizer
    from spikingbrain.runtime.candidates import load_baseline
    from spikingbrain.runtime.machine import load_average, machine_info, set_threads, thread_env
    from spikingbrain.runtime.records import write_json

    set_threads(args.threads)
    started, load = time.time(), {"start": load_average()}
    refs = dict(item.split("=", 1) for item in args.model)
    tokenizer = load_tokenizer(args.teacher)
    models = {"teacher": load_baseline(args.teacher), **{name: load_model(ref).eval() for name, ref in refs.items()}}
    result = score_models(models, tokenizer, args)
    load["end"] = load_average()
    result.update({"models": {"teacher": args.teacher, **refs}, "argv": vars(args), "machine": machine_info(),
                   "thread_env": thread_env(), "load_average": load, "seconds": round(time.time() - started, 1)})
    result["summary"] = summary(result)
    write_json(args.json, result)
    print("\n".join(result["summary"]))
    print(f"{result['seconds']:.0f} s; load average {load['start']} -> {load['end']}; wrote {args.json}")


if __name__ == "__main__":
    main()
