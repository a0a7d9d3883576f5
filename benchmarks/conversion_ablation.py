"""What each conversion lever buys before any training: layer choice, kept first tokens (sinks), parallel layers.

Usage: python benchmarks/conversion_ablation.py [--variants all] [--ranking REPORT] [--json out.json] [--png out.png]
Every variant converts the embedded SmolLM2-135M-Instruct with W = 1024 and runs the closed-form
calibration on 2 x 1024 training tokens (no gradient step: the budget is fixed at zero), then is
scored on the pydoc held-out split the shipped model's training uses (first 8192 tokens, contexts
2048 and 8192) and on pass keys of 1k, 2k and 4k tokens (depths 0.1, 0.5, 0.9, one key each):

- ``alternating``: the SpikingBrain-7B layout (GLA on even layers, SWA on odd ones);
- ``alternating+sinks``: the same with the first 4 tokens kept visible to every window;
- ``auto``: 15 GLA layers chosen by measurement (``spikingbrain convert --layout auto``);
- ``auto+sinks``: the same with 4 kept tokens;
- ``auto10+sinks``: only the 10 cheapest layers GLA;
- ``auto10+sinks+distance``: the same with the gate biases set from the teacher's mean attention
  distance per head (``calibrate_gla(decay_init="distance")``) instead of the calibration's grid search;
- ``hybrid+sinks``: GLA in parallel with every layer (``residual``: the linear branch starts at
  zero), 3 full-attention layers chosen by the retrieval probe, SWA elsewhere, 4 kept tokens.

The layer ranking is measured once (minutes) unless ``--ranking`` names a conversion_report.json
that holds one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from spikingbrain.convert.calibrate import calibrate_gla
from spikingbrain.convert.selection import measure_ranking, plan_from_ranking, read_ranking
from spikingbrain.eval.passkey import run_passkey
from spikingbrain.eval.perplexity import perplexity
from spikingbrain.model.hf_import import load_transformer
from spikingbrain.model.loading import load_tokenizer, resolve_folder
from spikingbrain.model.names import alternating_layers
from spikingbrain.runtime.machine import machine_info
from spikingbrain.train.data import load_documents, pack, split_held_out, tokenize_documents

SINKS = {"keep_first_tokens": 4}


def variants(ranking: list[dict], layers: int) -> dict[str, tuple[list[str], dict, str]]:
    """Name -> (mixers, config fields, calibration decay init) of every variant in the module docstring."""
    half = layers // 2
    return {
        "alternating": (alternating_layers(layers), {}, "grid"),
        "alternating+sinks": (alternating_layers(layers), SINKS, "grid"),
        "auto": (plan_from_ranking(ranking, half), {}, "grid"),
        "auto+sinks": (plan_from_ranking(ranking, half), SINKS, "grid"),
        "auto10+sinks": (plan_from_ranking(ranking, 10), SINKS, "grid"),
        "auto10+sinks+distance": (plan_from_ranking(ranking, 10), SINKS, "distance"),
        "hybrid+sinks": (plan_from_ranking(ranking, 0, full_layers=3, parallel=True),
                         {**SINKS, "parallel_combine": "residual"}, "grid"),
    }


def score(model, tokenizer, held: torch.Tensor) -> dict:
    """Perplexity at 2048 and 8192 and pass-key accuracy by length."""
    keys = run_passkey({"model": model}, tokenizer, [1024, 2048, 4096], [0.1, 0.5, 0.9], trials=1, seed=0)
    return {"ppl_2048": perplexity(model, held, 2048)["ppl"], "ppl_8192": perplexity(model, held, 8192)["ppl"],
            "passkey": keys["models"]["model"]["accuracy_by_length"]}


def plot(result: dict, path: str) -> None:
    """Perplexity ratio (log scale) and pass-key accuracy per variant, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["variant"] for row in result["rows"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    left.barh(names, [row["ppl_2048"] / result["teacher"]["ppl_2048"] for row in result["rows"]], color="tab:blue")
    left.set_xscale("log")
    left.set_xlabel("held-out perplexity / teacher's, context 2048 (log; lower is better)")
    lengths = list(result["teacher"]["passkey"])
    for j, length in enumerate(lengths):
        right.barh([y + 0.25 * (j - 1) for y in range(len(names))], [row["passkey"][length] for row in result["rows"]],
                   height=0.25, label=f"{length} tokens")
    right.set_xlabel("pass-key accuracy (teacher: " + ", ".join(f"{result['teacher']['passkey'][n]:.0%}" for n in lengths) + ")")
    right.legend(loc="lower right")
    fig.suptitle("Conversion levers at zero training (SmolLM2-135M-Instruct, calibrated, W = 1024)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="all", help="comma-separated variant names, or 'all'")
    parser.add_argument("--ranking", default=None, help="a conversion_report.json holding a layer_ranking")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("--png", default=None, help="draw the result into this PNG")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    folder = resolve_folder("default")
    tokenizer = load_tokenizer("default")
    train_docs, held_docs = split_held_out(load_documents(["pydoc"]), 0.1, 0)
    sep = tokenizer.eos_token_id
    held = torch.tensor([t for doc in tokenize_documents(held_docs, tokenizer) for t in (*doc, sep)][:8192])
    calibration = pack(tokenize_documents(train_docs, tokenizer), 1024, sep)[:2]
    ranking = read_ranking(args.ranking) if args.ranking else measure_ranking(folder, tokenizer)
    teacher = load_transformer(folder).requires_grad_(False)
    table = variants(ranking, teacher.config.num_hidden_layers)
    chosen = list(table) if args.variants == "all" else args.variants.split(",")
    unknown = [name for name in chosen if name not in table]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(table)}")
    result = {"teacher": score(teacher, tokenizer, held), "rows": [], "ranking": ranking, "machine": machine_info()}
    print(f"teacher: {json.dumps(result['teacher'])}", flush=True)
    for name in chosen:
        mixers, fields, decay_init = table[name]
        start = time.perf_counter()
        torch.manual_seed(0)
        model = load_transformer(folder, mixers, sliding_window=1024, **fields)
        calibrate_gla(model, teacher, calibration, decay_init=decay_init)
        row = {"variant": name, "mixers": mixers, **fields, "decay_init": decay_init, **score(model, tokenizer, held), "seconds": time.perf_counter() - start}
        result["rows"].append(row)
        print(f"{name}: ppl x{row['ppl_2048'] / result['teacher']['ppl_2048']:.3f} (2048) "
              f"x{row['ppl_8192'] / result['teacher']['ppl_8192']:.3f} (8192), pass key {row['passkey']}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    if args.png:
        plot(result, args.png)
    json.dump({k: v for k, v in result.items() if k != "ranking"}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
