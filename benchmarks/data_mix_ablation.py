"""What the training data buys at one fixed small budget: the data mix and the answer-only loss on chats.

Usage: python benchmarks/data_mix_ablation.py [--student runs/smollm2-auto10] [--corpus runs/corpus]
    [--chats runs/retrieval_chat.jsonl] [--steps 30] [--out runs/data-mix-ablation] [--json F] [--png F]

Every variant trains the same converted student (default: the shipped conversion's, 10 GLA layers
chosen by measurement, SWA-1024 with 4 kept tokens) for the same budget: the closed-form
calibration on 2 x 1024 tokens, then ``--steps`` LoRA distillation steps of 1 x 1024 tokens with
the shipped recipe's distillation settings (lr 5e-4, CE weight 0.1, new parameters at 10x), on

- ``pydoc``: Python's pydoc topics only (the first shipped model's data);
- ``corpus``: the package corpus (documentation, prose, 3 % synthetic retrieval text);
- ``corpus+chats``: the corpus and the retrieval chats, the loss on their answers only (the shipped mix);
- ``corpus+chats (all tokens)``: the same data, the loss on every token of the chats (``chat_loss: all``).

Each trained model is scored beside the teacher by ``reading_eval.score_models``: perplexity of
the first ``--ppl-tokens`` tokens of the corpus's held-out split and of its absent source (Brown)
at context 2048, pass keys at 1k / 2k / 4k (depths 0.1 / 0.5 / 0.9), needle questions at 1k.
Training runs go under ``--out``, one folder per variant; a variant whose run finished is not
trained again and an interrupted one resumes, so the benchmark can be run again after a stop.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from reading_eval import score_models, summary

VARIANTS = {
    "pydoc": {"data": ["pydoc"]},
    "corpus": {"data": ["{corpus}/train.jsonl"]},
    "corpus+chats": {"data": ["{corpus}/train.jsonl", "{chats}"]},
    "corpus+chats (all tokens)": {"data": ["{corpus}/train.jsonl", "{chats}"], "chat_loss": "all"},
}


def variant_config(name: str, args):
    """The training run of one variant (calibration, then ``args.steps`` distillation steps)."""
    from spikingbrain.train.config import StageConfig, TrainConfig

    fields = VARIANTS[name]
    data = [item.format(corpus=args.corpus, chats=args.chats) for item in fields["data"]]
    stages = [
        StageConfig(kind="calibrate", name="calibrate", steps=1, seq_len=1024, batch_size=2),
        StageConfig(kind="distill", name="distill", steps=args.steps, seq_len=1024, batch_size=1, lr=5e-4,
                    warmup_steps=min(5, args.steps), trainable="lora", ce_weight=0.1, new_lr_scale=10),
    ]
    out = Path(args.out) / "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return TrainConfig(student=args.student, out=str(out), teacher=args.teacher, stages=stages, data=data,
                       held_out_fraction=0.02, lora_rank=16, eval_every=args.steps + 1, checkpoint_every=5,
                       eval_context=1024, eval_max_tokens=2048, chat_loss=fields.get("chat_loss", "answer"))


def trained(name: str, args) -> tuple[Path, float]:
    """The final folder of a variant's run (trained now, resumed, or found finished) and the seconds spent training now."""
    from spikingbrain.train.trainer import Trainer

    config = variant_config(name, args)
    final = Path(config.out) / "final"
    if (Path(config.out) / "summary.json").is_file():
        return final, 0.0
    start = time.perf_counter()
    Trainer(config, resume=True).run()
    return final, time.perf_counter() - start


