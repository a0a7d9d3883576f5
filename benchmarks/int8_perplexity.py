"""Perplexity of a model dense, as W8, as W8ASpike through the integer path and through its fp32 simulation, in one run.

Usage: python benchmarks/int8_perplexity.py [--model spikingbrain-smollm2] [--corpus runs/corpus] [--tokens 4096]
       [--context 2048] [--group-size 0] [--bf16-attention-values] [--json runs/int8-perplexity.json]

Variants (round-to-nearest INT8 weights of ``--group-size``, no calibration): ``dense`` (fp32);
``w8`` (INT8 weights, plain inputs); ``w8aspike_integer`` (spiking k = 3 and, as the release, spiked queries
and int8 keys and values (``--float-attention``: fp32 ones); the integer path, its attention in integers too);
``w8aspike_simulated`` (the same model with the integer path off: the spiked input times the
dequantised weight, attention in fp32 over the dequantised query, keys and values). Text: the first ``--tokens`` tokens of the corpus's ``held_out.jsonl``.
Each integer product equals the simulation's up to fp32 rounding, but over 30 layers such a
difference can move a later layer's spike count across a rounding boundary, so the two
perplexities are close, not equal (``integer_over_simulated`` in the JSON). With ``--bf16-attention-values`` also
``w8aspike_integer_bf16_values``: the integer path with the attention kernel's weighted values in bf16
(``bf16_values_over_integer``).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="spikingbrain-smollm2")
    parser.add_argument("--corpus", default="runs/corpus", help="a folder written by 'spikingbrain data corpus'")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=0, help="INT8 weight group (0: per output channel)")
    parser.add_argument("--float-attention", action="store_true",
                        help="W8ASpike attention of fp32 queries, keys and values (default: spiked queries, int8 keys and values)")
    parser.add_argument("--bf16-attention-values", action="store_true",
                        help="also the integer path with the attention kernel's weighted values in bf16 (needs AVX-512 BF16)")
    parser.add_argument("--json", default="runs/int8-perplexity.json")
    args = parser.parse_args()

    import torch

    from spikingbrain.eval.perplexity import perplexity
    from spikingbrain.model.loading import load_model, load_tokenizer
    from spikingbrain.runtime.machine import load_average, machine_info
    from spikingbrain.runtime.records import command_line, write_json
    from spikingbrain.spiking.apply import spikify, unspikify
    from spikingbrain.spiking.int8 import quantize_model_int8, set_bf16_attention_values, set_integer_matmul
    from spikingbrain.train.data import joined_token_ids, load_documents

    held_out = Path(args.corpus) / "held_out.jsonl"
    if not held_out.is_file():
        raise SystemExit(f"{held_out}: not found; build the corpus with 'spikingbrain data corpus {args.corpus}'")
    result = {"command": command_line(), "machine": machine_info(), "load_average_before": load_average(),
              "settings": vars(args), "perplexity": {}}
    dense = unspikify(load_model(args.model))
    ids = joined_token_ids(load_documents([held_out]), load_tokenizer(args.model), args.tokens)
    w8 = copy.deepcopy(dense)
    quantize_model_int8(w8, group_size=args.group_size)
    w8aspike = spikify(copy.deepcopy(dense), k=3, spike_query=not args.float_attention, int8_kv=not args.float_attention)
    quantize_model_int8(w8aspike, group_size=args.group_size)
    start = time.perf_counter()
    runs = [("dense", dense, True), ("w8", w8, True), ("w8aspike_integer", w8aspike, True), ("w8aspike_simulated", w8aspike, False)]
    if args.bf16_attention_values:
        runs.append(("w8aspike_integer_bf16_values", w8aspike, True))
    for name, model, integer in runs:
        set_integer_matmul(model, integer)
        set_bf16_attention_values(model, name.endswith("bf16_values"))
        with torch.inference_mode():
            result["perplexity"][name] = perplexity(model, ids, args.context, progress=True)["ppl"]
        print(f"{name}: {result['perplexity'][name]:.4f}")
    ppl = result["perplexity"]
    result["integer_over_simulated"] = ppl["w8aspike_integer"] / ppl["w8aspike_simulated"]
    if args.bf16_attention_values:
        result["bf16_values_over_integer"] = ppl["w8aspike_integer_bf16_values"] / ppl["w8aspike_integer"]
        print(f"bf16 values / integer {result['bf16_values_over_integer']:.6f}")
    result.update(tokens=int(ids.numel()), seconds=time.perf_counter() - start, load_average_after=load_average())
    write_json(args.json, result)
    print(f"integer / simulated {result['integer_over_simulated']:.6f}; wrote {args.json}")


if __name__ == "__main__":
    main()
