"""Pass-key retrieval: a five-digit key hidden at a chosen depth of filler text, asked for at the end.

A prompt of exactly ``length`` tokens is an instruction, filler text, the key sentence at
``depth`` (0 = right after the instruction, 1 = right before the question), more filler and
the question ``What is the pass key? The pass key is``. The model continues greedily for a
few tokens; the answer is right when the first number it writes is the key. Accuracy is
reported over length x depth (``trials`` random keys each), as JSON and a heatmap PNG.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

__all__ = ["passkey_prompt", "score_answer", "greedy_tokens", "run_passkey", "plot_heatmap", "FILLER"]

INSTRUCTION = "A pass key is hidden somewhere in the long text below. Read the text, find the pass key and remember it.\n"
FILLER = (
    "The river keeps moving past the old mill. A cold wind comes down from the hills. "
    "Lamps are lit in the windows one by one. Nothing here changes from day to day. "
)
KEY_SENTENCE = "The pass key is {key}. Remember it: {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids (exactly ``length``) of a prompt with ``key`` at ``depth`` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    head, needle, tail = _ids(tokenizer, INSTRUCTION), _ids(tokenizer, KEY_SENTENCE.format(key=key)), _ids(tokenizer, QUESTION)
    room = length - len(head) - len(needle) - len(tail)
    if room < 0:
        raise ValueError(
            f"a pass-key prompt needs at least {length - room} tokens with this tokenizer, got length {length}; use a longer length"
        )
    unit = _ids(tokenizer, FILLER)
    filler = (unit * (room // len(unit) + 1))[:room]
    cut = round(depth * room)
    return head + filler[:cut] + needle + filler[cut:] + tail


def score_answer(text: str, key: str) -> bool:
    """Whether the first number in ``text`` is ``key``."""
    found = re.search(r"\d+", text)
    return bool(found) and found.group(0) == key


def _new_cache(model):
    """An empty cache for our models or for a transformers model."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def greedy_tokens(model, ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy continuation tokens of ``ids`` (prefill keeps only the last logits)."""
    import torch

    cache = _new_cache(model)
    out_ids = []
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1).logits
        for _ in range(new_tokens):
            token = int(logits[0, -1].argmax())
            out_ids.append(token)
            logits = model(torch.tensor([[token]]), cache=cache, use_cache=True).logits
    return out_ids


def run_passkey(models: dict[str, object], tokenizer, lengths: list[int], depths: list[float], trials: int = 1,
                seed: int = 0, new_tokens: int = 8, progress_desc: str = "passkey", show_progress: bool = True) -> dict:
    """Accuracy of each named model over ``lengths`` x ``depths``, with every answer kept."""
    from ..runtime.progress import progress

    rng = random.Random(seed)
    keys = {(n, d, t): str(rng.randint(10000, 99999)) for n in lengths for d in depths for t in range(trials)}
    prompts = {spec: passkey_prompt(tokenizer, spec[0], spec[1], key) for spec, key in keys.items()}
    result = {"lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed, "models": {}}
    with progress(len(models) * len(keys), progress_desc, disable=not show_progress) as bar:
        for name, model in models.items():
            answers, grid = [], [[0.0] * len(lengths) for _ in depths]
            for (n, d, t), key in keys.items():
                bar.set_postfix_str(f"{name} T={n} depth={d:g}")
                start = time.perf_counter()
                text = tokenizer.decode(greedy_tokens(model, prompts[(n, d, t)], new_tokens), skip_special_tokens=True)
                ok = score_answer(text, key)
                answers.append({"length": n, "depth": d, "trial": t, "key": key, "answer": text, "correct": ok,
                                "seconds": time.perf_counter() - start})
                grid[depths.index(d)][lengths.index(n)] += ok / trials
                bar.update(1)
            by_length = {str(n): sum(grid[i][j] for i in range(len(depths))) / len(depths) for j, n in enumerate(lengths)}
            result["models"][name] = {"accuracy": grid, "accuracy_by_length": by_length, "answers": answers}
    return result


def plot_heatmap(result: dict, path: str | Path) -> Path:
    """One accuracy heatmap (depth x length) per model, as a PNG."""
    from ..runtime.lengths import format_length
    from ..runtime.plots import new_figure, save_figure

    names = list(result["models"])
    fig, axes = new_figure(len(names), (4.5 * len(names), 3.8))
    for ax, name in zip(axes, names):
        grid = result["models"][name]["accuracy"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(result["lengths"])), [format_length(n) for n in result["lengths"]])
        ax.set_yticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title(name, fontsize=9)
    return save_figure(fig, path, f"pass-key retrieval accuracy ({result['trials']} trial(s) per cell)")
