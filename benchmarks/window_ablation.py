"""Sliding-window ablation for converting the embedded SmolLM2-135M-Instruct (no training).

Usage: python benchmarks/window_ablation.py [--windows 128,256,512,1024] [--json out.json]
Held-out text: the pydoc split the shipped model's training uses (fraction 0.1, seed 0), scored
at context 2048 (up to 8192 tokens). Two layouts per window W, both against the teacher's perplexity:
- ``swa_only``: SWA-W on the odd layers, the even layers keep full attention (the window's own cost);
- ``hybrid_calibrated``: the SpikingBrain-7B layout (GLA on the even layers) after the closed-form
  calibration stage on 4096 training tokens (what training starts from).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from spikingbrain.convert.calibrate import calibrate_gla
from spikingbrain.eval.perplexity import perplexity
from spikingbrain.model.hf_import import load_transformer
from spikingbrain.model.loading import load_model, load_tokenizer, resolve_folder
from spikingbrain.train.data import load_documents, pack, split_held_out, tokenize_documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="128,256,512,1024")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--json", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    tokenizer = load_tokenizer("default")
    train_docs, held_docs = split_held_out(load_documents(["pydoc"]), 0.1, 0)
    sep = tokenizer.eos_token_id
    held = torch.tensor([t for doc in tokenize_documents(held_docs, tokenizer) for t in (*doc, sep)][: args.eval_tokens])
    calibration = pack(tokenize_documents(train_docs, tokenizer), 2048, sep)[:2]
    teacher = load_model("default")
    teacher_ppl = perplexity(teacher, held, args.context)["ppl"]
    folder = resolve_folder("default")
    rows = []
    for window in (int(w) for w in args.windows.split(",")):
        row = {"window": window}
        for name, mixers in (("swa_only", ["full", "swa"] * 15), ("hybrid_calibrated", ["gla", "swa"] * 15)):
            torch.manual_seed(0)
            model = load_transformer(folder, mixers, sliding_window=window)
            if name == "hybrid_calibrated":
                calibrate_gla(model, teacher, calibration)
            row[name] = perplexity(model, held, args.context)["ppl"] / teacher_ppl
        rows.append(row)
        print(f"W={window:5d}  swa_only x{row['swa_only']:.3f}  hybrid_calibrated x{row['hybrid_calibrated']:.2f}", flush=True)
    result = {"teacher_ppl": teacher_ppl, "context": args.context, "eval_tokens": int(held.numel()), "rows": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
