"""The chunked distillation loss against the full-logits loss: same value, same gradients, any slice size; also with
the teacher reduced to its expected head rows and negentropy (``TeacherExpectations``)."""

from __future__ import annotations

import pytest
import torch

from spikingbrain.train.losses import chunked_distill_loss, full_distill_loss, teacher_expectations


def case(B=2, T=9, H=6, V=23, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float32)
    head = torch.randn(V, H, generator=gen, dtype=torch.float32)
    target_hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float32)
    target_head = torch.randn(V, H, generator=gen, dtype=torch.float32)
    ids = torch.randint(0, V, (B, T), generator=gen)
    return hidden, head, target_hidden, target_head, ids


@pytest.mark.parametrize("chunk", [1, 4, 7, 18, 1000])
@pytest.mark.parametrize("kl_weight,ce_weight,temperature", [(1.0, 0.1, 1.0), (1.0, 0.0, 2.0), (0.5, 1.0, 1.5), (0.0, 1.0, 1.0)])
def test_chunked_loss_equals_full_loss(chunk, kl_weight, ce_weight, temperature):
    hidden, head, target_hidden, target_head, ids = case()
    full_hidden = hidden.clone().requires_grad_(True)
    expected, expected_parts = full_distill_loss(
        full_hidden @ head.t(), target_hidden @ target_head.t(), ids, kl_weight, ce_weight, temperature
    )
    expected.backward()
    chunk_hidden = hidden.clone().requires_grad_(True)
    got, parts = chunked_distill_loss(chunk_hidden, head, target_hidden, target_head, ids, kl_weight, ce_weight, temperature, chunk)
    (got * 3.0).backward()  # the incoming gradient scales the stored one
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert parts["kl"] == pytest.approx(expected_parts["kl"], rel=1e-5, abs=1e-7)
    assert parts["ce"] == pytest.approx(expected_parts["ce"], rel=1e-5)
    assert torch.allclose(chunk_hidden.grad, 3.0 * full_hidden.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("kl_weight,ce_weight,temperature", [(1.0, 0.1, 1.0), (1.0, 0.0, 2.0), (0.5, 1.0, 1.5)])
def test_loss_from_teacher_expectations_equals_full_loss(chunk, kl_weight, ce_weight, temperature):
    """The teacher reduced to ``e = Σ p_v W_v`` and ``Σ p log p`` (its head differs from the student's here) gives the
    full loss's value and gradients."""
    hidden, head, target_hidden, target_head, ids = case(seed=3)
    full_hidden = hidden.clone().requires_grad_(True)
    expected, expected_parts = full_distill_loss(
        full_hidden @ head.t(), target_hidden @ target_head.t(), ids, kl_weight, ce_weight, temperature
    )
    expected.backward()
    reduced = teacher_expectations(target_hidden, target_head, head, temperature, chunk=5)
    assert reduced.expected.shape == hidden.shape and reduced.negentropy.shape == ids.shape
    chunk_hidden = hidden.clone().requires_grad_(True)
    got, parts = chunked_distill_loss(chunk_hidden, head, reduced, None, ids, kl_weight, ce_weight, temperature, chunk)
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["kl"] == pytest.approx(expected_parts["kl"], rel=1e-4, abs=1e-6)
    assert parts["ce"] == pytest.approx(expected_parts["ce"], rel=1e-5)
    assert torch.allclose(chunk_hidden.grad, full_hidden.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="temperature"):
        chunked_distill_loss(hidden, head, reduced, None, ids, kl_weight, ce_weight, temperature + 1.0, chunk)


def test_chunked_loss_refuses_a_trainable_head():
    hidden, head, target_hidden, target_head, ids = case()
    with pytest.raises(ValueError, match="frozen"):
        chunked_distill_loss(hidden, head.requires_grad_(True), target_hidden, target_head, ids, 1.0, 0.1)


def test_distill_loss_of_models_equals_full_logits_loss_with_and_without_checkpointing():
    """The trainer's loss (chunked, from hidden states) equals the full-logits loss on real model outputs,
    and recomputing activations in the backward pass (gradient checkpointing) leaves the gradients unchanged."""
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
    from spikingbrain.train.trainer import distill_loss

    def model(mixers, seed):
        torch.manual_seed(seed)
        config = SpikingBrainConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=len(mixers),
                                    num_attention_heads=4, num_key_value_heads=2, layer_mixers=mixers, sliding_window=4,
                                    gla_chunk_size=8, tie_word_embeddings=True)
        return SpikingBrainForCausalLM(config)

    teacher = model(["full", "full", "full"], 0).requires_grad_(False)
    ids = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        student = model(["gla", "swa", "gla"], 2)
        student.model.embeddings.weight.requires_grad_(False)
        student.train()
        if checkpointing:
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        loss, parts = distill_loss(student, teacher, ids, 1.0, 0.1)
        with torch.no_grad():
            expected, expected_parts = full_distill_loss(student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits, ids, 1.0, 0.1)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert parts["kl"] == pytest.approx(expected_parts["kl"], rel=1e-4)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_window_dropout_shortens_parallel_windows_for_the_step_only():
    """Sliding-window dropout: the parallel layers' window branches see ``short_window`` keys inside the
    context (with probability 1 here), the full-attention branches and plain SWA layers keep theirs."""
    from types import SimpleNamespace

    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
    from spikingbrain.train.config import StageConfig
    from spikingbrain.train.trainer import Trainer

    config = SpikingBrainConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, layer_mixers=["parallel-swa", "parallel-full", "swa"], sliding_window=40)
    model = SpikingBrainForCausalLM(config)
    owner = SimpleNamespace(student=model, config=SimpleNamespace(seed=0), global_step=5)
    windows = lambda: [getattr(b.attn, "softmax", b.attn).window for b in model.model.layers]
    assert windows() == [40, None, 40]
    with Trainer._window_dropout(owner, StageConfig(kind="distill", steps=1, window_dropout=1.0, short_window=8)):
        assert windows() == [8, None, 40]
    assert windows() == [40, None, 40]
    with Trainer._window_dropout(owner, StageConfig(kind="distill", steps=1, window_dropout=0.0, short_window=8)):
        assert windows() == [40, None, 40]
    # a probability in between: the draw depends on the seed and the step only, so a resumed run draws the same
    draws = []
    for step in range(40):
        owner.global_step = step
        with Trainer._window_dropout(owner, StageConfig(kind="distill", steps=1, window_dropout=0.5, short_window=8)):
            draws.append(windows()[0] == 8)
    again = []
    for step in range(40):
        owner.global_step = step
        with Trainer._window_dropout(owner, StageConfig(kind="distill", steps=1, window_dropout=0.5, short_window=8)):
            again.append(windows()[0] == 8)
    assert draws == again and 5 < sum(draws) < 35