def plot(result: dict, path: Path) -> Path:
    """Perplexity ratios and pass-key accuracy per variant, as a PNG."""
    from spikingbrain.runtime.plots import new_figure, save_figure

    ppl, keys = result["perplexity"], result["passkey"]["models"]
    names = [n for n in ppl if n != "teacher"]
    fig, (left, right) = new_figure(2, (12, 4.5))
    for j, (part, label) in enumerate((("held_out_2048", "held-out split"), ("absent_2048", "absent source (Brown)"))):
        left.barh([y + 0.35 * (j - 0.5) for y in range(len(names))], [ppl[n][part] / ppl["teacher"][part] for n in names],
                  height=0.35, label=label)
    left.set_yticks(range(len(names)), names)
    left.set_xlabel("perplexity / teacher's at context 2048 (lower is better)")
    lengths = result["passkey"]["lengths"]
    for j, n in enumerate(lengths):
        right.barh([y + 0.25 * (j - 1) for y in range(len(names))], [keys[m]["accuracy_by_length"][str(n)] for m in names],
                   height=0.25, label=f"{n} tokens (teacher {keys['teacher']['accuracy_by_length'][str(n)]:.0%})")
    right.set_yticks(range(len(names)), [""] * len(names))
    right.set_xlabel("pass-key accuracy")
    for ax in (left, right):  # above the bars, which reach the right edge
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=7)
    return save_figure(fig, path, f"Training data at a fixed budget ({result['steps']} x 1024 tokens after calibration)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="runs/smollm2-auto10", help="a converted, untrained student folder")
    parser.add_argument("--teacher", default="default")
    parser.add_argument("--corpus", default="runs/corpus", help="a folder written by 'spikingbrain data corpus'")
    parser.add_argument("--chats", default="runs/retrieval_chat.jsonl", help="chat examples written by scripts/retrieval_chats.py")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + "; ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=30, help="distillation steps of 1 x 1024 tokens per variant")
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--passkey-trials", type=int, default=1)
    parser.add_argument("--needle-trials", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/data-mix-ablation", help="folder of the variants' training runs")
    parser.add_argument("--json", default=None, help="where the result goes (default: OUT/data_mix_ablation.json)")
    parser.add_argument("--png", default=None, help="the plot (default: beside the JSON)")
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    for path in (Path(args.corpus) / "train.jsonl", Path(args.corpus) / "held_out.jsonl", Path(args.corpus) / "absent.jsonl"):
        if not path.is_file():
            parser.error(f"{path} is missing; build the corpus with 'spikingbrain data corpus {args.corpus}'")
    if not Path(args.chats).is_file():
        parser.error(f"--chats {args.chats}: not found; write it with 'python scripts/retrieval_chats.py --out {args.chats}'")
    if not Path(args.student).is_dir():
        parser.error(f"--student {args.student}: not a folder; convert one with 'spikingbrain convert default {args.student} "
                     "--layout auto --linear-layers 10 --window 1024 --keep-first-tokens 4'")
    # reading_eval's scoring reads these fields of its own arguments
    args.contexts, args.passkey_lengths, args.needle_lengths = [2048], [1024, 2048, 4096], [1024]

    from spikingbrain.model.loading import load_model, load_tokenizer
    from spikingbrain.runtime.candidates import load_baseline
    from spikingbrain.runtime.machine import load_average, machine_info, set_threads, thread_env
    from spikingbrain.runtime.records import write_json

    set_threads(args.threads)
    started, load = time.time(), {"start": load_average()}
    folders, seconds = {}, {}
    for name in chosen:
        folders[name], seconds[name] = trained(name, args)
    tokenizer = load_tokenizer(args.teacher)
    models = {"teacher": load_baseline(args.teacher), **{name: load_model(folder).eval() for name, folder in folders.items()}}
    result = score_models(models, tokenizer, args)
    load["end"] = load_average()
    result.update({"steps": args.steps, "tokens_per_variant": args.steps * 1024 + 2 * 1024,
                   "runs": {name: str(folder) for name, folder in folders.items()}, "training_seconds": seconds,
                   "argv": vars(args), "machine": machine_info(), "thread_env": thread_env(), "load_average": load,
                   "seconds": round(time.time() - started, 1)})
    result["summary"] = summary(result)
    out = Path(args.json or Path(args.out) / "data_mix_ablation.json")
    write_json(out, result)
    png = plot(result, Path(args.png) if args.png else out.with_suffix(".png"))
    print("\n".join(result["summary"]))
    print(f"{result['seconds']:.0f} s; load average {load['start']} -> {load['end']}; wrote {out} and {png}")


if __name__ == "__main__":
    main()
