"""Which layers to make linear, by measurement: the cost of converting each layer alone.

For every layer of a Transformer teacher, the layer's softmax attention is replaced by its
calibrated GLA conversion (``convert.calibrate``, from the teacher's own activations) while
every other layer stays the teacher's. Two costs are measured on that one-layer conversion:

- ``kl``: the mean per-token KL divergence from the teacher on held-out text;
- ``retrieval``: how much less likely the teacher's own answers to retrieval prompts become
  (mean negative log-likelihood of the answer tokens, minus the teacher's), a probe of the
  heads that copy from far back (pass keys, looked-up values).

Layers are ranked by the sum of their ranks under both costs (cheapest first). A plan then
takes the cheapest layers as linear ones and the rest as softmax attention, and gives full
attention to the layers that retrieval depends on most.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..model.mixers import GatedLinearAttention
from .calibrate import calibrate_gla

__all__ = ["RetrievalPrompt", "answer_nll", "layer_costs", "rank_layers", "plan_from_ranking", "measure_ranking", "probe_inputs", "read_ranking"]

RetrievalPrompt = tuple[list[int], list[int]]  # (prompt ids, answer ids)


def _mean_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> float:
    """Mean over positions of KL(target || model), from ``[B, T, V]`` logits."""
    vocab = logits.shape[-1]
    return F.kl_div(
        F.log_softmax(logits.reshape(-1, vocab).float(), -1), F.log_softmax(target_logits.reshape(-1, vocab).float(), -1),
        log_target=True, reduction="batchmean",
    ).item()


def answer_nll(model, prompts: list[RetrievalPrompt]) -> float:
    """Mean negative log-likelihood of the answer tokens that follow each prompt (teacher forcing)."""
    total, count = 0.0, 0
    for prompt, answer in prompts:
        ids = torch.tensor([prompt + answer])
        logits = model(ids, use_cache=False, logits_to_keep=len(answer) + 1).logits[0, :-1].float()
        total -= F.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None]).sum().item()
        count += len(answer)
    return total / max(1, count)


@torch.no_grad()
def layer_costs(
    teacher,
    linear_student,
    text_ids: torch.Tensor,
    prompts: list[RetrievalPrompt],
    calibration_ids: torch.Tensor,
    progress=None,
) -> list[dict]:
    """Per layer: ``kl`` and ``retrieval`` cost of converting that layer alone (see the module docstring).

    ``linear_student`` is the teacher converted with GLA in every layer; its layers are calibrated
    here on ``calibration_ids`` ``[B, T]`` and lent one at a time to the teacher. ``text_ids`` is a
    ``[B, T]`` batch of held-out text; ``prompts`` are retrieval prompts with the answers to score.
    """
    layers = teacher.model.layers
    if len(linear_student.model.layers) != len(layers):
        raise ValueError(f"the linear student has {len(linear_student.model.layers)} layers, the teacher {len(layers)}")
    calibrate_gla(linear_student, teacher, calibration_ids)
    reference_logits = teacher(text_ids, use_cache=False).logits
    reference_nll = answer_nll(teacher, prompts)
    costs = []
    for i, block in enumerate(layers):
        linear = linear_student.model.layers[i].attn
        if not isinstance(linear, GatedLinearAttention):
            raise ValueError(f"layer {i} of the linear student is {type(linear).__name__}, not GLA; convert with layout 'gla'")
        softmax, block.attn = block.attn, linear
        try:
            kl = _mean_kl(teacher(text_ids, use_cache=False).logits, reference_logits)
            retrieval = answer_nll(teacher, prompts) - reference_nll
        finally:
            block.attn = softmax
        costs.append({"layer": i, "kl": kl, "retrieval": retrieval})
        if progress is not None:
            progress(i)
    return costs


def probe_inputs(tokenizer, seq_len: int = 1024, rows: int = 2, prompts: int = 6, seed: int = 0):
    """Default measurement data from Python's own documentation (``pydoc_data.topics``, in name order):
    calibration rows from the first topics, held-out text rows from the last, and pass-key prompts
    of ``seq_len`` tokens (``eval.passkey``) at three depths whose answers are the keys."""
    import random

    from pydoc_data.topics import topics

    from ..eval.passkey import passkey_prompt

    names = sorted(topics)
    half = len(names) // 2

    def rows_of(chosen: list[str]) -> torch.Tensor:
        ids = tokenizer("\n\n".join(topics[n] for n in chosen), add_special_tokens=False)["input_ids"]
        if len(ids) < rows * seq_len:
            raise ValueError(f"pydoc topics give {len(ids)} tokens, fewer than {rows} x {seq_len}; use a shorter seq_len")
        return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)

    rng = random.Random(seed)
    probe = []
    for i in range(prompts):
        key = str(rng.randint(10000, 99999))
        depth = (0.1, 0.5, 0.9)[i % 3]
        probe.append((passkey_prompt(tokenizer, seq_len, depth, key), tokenizer(" " + key, add_special_tokens=False)["input_ids"]))
    return rows_of(names[:half]), rows_of(names[half:][::-1]), probe


def measure_ranking(folder, tokenizer, seq_len: int = 1024, progress: bool = True, **mixer_fields) -> list[dict]:
    """Rank the layers of the Transformer in ``folder`` (see the module docstring) on :func:`probe_inputs`."""
    from ..model.hf_import import load_transformer
    from ..runtime.progress import progress as progress_bar

    teacher = load_transformer(folder).requires_grad_(False)
    linear_student = load_transformer(folder, ["gla"] * teacher.config.num_hidden_layers, **mixer_fields)
    calibration, text, prompts = probe_inputs(tokenizer, seq_len)
    with progress_bar(teacher.config.num_hidden_layers, "ranking layers", disable=not progress) as bar:
        costs = layer_costs(teacher, linear_student, text, prompts, calibration, progress=lambda i: bar.update(1))
    return rank_layers(costs)


def read_ranking(path) -> list[dict]:
    """The ``layer_ranking`` of a conversion report (or a bare ranking list) in the JSON file ``path``."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"ranking {path}: cannot read it as JSON ({err}); pass a conversion_report.json of an 'auto' conversion") from None
    ranking = data.get("layer_ranking") if isinstance(data, dict) else data
    if not ranking or not all(isinstance(c, dict) and {"layer", "kl", "retrieval"} <= set(c) for c in ranking):
        raise ValueError(f"ranking {path}: no layer ranking (entries with 'layer', 'kl', 'retrieval'); "
                         "pass the conversion_report.json of an 'auto' conversion")
    return ranking


