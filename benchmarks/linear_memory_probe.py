"""Do the linear branches of parallel layers remember what the window no longer sees? A short-window retrieval probe.

Usage:
    .venv/bin/python benchmarks/linear_memory_probe.py --model nofull=runs/hybrid-nofull --window 128 --length 1024 \
        --json docs/linear-memory-probe.json

Each model (a folder whose layers are parallel GLA || softmax layers with ``parallel_combine: residual``) is
served with its sliding windows cut to ``--window`` keys (4 kept first tokens), so that pass keys placed
early in a ``--length``-token prompt lie beyond every window and only the linear branches can carry them:
- pass-key accuracy (``eval.passkey``) at depths 0.1 / 0.5 / 0.9, ``--trials`` keys each (depth 0.9 lies
  inside the window: the control);
- the mean negative log-likelihood of the key's tokens after the question, at depths 0.1-0.7 (all beyond
  the window), with the linear branches on and with their weights set to zero: the gain is what the linear
  branches retrieve, in nats per key token (ln 10 = 2.30 is a uniform guess over digits);
- the gates' memory: half-lives in tokens from each GLA gate bias alone (median and largest per layer).
"""

from __future__ import annotations

import argparse
import math
import random
import time

DEPTHS = [0.1, 0.5, 0.9]
NLL_DEPTHS = [0.1, 0.3, 0.5, 0.7]


def key_nll(model, tokenizer, length: int, cases: list[tuple[float, str]]) -> float:
    """Mean NLL (nats per token) of each case's key tokens right after its pass-key prompt."""
    import torch

    from spikingbrain.convert.selection import answer_nll
    from spikingbrain.eval.passkey import passkey_prompt

    prompts = [(passkey_prompt(tokenizer, length, depth, key), tokenizer(" " + key, add_special_tokens=False)["input_ids"])
               for depth, key in cases]
    with torch.inference_mode():
        return answer_nll(model, prompts)


def gate_half_lives(model) -> list[dict]:
    """Per GLA layer: median and largest half-life (tokens) of its key channels, from the gate bias alone."""
    import torch
    from torch.nn import functional as F

    from spikingbrain.model.mixers import GatedLinearAttention

    rows = []
    for index, layer in enumerate(model.model.layers):
        linear = next((m for m in layer.modules() if isinstance(m, GatedLinearAttention)), None)
        if linear is None or linear.key_tied:
            continue
        log_decay = F.logsigmoid(linear.gate_bias.detach().float()) / linear.gate_normalizer
        half = (-math.log(2) / log_decay).clamp(max=1e9)
        rows.append({"layer": index, "median": float(half.median()), "max": float(half.max()),
                     "channels_over_1000": int((half > 1000).sum())})
    return rows


def probe(name: str, folder: str, tokenizer, args) -> dict:
    """Every measurement of one model folder."""
    import torch

    from spikingbrain import SpikingBrainForCausalLM
    from spikingbrain.eval.passkey import run_passkey

    model = SpikingBrainForCausalLM.from_pretrained(folder, sliding_window=args.window, keep_first_tokens=4).eval()
    if model.config.parallel_combine != "residual" or not all(m.startswith("parallel-") for m in model.config.layer_mixers):
        raise SystemExit(f"{folder}: the probe needs parallel layers with parallel_combine 'residual' (linear weights to switch off)")
    rng = random.Random(args.seed)
    cases = [(depth, str(rng.randint(10000, 99999))) for depth in NLL_DEPTHS for _ in range(args.nll_keys)]
    passkey = run_passkey({name: model}, tokenizer, [args.length], DEPTHS, trials=args.trials, seed=args.seed, show_progress=False)
    on = key_nll(model, tokenizer, args.length, cases)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.linear_weights.zero_()
    off = key_nll(model, tokenizer, args.length, cases)
    result = passkey["models"][name]
    return {"folder": folder, "passkey_by_depth": {str(d): row[0] for d, row in zip(DEPTHS, result["accuracy"])},
            "passkey_answers": [a["answer"] for a in result["answers"]],
            "key_nll_linear_on": on, "key_nll_linear_off": off, "key_nll_gain": off - on,
            "gate_half_lives": gate_half_lives(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=FOLDER, repeatable")
    parser.add_argument("--window", type=int, default=128, help="keys each window branch sees in the probe")
    parser.add_argument("--length", type=int, default=1024, help="pass-key prompt length in tokens")
    parser.add_argument("--trials", type=int, default=3, help="pass keys per depth")
    parser.add_argument("--nll-keys", type=int, default=2, help="keys per depth of the NLL measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write every number and answer here")
    args = parser.parse_args()

    from spikingbrain.model.loading import load_tokenizer
    from spikingbrain.runtime.machine import load_average, machine_info, set_threads
    from spikingbrain.runtime.records import write_json

    set_threads(args.threads)
    refs = dict(item.split("=", 1) for item in args.model)
    started, load = time.time(), {"start": load_average()}
    tokenizer = load_tokenizer(next(iter(refs.values())))
    results = {}
    for name, folder in refs.items():
        results[name] = row = probe(name, folder, tokenizer, args)
        depths = " / ".join(f"{100 * v:.0f}" for v in row["passkey_by_depth"].values())
        print(f"{name}: pass key at depths 0.1 / 0.5 / 0.9: {depths} %; key NLL on {row['key_nll_linear_on']:.3f}, "
              f"off {row['key_nll_linear_off']:.3f}, gain {row['key_nll_gain']:+.3f} nats/token", flush=True)
    load["end"] = load_average()
    if args.json:
        write_json(args.json, {"models": results, "argv": vars(args), "machine": machine_info(), "load_average": load,
                               "seconds": round(time.time() - started, 1)})


if __name__ == "__main__":
    main()
