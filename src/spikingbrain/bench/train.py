"""Training throughput side by side: conversion training steps against a plain fine-tune of the teacher with transformers.

Three steps, each a full optimizer step (forward, backward, AdamW) on the same token batches with
the same trainable set (LoRA adapters of the same rank on the same projections, or every
parameter but the embeddings), timed alternately, medians reported:

- ``transformers_finetune``: the teacher as transformers' own model (SDPA), next-token cross-entropy;
- ``spikingbrain_finetune``: the converted student, the same loss (the cost of our model alone);
- ``spikingbrain_distill``: the converted student with the conversion loss (KL to the teacher's
  logits computed on the fly, plus cross-entropy): what ``spikingbrain train`` runs.
"""

from __future__ import annotations

import statistics
import time

from ..runtime.machine import machine_info, set_threads

__all__ = ["run_train_benchmark", "plot"]


def _trainable(model, mode: str, rank: int):
    """Parameters trained in ``mode`` (``lora`` adds adapters first)."""
    from ..train.lora import add_lora, lora_parameters

    if mode == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora(model, rank)
        return list(lora_parameters(model).values())
    params = [p for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def run_train_benchmark(student_ref: str, teacher_ref: str = "default", seq_len: int = 1024, batch_size: int = 2,
                        trainable: str = "lora", rank: int = 16, repeats: int = 5, threads: int | None = None,
                        seed: int = 0) -> dict:
    """Tokens/s of the three training steps (see the module docstring) and their ratios."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..model.loading import load_model, resolve_folder
    from ..train.trainer import distill_loss

    threads = set_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    teacher_hf = AutoModelForCausalLM.from_pretrained(resolve_folder(teacher_ref), dtype=torch.float32, attn_implementation="sdpa")
    teacher_ours = load_model(teacher_ref).requires_grad_(False)
    student = load_model(student_ref)
    vocab = student.config.vocab_size
    batches = torch.randint(0, vocab, (repeats + 1, batch_size, seq_len), generator=torch.Generator().manual_seed(seed))

    def stepper(model, loss_fn):
        model.train()
        params = _trainable(model, trainable, rank)
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def step(ids):
            loss = loss_fn(model, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def ce(model, ids):
        return model(ids, labels=ids, use_cache=False).loss

    student_ce = load_model(student_ref)
    steps = {
        "transformers_finetune": stepper(teacher_hf, ce),
        "spikingbrain_finetune": stepper(student_ce, ce),
        "spikingbrain_distill": stepper(student, lambda m, ids: distill_loss(m, teacher_ours, ids, 1.0, 0.1)[0]),
    }
    seconds = {name: [] for name in steps}
    for i in range(repeats + 1):  # the first round warms up; names alternate within every round
        for name, step in steps.items():
            start = time.perf_counter()
            step(batches[i])
            if i:
                seconds[name].append(time.perf_counter() - start)
    tokens = batch_size * seq_len
    results = {name: {"median_seconds": statistics.median(s), "tokens_per_second": tokens / statistics.median(s), "seconds": s}
               for name, s in seconds.items()}
    base = results["transformers_finetune"]["tokens_per_second"]
    return {
        "student": str(student_ref), "teacher": str(teacher_ref), "seq_len": seq_len, "batch_size": batch_size,
        "trainable": trainable, "lora_rank": rank if trainable == "lora" else None, "threads": threads,
        "repeats": repeats, "results": results,
        "ratios_to_transformers_finetune": {name: r["tokens_per_second"] / base for name, r in results.items()},
        "machine": machine_info(),
    }


def plot(report: dict, path) -> None:
    """A bar chart of the training tokens/s of the three steps, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    values = [report["results"][n]["tokens_per_second"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names, values, color=["gray", "tab:blue", "tab:orange"])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.0f}", va="center")
    ax.set_xlabel("training tokens/s (higher is better)")
    ax.set_title(f"seq {report['seq_len']} x batch {report['batch_size']}, {report['trainable']}, {report['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