def rank_layers(costs: list[dict]) -> list[dict]:
    """The layers ordered cheapest first by the sum of their ranks under ``kl`` and ``retrieval``, with the ranks."""
    ranked = [dict(c) for c in costs]
    for key in ("kl", "retrieval"):
        for rank, entry in enumerate(sorted(ranked, key=lambda c: (c[key], c["layer"]))):
            entry[f"{key}_rank"] = rank
    return sorted(ranked, key=lambda c: (c["kl_rank"] + c["retrieval_rank"], c["kl_rank"], c["layer"]))


def plan_from_ranking(ranking: list[dict], linear_layers: int, full_layers: int = 0, parallel: bool = False) -> list[str]:
    """Mixers per layer: the ``linear_layers`` cheapest become ``gla``, the ``full_layers`` that retrieval depends
    on most keep ``full`` attention, the rest ``swa``; ``parallel`` gives every layer a linear branch
    (``parallel-swa`` / ``parallel-full``), so that ``linear_layers`` is then ignored."""
    n = len(ranking)
    if not 0 <= full_layers <= n or (not parallel and not 0 <= linear_layers <= n - full_layers):
        raise ValueError(f"cannot plan {linear_layers} linear and {full_layers} full-attention layers in a {n}-layer model")
    by_retrieval = sorted(ranking, key=lambda c: (-c["retrieval"], c["layer"]))
    full = {c["layer"] for c in by_retrieval[:full_layers]}
    if parallel:
        return ["parallel-full" if i in full else "parallel-swa" for i in range(n)]
    linear = {c["layer"] for c in [c for c in ranking if c["layer"] not in full][:linear_layers]}
    return ["full" if i in full else "gla" if i in linear else "swa" for i in range(n)]
