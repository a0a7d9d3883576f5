"""Stored teacher targets against the live teacher forward: same hidden states, same training curve, clear errors."""

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


def live(teacher, ids):
    with torch.no_grad():
        return teacher.model(input_ids=ids, use_cache=False).last_hidden_state


def test_rows_are_computed_once_then_read_back_equal_to_the_teacher(tmp_path):
    teacher = tiny_teacher()
    ids = torch.randint(0, 61, (3, 17), generator=torch.Generator().manual_seed(1))
    targets = TeacherTargets(tmp_path, teacher)
    first = targets(ids)
    assert (targets.hits, targets.misses) == (0, 3)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    assert torch.allclose(first, live(teacher, ids), rtol=1e-6, atol=1e-6)
    # a batch with two stored rows (in another order) and one new row computes only the new one
    new_row = torch.randint(0, 61, (1, 17), generator=torch.Generator().manual_seed(2))
    mixed = torch.cat((ids[2:], new_row, ids[:1]))
    again = targets(mixed)
    assert (targets.hits, targets.misses) == (2, 4)
    assert torch.equal(again[0], first[2]) and torch.equal(again[2], first[0])
    assert torch.allclose(again, live(teacher, mixed), rtol=1e-6, atol=1e-6)
    # another process (a later run) reads what this one wrote
    reader = TeacherTargets(tmp_path, teacher)
    assert torch.equal(reader(ids), first) and (reader.hits, reader.misses) == (3, 0)


def test_another_teacher_or_mode_does_not_take_these_targets(tmp_path):
    teacher, ids = tiny_teacher(), torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    TeacherTargets(tmp_path, teacher)(ids)
    other = tiny_teacher()
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    changed = TeacherTargets(tmp_path, other)
    assert torch.allclose(changed(ids), live(other, ids), rtol=1e-6, atol=1e-6) and changed.misses == 2
    bf16 = TeacherTargets(tmp_path, teacher, mode="cuda-bf16")
    bf16(ids)
    assert bf16.misses == 2


def test_damaged_or_foreign_files_are_named(tmp_path):
    teacher, ids = tiny_teacher(), torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(4))
    targets = TeacherTargets(tmp_path, teacher)
    targets(ids)
    path = targets.path_of(ids[0])
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=str(path)) as error:
        targets(ids)
    assert "delete it" in str(error.value)
    other_row = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(5))
    targets(other_row)
    targets.path_of(other_row[0]).replace(path)  # a file under the wrong row's name
    with pytest.raises(ValueError, match="does not hold the targets of its token row"):
        targets(ids)


def test_training_with_stored_targets_follows_the_same_curve(tmp_path, pair):
    """A run that stores the teacher's targets, and a later run that reads all of them, both train exactly as a
    run with the live teacher."""
    def run(name, **extra):
        path = write_config(tmp_path / f"{name}.yaml", pair, tmp_path / name, steps=(2, 4), calibrate=False, **extra)
        Trainer(load_train_config(path), progress=False).run()
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    store = str(tmp_path / "targets")
    run("live")
    writer = run("writer", teacher_targets=store)
    reader = run("reader", teacher_targets=store)
    assert curve(tmp_path / "live") == curve(tmp_path / "writer") == curve(tmp_path / "reader")
    rows = 4 * 2 * 2  # distill steps x grad_accum x batch_size
    assert (writer[-1]["teacher_targets_read"], writer[-1]["teacher_targets_computed"]) == (0, rows)
    assert (reader[-1]["teacher_targets_read"], reader[-1]["teacher_targets_computed"]) == (rows, 0)