def test_boolean_config_keys_read_from_yaml_and_overrides(tmp_path):
    """``gradient_checkpointing`` (the config's boolean) reads YAML booleans and ``--set`` values, and refuses others."""
    from spikingbrain.train.config import load_train_config

    path = tmp_path / "c.yaml"
    path.write_text("student: s\nout: o\ngradient_checkpointing: true\nstages:\n  - {kind: distill, steps: 1}\n")
    assert load_train_config(path).gradient_checkpointing is True
    assert load_train_config(path, ["gradient_checkpointing=false"]).gradient_checkpointing is False
    with pytest.raises(ValueError, match="gradient_checkpointing = 'sometimes': expected bool"):
        load_train_config(path, ["gradient_checkpointing=sometimes"])


def test_distill_loss_refuses_slicing_with_a_trainable_head():
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
    from spikingbrain.train.trainer import distill_loss

    config = SpikingBrainConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, layer_mixers=["full"])
    student, teacher = SpikingBrainForCausalLM(config), SpikingBrainForCausalLM(config).requires_grad_(False)
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="frozen output heads"):
        distill_loss(student, teacher, ids, 1.0, 0.1, sliced=True)
    loss, _ = distill_loss(student, teacher, ids, 1.0, 0.1)  # a trainable head: the full-logits loss
    with torch.no_grad():
        expected, _ = full_distill_loss(student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits, ids, 1.0, 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def _loss_by_hand(logits, target_logits, ids, mask, kl_weight, ce_weight, T):
    """Position by position: KL weighted by the next token's weight in ``mask`` (the last position: its own
    token's), CE likewise; each a weighted mean (a boolean mask weighs 1 and 0)."""
    B, L, _ = logits.shape
    weight = mask.float()
    kl_terms, ce_terms = [], []
    for b in range(B):
        for t in range(L):
            w = weight[b, t + 1] if t + 1 < L else weight[b, t]
            if w > 0:
                log_q = torch.log_softmax(logits[b, t] / T, -1)
                log_p = torch.log_softmax(target_logits[b, t] / T, -1)
                kl_terms.append((w * (log_p.exp() * (log_p - log_q)).sum() * T * T, w))
            if t + 1 < L and weight[b, t + 1] > 0:
                ce_terms.append((-weight[b, t + 1] * torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]], weight[b, t + 1]))
    kl = sum(term for term, _ in kl_terms) / sum(w for _, w in kl_terms)
    ce = sum(term for term, _ in ce_terms) / sum(w for _, w in ce_terms)
    return kl_weight * kl + ce_weight * ce


@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_answer_only_mask_and_weights_score_the_answers_in_both_losses(chunk, weighted):
    # a hand-made mask: row 0 scores an "answer" at tokens 5..7 only, row 1 is plain text (all scored);
    # weighted: the answer's tokens weigh 4 and the plain text's 0.5 (a weighted mean)
    hidden, head, target_hidden, target_head, ids = case()
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, 5:8] = True
    mask[1] = True
    loss_mask = mask * torch.tensor([[4.0], [0.5]]) if weighted else mask
    expected = _loss_by_hand(hidden @ head.t(), target_hidden @ target_head.t(), ids, loss_mask, 1.0, 0.3, 1.5)
    full_hidden = hidden.clone().requires_grad_(True)
    full, _ = full_distill_loss(full_hidden @ head.t(), target_hidden @ target_head.t(), ids, 1.0, 0.3, 1.5, loss_mask=loss_mask)
    full.backward()
    chunk_hidden = hidden.clone().requires_grad_(True)
    got, _ = chunked_distill_loss(chunk_hidden, head, target_hidden, target_head, ids, 1.0, 0.3, 1.5, chunk, loss_mask=loss_mask)
    got.backward()
    assert full.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(chunk_hidden.grad, full_hidden.grad, rtol=1e-4, atol=1e-7)
    # positions whose prediction is not scored get no gradient (row 0 scores the predictions at 4, 5 and 6)
    assert chunk_hidden.grad[0, [0, 1, 2, 3, 7, 8]].abs().max() == 0 and chunk_hidden.grad[0, 4:7].abs().min() > 0
    # an all-true mask, or equal weights, is the unmasked loss: only the weights' ratios count
    every = torch.full(ids.shape, 3.0) if weighted else torch.ones(ids.shape, dtype=torch.bool)
    plain, _ = chunked_distill_loss(hidden, head, target_hidden, target_head, ids, 1.0, 0.3, 1.5, chunk)
    masked, _ = chunked_distill_loss(hidden, head, target_hidden, target_head, ids, 1.0, 0.3, 1.5, chunk, loss_mask=every)
    assert masked.item() == pytest.approx(plain.item(), rel=1e-6)
