"""Distillation losses computed a slice of positions at a time, so that no ``[tokens, vocab]`` tensor outlives its slice.

The student's loss is ``kl_weight * T² KL(teacher || student) + ce_weight * CE(next token)``
per token (the trainer's distillation loss). :func:`chunked_distill_loss` takes the student's
and the teacher's final hidden states instead of their logits: for each slice of positions
it projects both through their heads, computes the loss and its gradient with respect to the
student's hidden states in closed form (``softmax - target``), and keeps only that gradient,
which is ``[tokens, hidden]``. The value and the gradients equal those of the full loss.

The teacher's side can also come reduced (:class:`TeacherExpectations`, stored per training row by
``train.teacher_targets``): with the student's frozen head ``W``, the KL needs of the teacher's
distribution ``p`` only its expected head row ``e = Σ_v p_v W_v`` and ``Σ_v p_v log p_v`` per position,
because ``Σ_v p_v log q_v = h·e / T - logsumexp(h Wᵀ / T)`` and the KL's gradient for ``h`` is
``T (q_T W - e)``. A step then makes two ``[tokens, vocab]`` head products instead of three.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

__all__ = ["chunked_distill_loss", "full_distill_loss", "position_weights", "teacher_expectations", "TeacherExpectations",
           "DEFAULT_LOSS_CHUNK"]

#: Positions per slice: 256 x 49,152 fp32 logits are 50 MB.
DEFAULT_LOSS_CHUNK = 256


class TeacherExpectations(NamedTuple):
    """A teacher's targets reduced to what the KL at ``temperature`` needs, for one frozen student head ``W``: per
    position ``expected`` ``[B, T, hidden]`` ``= Σ_v p_v W_v`` and ``negentropy`` ``[B, T]`` ``= Σ_v p_v log p_v``,
    with ``p = softmax(teacher logits / temperature)``."""

    expected: torch.Tensor
    negentropy: torch.Tensor
    temperature: float


@torch.no_grad()
def teacher_expectations(target_hidden: torch.Tensor, target_head_weight: torch.Tensor, head_weight: torch.Tensor,
                         temperature: float = 1.0, chunk: int = DEFAULT_LOSS_CHUNK) -> TeacherExpectations:
    """:class:`TeacherExpectations` of the teacher's final hidden states ``[B, T, hidden]`` through its head, for the
    student head ``head_weight`` ``[V, hidden]``, a slice of positions at a time."""
    B, L, _ = target_hidden.shape
    flat = target_hidden.reshape(B * L, -1)
    expected = torch.empty(B * L, head_weight.shape[1], dtype=torch.float32, device=flat.device)
    negentropy = torch.empty(B * L, dtype=torch.float32, device=flat.device)
    for start in range(0, B * L, chunk):
        rows = slice(start, min(start + chunk, B * L))
        log_p, p = _teacher_distribution(flat[rows], target_head_weight.float(), temperature)
        negentropy[rows] = (p * log_p).sum(-1)
        expected[rows] = p @ head_weight.float()
    return TeacherExpectations(expected.view(B, L, -1), negentropy.view(B, L), float(temperature))


def position_weights(ids: torch.Tensor, loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl, ce)`` float ``[B, T]`` weights of each position's prediction in the loss's weighted mean.

    ``loss_mask[b, t]`` says how much token ``t`` counts as a target: a boolean mask (True: 1, False: 0)
    or non-negative float weights (None: every token, weight 1). Position ``t`` predicts token ``t + 1``
    and takes that token's weight; the last position has no next token, so its KL takes its own
    token's weight, and it has no cross-entropy.
    """
    weight = torch.ones_like(ids, dtype=torch.float32) if loss_mask is None else loss_mask.to(torch.float32)
    kl = torch.cat((weight[:, 1:], weight[:, -1:]), 1)
    ce = torch.cat((weight[:, 1:], torch.zeros_like(weight[:, :1])), 1)
    return kl, ce


def full_distill_loss(logits, target_logits, ids, kl_weight: float, ce_weight: float, temperature: float = 1.0,
                      loss_mask: torch.Tensor | None = None):
    """The distillation loss from whole ``[B, T, V]`` logits, a weighted mean over the positions
    (:func:`position_weights`); the reference the chunked loss must equal."""
    T, vocab = temperature, logits.shape[-1]
    logits, target_logits = logits.float(), target_logits.float()
    kl_w, ce_w = (w.to(logits.device) for w in position_weights(ids, loss_mask))
    kl_each = F.kl_div(
        F.log_softmax(logits.reshape(-1, vocab) / T, -1), F.log_softmax(target_logits.reshape(-1, vocab) / T, -1),
        log_target=True, reduction="none",
    ).sum(-1)
    kl = (kl_each * kl_w.reshape(-1)).sum() / _total(kl_w) * T * T
    ce_each = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none")
    ce = (ce_each * ce_w[:, :-1].reshape(-1)).sum() / _total(ce_w)
    return kl_weight * kl + ce_weight * ce, {"kl": kl.item(), "ce": ce.item()}


def _total(weights: torch.Tensor) -> float:
    """The denominator of a weighted mean: the weights' sum, or 1 where nothing is scored."""
    total = float(weights.sum())
    return total if total > 0 else 1.0


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, in place (the logits are a fresh temporary)."""
    return logits if temperature == 1.0 else logits.div_(temperature)


def _teacher_distribution(hidden_rows: torch.Tensor, head_weight: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, p)`` of the teacher's softmax at ``temperature`` for rows of its final hidden states (``head_weight`` fp32)."""
    log_p = F.log_softmax(_scaled(hidden_rows.float() @ head_weight.t(), temperature), -1)
    return log_p, log_p.exp()


