"""Stored teacher targets against the live teacher forward: the same expected head rows and negentropy as computed from
the teacher's logits here, the same training curve (to fp32 rounding), clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.train.config import load_train_config
from spikingbrain.train.teacher_targets import TeacherTargets
from spikingbrain.train.trainer import Trainer

from .test_trainer import curve, write_config


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    config = SpikingBrainConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, layer_mixers=["full", "full"],
                                tie_word_embeddings=True)
    return SpikingBrainForCausalLM(config).requires_grad_(False).eval()


def live(teacher, ids, head, temperature=1.0):
    """Σ_v p_v W_v and Σ_v p_v log p_v of the teacher's softmax(logits / T), from its full logits."""
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(ids, use_cache=False).logits.double() / temperature, -1)
    p = log_p.exp()
    return (p @ head.double()).float(), (p * log_p).sum(-1).float()


def assert_targets(got, teacher, ids, head, temperature=1.0):
    expected, negentropy = live(teacher, ids, head, temperature)
    assert got.temperature == temperature
    assert torch.allclose(got.expected, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.negentropy, negentropy, rtol=1e-5, atol=1e-5)


def test_rows_are_computed_once_then_read_back_equal_to_the_teacher(tmp_path):
    teacher = tiny_teacher()
    head = teacher.lm_head.weight
    ids = torch.randint(0, 61, (3, 17), generator=torch.Generator().manual_seed(1))
    targets = TeacherTargets(tmp_path, teacher)
    first = targets(ids, head)
    assert (targets.hits, targets.misses) == (0, 3)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    assert_targets(first, teacher, ids, head)
    # a batch with two stored rows (in another order) and one new row computes only the new one
    new_row = torch.randint(0, 61, (1, 17), generator=torch.Generator().manual_seed(2))
    mixed = torch.cat((ids[2:], new_row, ids[:1]))
    again = targets(mixed, head)
    assert (targets.hits, targets.misses) == (2, 4)
    assert torch.equal(again.expected[0], first.expected[2]) and torch.equal(again.negentropy[2], first.negentropy[0])
    assert_targets(again, teacher, mixed, head)
    # another process (a later run) reads what this one wrote
    reader = TeacherTargets(tmp_path, teacher)
    assert torch.equal(reader(ids, head).expected, first.expected) and (reader.hits, reader.misses) == (3, 0)


def test_another_teacher_mode_student_head_or_temperature_does_not_take_these_targets(tmp_path):
    teacher, ids = tiny_teacher(), torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    head = teacher.lm_head.weight
    TeacherTargets(tmp_path, teacher)(ids, head)
    other = tiny_teacher()
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    changed = TeacherTargets(tmp_path, other)
    assert_targets(changed(ids, head), other, ids, head)
    assert changed.misses == 2
    bf16 = TeacherTargets(tmp_path, teacher, mode="cuda-bf16")
    bf16(ids, head)
    assert bf16.misses == 2
    same = TeacherTargets(tmp_path, teacher)
    student_head = head.clone()
    student_head[3] += 1e-3  # another student head: other expected rows
    assert_targets(same(ids, student_head), teacher, ids, student_head)
    assert_targets(same(ids, head, temperature=2.0), teacher, ids, head, 2.0)
    assert same.misses == 4
    same(ids, head.clone())  # an equal head, another tensor: the same files
    assert same.hits == 2


def test_damaged_or_foreign_files_are_named(tmp_path):
    teacher, ids = tiny_teacher(), torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(4))
    head = teacher.lm_head.weight
    targets = TeacherTargets(tmp_path, teacher)
    targets(ids, head)
    path = targets.path_of(ids[0], head)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=str(path)) as error:
        targets(ids, head)
    assert "delete it" in str(error.value)
    other_row = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(5))
    targets(other_row, head)
    targets.path_of(other_row[0], head).replace(path)  # a file under the wrong row's name
    with pytest.raises(ValueError, match="does not hold the targets of its token row"):
        targets(ids, head)


def test_training_with_stored_targets_follows_the_same_curve(tmp_path, pair):
    """A run that stores the teacher's targets, and a later run that reads all of them, train exactly alike, and as
    a run with the live teacher up to fp32 rounding (the stored targets skip one head product)."""
    def run(name, **extra):
        path = write_config(tmp_path / f"{name}.yaml", pair, tmp_path / name, steps=(2, 4), calibrate=False, **extra)
        Trainer(load_train_config(path), progress=False).run()
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    store = str(tmp_path / "targets")
    run("live")
    writer = run("writer", teacher_targets=store)
    reader = run("reader", teacher_targets=store)
    assert curve(tmp_path / "writer") == curve(tmp_path / "reader")
    for live_step, stored_step in zip(curve(tmp_path / "live"), curve(tmp_path / "writer"), strict=True):
        for live_value, stored_value in zip(live_step, stored_step, strict=True):
            numbers = isinstance(live_value, float)
            assert stored_value == (pytest.approx(live_value, rel=1e-4, abs=1e-6) if numbers else live_value)
    rows = 4 * 2 * 2  # distill steps x grad_accum x batch_size
    assert (writer[-1]["teacher_targets_read"], writer[-1]["teacher_targets_computed"]) == (0, rows)
    assert (reader[-1]["teacher_targets_read"], reader[-1]["teacher_targets_computed"]) == (rows, 0)
