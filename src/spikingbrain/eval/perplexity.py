"""Perplexity of a causal language model over a token stream, in windows of a fixed context.

Windows start every ``stride`` tokens (default: ``context``, non-overlapping) and each is
scored from its own start: every position but the window's first is predicted from the
tokens before it in that window. With overlapping windows (``stride < context``) a window
scores only the tokens after the previous window's end, so every token is scored once.
"""

from __future__ import annotations

import math
import sys

import torch

__all__ = ["perplexity", "perplexity_of_text", "text_token_ids", "windows", "check_window"]

#: Positions whose log-softmax is computed at once, in fp64 (bounds the temporary to SLICE x vocab).
SLICE = 128


def check_window(context: int, stride: int | None = None) -> int:
    """The stride to use (default: the context), or an error when context or stride is out of range."""
    stride = context if stride is None else stride
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}; use --context 2048 for example")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    return stride


def windows(length: int, context: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` of each window over ``length`` tokens; targets ``first_scored .. end-1``."""
    stride = check_window(context, stride)
    if length < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {length}; give a longer text")
    result, scored_end, start = [], 0, 0
    while True:
        end = min(start + context, length)
        first = max(start + 1, scored_end)
        if end > first:
            result.append((start, end, first))
            scored_end = end
        if end == length:
            return result
        start += stride


def _window_nll(model, ids: torch.LongTensor) -> torch.Tensor:
    """Negative log-likelihood ``[B, T-1]`` (fp64) of tokens 1.. of each row given the tokens before them."""
    logits = model(ids, use_cache=False).logits
    nll = torch.empty(ids.shape[0], ids.shape[1] - 1, dtype=torch.float64, device=ids.device)
    for t in range(0, ids.shape[1] - 1, SLICE):
        piece = logits[:, t : min(t + SLICE, ids.shape[1] - 1)].double()
        targets = ids[:, t + 1 : t + 1 + piece.shape[1], None]
        nll[:, t : t + piece.shape[1]] = torch.logsumexp(piece, -1) - piece.gather(-1, targets)[..., 0]
    return nll


def perplexity(
    model,
    token_ids: torch.LongTensor,
    context: int,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict:
    """Perplexity of ``model`` on the 1-D ``token_ids`` in windows of ``context`` tokens (log-softmax in fp64).

    Works for any model whose ``forward(input_ids, use_cache=False)`` returns ``.logits``.
    Returns ``ppl``, ``nll`` (mean per scored token), ``tokens`` (scored), ``input_tokens``,
    ``context``, ``stride`` and ``windows``.
    """
    from tqdm.auto import tqdm

    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spans = windows(token_ids.numel(), context, stride)
    device = next(model.parameters()).device
    token_ids = token_ids.to(device=device, dtype=torch.long)
    # Batches of consecutive windows with the same length and the same first scored offset.
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        last = groups[-1][-1] if groups else None
        same = last is not None and (last[1] - last[0], last[2] - last[0]) == (span[1] - span[0], span[2] - span[0])
        if same and len(groups[-1]) < batch_size:
            groups[-1].append(span)
        else:
            groups.append([span])
    total, scored = 0.0, 0
    bar = tqdm(total=len(spans), desc="perplexity", unit="window", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with torch.inference_mode():
        for group in groups:
            start, end, first = group[0]
            ids = torch.stack([token_ids[s:e] for s, e, _ in group])
            nll = _window_nll(model, ids)[:, first - start - 1 :]
            total += nll.sum().item()
            scored += nll.numel()
            bar.update(len(group))
    bar.close()
    mean = total / scored
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": scored,
        "input_tokens": token_ids.numel(),
        "context": context,
        "stride": check_window(context, stride),
        "windows": len(spans),
    }


def perplexity_of_text(
    model,
    tokenizer,
    text: str,
    context: int,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
    max_tokens: int | None = None,
) -> dict:
    """Perplexity of ``text`` tokenised as plain text (no added special tokens), optionally its first ``max_tokens``."""
    return perplexity(model, text_token_ids(tokenizer, text, max_tokens), context, stride, batch_size, progress)


def text_token_ids(tokenizer, text: str, max_tokens: int | None = None) -> torch.LongTensor:
    """``text`` tokenised as plain text (no added special tokens) as a 1-D tensor, optionally its first ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)