class _ChunkedDistill(torch.autograd.Function):
    """Loss value in forward; the gradient for the student's hidden states is computed there too and scaled in backward.
    The teacher comes as its hidden states and head (``target``: a pair) or as :class:`TeacherExpectations`."""

    @staticmethod
    def forward(ctx, hidden, head_weight, target, ids, loss_mask, kl_weight, ce_weight, temperature, chunk):
        B, L, _ = hidden.shape
        flat, weight = hidden.reshape(B * L, -1), head_weight.float()
        reduced = isinstance(target, TeacherExpectations)
        if reduced:
            expected, negentropy = target.expected.reshape(B * L, -1).float(), target.negentropy.reshape(-1).float()
        else:
            target_flat, target_weight = target[0].reshape(B * L, -1), target[1].float()
        # Next-token targets in flat order (the last position of each row has none), and where each loss counts.
        next_ids = torch.cat((ids[:, 1:], ids[:, :1]), 1).reshape(-1)
        kl_w, ce_w = (w.reshape(-1).to(hidden.device) for w in position_weights(ids, loss_mask))
        n_kl, n_ce = _total(kl_w), _total(ce_w)
        grad = torch.empty_like(flat, dtype=torch.float32)
        kl_sum = ce_sum = 0.0
        Tm = temperature
        for start in range(0, B * L, chunk):
            rows = slice(start, min(start + chunk, B * L))
            h = flat[rows].float()
            logits = h @ weight.t()
            log_q = F.log_softmax(logits / Tm if Tm != 1.0 else logits, -1)  # at the temperature; logits kept for the CE
            kl_rows = kl_w[rows]
            kl_scale = kl_rows * (kl_weight * Tm / n_kl)  # d(T² KL)/dz = T (q_T - p_T), per position's weight
            if reduced:  # KL = Σ p log p + logsumexp(z / T) - h·e / T, where logsumexp(z / T) = z_0 / T - log q_0
                logsumexp = (logits[:, 0] / Tm if Tm != 1.0 else logits[:, 0]) - log_q[:, 0]
                kl_each = negentropy[rows] + logsumexp - (h * expected[rows]).sum(-1) / Tm
                kl_sum += float((kl_each * kl_rows).sum())
                dz = log_q.exp().mul_(kl_scale[:, None])  # the -p part is -e after the product
            else:
                log_p, p = _teacher_distribution(target_flat[rows], target_weight, Tm)
                kl_sum += float((log_p.sub_(log_q).mul_(p).sum(-1) * kl_rows).sum())  # sum p (log p - log q); log_p is spent
                del log_p
                dz = log_q.exp().sub_(p).mul_(kl_scale[:, None])
                del p
            targets, ce_rows = next_ids[rows], ce_w[rows]
            scored = ce_rows.nonzero()[:, 0]
            if Tm != 1.0:  # the cross-entropy is at temperature 1
                log_q = F.log_softmax(logits, -1)
            del logits
            ce_sum -= float((log_q[scored, targets[scored]] * ce_rows[scored]).sum())
            if ce_weight:
                dce = log_q.exp_()  # log_q is spent; d CE/dz = q - onehot, times the position's weight
                dce[scored, targets[scored]] -= 1.0
                dz.add_(dce.mul_(ce_rows[:, None]), alpha=ce_weight / n_ce)
            del log_q
            grad[rows] = dz @ weight
            if reduced:
                grad[rows] -= expected[rows] * kl_scale[:, None]
        kl = torch.tensor(kl_sum * Tm * Tm / n_kl, dtype=torch.float64)
        ce = torch.tensor(ce_sum / n_ce, dtype=torch.float64)
        ctx.save_for_backward(grad.view_as(hidden).to(hidden.dtype))
        ctx.mark_non_differentiable(kl, ce)
        loss = (kl_weight * kl + ce_weight * ce).to(hidden.dtype)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None, None, None


def chunked_distill_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    target_hidden: torch.Tensor | TeacherExpectations,
    target_head_weight: torch.Tensor | None,
    ids: torch.Tensor,
    kl_weight: float,
    ce_weight: float,
    temperature: float = 1.0,
    chunk: int = DEFAULT_LOSS_CHUNK,
    loss_mask: torch.Tensor | None = None,
):
    """The distillation loss from final hidden states ``[B, T, hidden]`` and the heads' weights ``[V, hidden]``.

    The teacher's side is its final hidden states and head weight, or :class:`TeacherExpectations` for this
    ``head_weight`` and ``temperature`` (then ``target_head_weight`` is None): one head product per slice less.
    Returns ``(loss, {"kl": ..., "ce": ...})`` like :func:`full_distill_loss`, over the same scored
    positions. Gradients flow into ``hidden`` only: the output heads are frozen during conversion training.
    """
    if head_weight.requires_grad:
        raise ValueError("chunked_distill_loss keeps the output head frozen; train it with the full loss instead")
    if chunk < 1:
        raise ValueError(f"loss chunk must be >= 1 positions, got {chunk}")
    if isinstance(target_hidden, TeacherExpectations):
        if target_hidden.temperature != float(temperature):
            raise ValueError(f"teacher expectations were computed at temperature {target_hidden.temperature}, the loss is at "
                             f"{temperature}; compute them at the loss's temperature")
        target = TeacherExpectations(target_hidden.expected.detach(), target_hidden.negentropy.detach(), target_hidden.temperature)
    else:
        target = (target_hidden.detach(), target_head_weight.detach())
    loss, kl, ce = _ChunkedDistill.apply(
        hidden, head_weight, target, ids, loss_mask, float(kl_weight), float(ce_weight), float(temperature), int(chunk),
    )
    return loss, {"kl": kl.item(), "ce": ce.item()}
