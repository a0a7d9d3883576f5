"""Training throughput and memory side by side: conversion training steps against a plain fine-tune of the teacher.

Each step is a full optimizer step (forward, backward, AdamW) on the same token batches with
the same trainable set (LoRA adapters of the same rank on the same projections, or every
parameter but the embeddings), timed alternately, medians reported, with the peak resident
memory of each step (Linux: the high-water mark is reset before every step):

- ``transformers_finetune``: the teacher as transformers' own model (SDPA), next-token cross-entropy;
- ``spikingbrain_finetune``: the converted student, the same loss (the cost of our model alone);
- ``spikingbrain_distill_full_logits``: the conversion loss (KL to the teacher's logits plus
  cross-entropy) from whole ``[tokens, vocab]`` logits, as the trainer computed it before;
- ``spikingbrain_distill``: the same loss a slice of positions at a time (``train.losses``),
  what ``spikingbrain train`` runs;
- ``spikingbrain_distill_checkpointed``: that, with gradient checkpointing;
- ``spikingbrain_distill_stored_targets`` (and ``..._checkpointed``): the sliced loss with the teacher's
  targets read from a ``teacher_targets`` folder (``train.teacher_targets``), as in a later epoch or run
  over the same rows. Filling the folder once costs a teacher forward per row, timed as ``teacher_targets_fill``.
- ``spikingbrain_distill_stored_targets_int8`` (LoRA, where ``torch._int_mm`` works): that step with the frozen
  weights' products in int8 (``train.int8_products``, the ``int8_frozen_products`` option).

The first (warm-up) round also checks that the full-logits and the sliced loss agree.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from ..runtime.machine import flushing_denormals, machine_info, set_threads

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


def _reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """The resident-memory high-water mark since the last reset (``VmHWM``)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM line in /proc/self/status")


def run_train_benchmark(student_ref: str, teacher_ref: str = "default", seq_len: int = 1024, batch_size: int = 2,
                        trainable: str = "lora", rank: int = 16, repeats: int = 5, threads: int | None = None,
                        seed: int = 0) -> dict:
    """Tokens/s of the three training steps (see the module docstring) and their ratios."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..model.loading import load_model, resolve_folder
    from ..ops.int8 import int8_matmul_available
    from ..train.int8_products import int8_frozen_products
    from ..train.teacher_targets import TeacherTargets
    from ..train.trainer import distill_loss

    threads = set_threads(threads)
    torch.manual_seed(seed)
    teacher_hf = AutoModelForCausalLM.from_pretrained(resolve_folder(teacher_ref), dtype=torch.float32, attn_implementation="sdpa")
    teacher_ours = load_model(teacher_ref).requires_grad_(False)
    vocab = teacher_ours.config.vocab_size
    batches = torch.randint(0, vocab, (repeats + 1, batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    first_losses = {}

    def stepper(name, model, loss_fn, int8=False):
        model.train()
        params = _trainable(model, trainable, rank)
        int8_frozen_products(model, int8)
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def step(ids):
            loss = loss_fn(model, ids)
            first_losses.setdefault(name, loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def ce(model, ids):
        return model(ids, labels=ids, use_cache=False).loss

    def checkpointed():
        model = load_model(student_ref)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    store = tempfile.TemporaryDirectory(prefix="spikingbrain-teacher-targets-")
    targets = TeacherTargets(store.name, teacher_ours)

    def distill(m, ids):
        return distill_loss(m, teacher_ours, ids, 1.0, 0.1)[0]

    def distill_stored(m, ids):
        return distill_loss(m, teacher_ours, ids, 1.0, 0.1, teacher_targets=targets)[0]

    steps = {
        "transformers_finetune": (teacher_hf, ce),
        "spikingbrain_finetune": (load_model(student_ref), ce),
        "spikingbrain_distill_full_logits": (load_model(student_ref), lambda m, ids: distill_loss(m, teacher_ours, ids, 1.0, 0.1, sliced=False)[0]),
        "spikingbrain_distill": (load_model(student_ref), distill),
        "spikingbrain_distill_checkpointed": (checkpointed(), distill),
        "spikingbrain_distill_stored_targets": (stored_student := load_model(student_ref), distill_stored),
        "spikingbrain_distill_stored_targets_checkpointed": (checkpointed(), distill_stored),
    }
    if trainable == "lora" and int8_matmul_available("cpu"):
        steps["spikingbrain_distill_stored_targets_int8"] = (load_model(student_ref), distill_stored, True)
    steps = {name: stepper(name, *spec) for name, spec in steps.items()}
    seconds = {name: [] for name in steps}
    peaks = {name: [] for name in steps}
    with flushing_denormals(), store:  # as the trainer runs
        start = time.perf_counter()
        for batch in batches:  # every batch's targets stored once, before the steps that read them
            targets(batch, stored_student.lm_head.weight)  # the students' heads are equal: one set of files
        fill_seconds = time.perf_counter() - start
        for i in range(repeats + 1):  # the first round warms up; names alternate within every round
            for name, step in steps.items():
                reset = _reset_peak_rss()
                start = time.perf_counter()
                step(batches[i])
                if i:
                    seconds[name].append(time.perf_counter() - start)
                    if reset:
                        peaks[name].append(_peak_rss_bytes())
    tokens = batch_size * seq_len
    results = {name: {"median_seconds": statistics.median(s), "tokens_per_second": tokens / statistics.median(s), "seconds": s,
                      "peak_rss_bytes": max(peaks[name]) if peaks[name] else None}
               for name, s in seconds.items()}
    base = results["transformers_finetune"]["tokens_per_second"]
    return {
        "student": str(student_ref), "teacher": str(teacher_ref), "seq_len": seq_len, "batch_size": batch_size,
        "trainable": trainable, "lora_rank": rank if trainable == "lora" else None, "threads": threads,
        "repeats": repeats, "results": results,
        "ratios_to_transformers_finetune": {name: r["tokens_per_second"] / base for name, r in results.items()},
        "distill_speedup_over_full_logits": results["spikingbrain_distill"]["tokens_per_second"]
        / results["spikingbrain_distill_full_logits"]["tokens_per_second"],
        "teacher_targets_fill": {"seconds": fill_seconds, "tokens_per_second": batches.numel() / fill_seconds,
                                 "rows": targets.misses},
        "first_step_loss": first_losses,
        "peak_rss_note": "process high-water mark during the step (all models of the benchmark are resident)",
        "machine": machine_info(),
    }


def plot(report: dict, path) -> None:
    """Bars of each step's training tokens/s and peak memory, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    speed = [report["results"][n]["tokens_per_second"] for n in names]
    memory = [(report["results"][n]["peak_rss_bytes"] or 0) / 2**30 for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    colors = ["gray"] + ["tab:blue"] * (len(names) - 1)
    for ax, values, label, unit in ((left, speed, "training tokens/s (higher is better)", "{:.0f}"),
                                    (right, memory, "peak resident memory, GiB (lower is better)", "{:.2f}")):
        ax.barh(names, values, color=colors)
        for y, v in enumerate(values):
            ax.text(v, y, " " + unit.format(v), va="center")
        ax.set_xlabel(label)
    fig.suptitle(f"seq {report['seq_len']} x batch {report['batch_size']}, {report['trainable']}, {report['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
