"""Data-parallel conversion training (DDP and FSDP2) on real gloo process groups.

Reference: the single-process run of the same config (same global batch): the loss curve of
2 ranks (DDP, or FSDP with every rank holding only its shard of the trained parameters), and
of runs resumed on another number of ranks, must equal it. A rank that dies
while rank 0 writes a checkpoint ends the job with an error from every rank and leaves the
last complete checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from spikingbrain.distributed.comm import DistributedError, launch
from spikingbrain.distributed.training import DistributedTrainer
from spikingbrain.train.config import load_train_config
from spikingbrain.train.trainer import Trainer
from train.test_trainer import write_config

STAGES = [
    {"name": "calibrate", "kind": "calibrate", "steps": 1, "seq_len": 32, "batch_size": 4},
    {"name": "transfer", "kind": "transfer", "steps": 2, "seq_len": 32, "batch_size": 4, "lr": 3e-3, "trainable": "lora"},
    {"name": "distill", "kind": "distill", "steps": 2, "seq_len": 32, "batch_size": 4, "lr": 3e-3, "trainable": "lora"},
    {"name": "distill-long", "kind": "distill", "steps": 2, "seq_len": 48, "batch_size": 4, "lr": 3e-3, "trainable": "lora", "grad_accum": 2},
]


def config(tmp_path: Path, pair, name: str, stages: int = len(STAGES)) -> str:
    return str(write_config(tmp_path / f"{name}.yaml", pair, tmp_path / name, stages=STAGES[:stages], checkpoint_every=2))


def curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(got: list[dict], want: list[dict]) -> None:
    assert [(r["step"], r["stage"], r["tokens_seen"]) for r in got] == [(r["step"], r["stage"], r["tokens_seen"]) for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "kl", "ce", "mse", "ppl", "grad_norm", "lr"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])


def _train_worker(rank: int, world: int, jobs: list, parallel: str = "ddp") -> list[list[list[int]]]:
    """Run the jobs; returns the rows (token lists) of every micro-batch this rank trained on."""
    seen = []

    class Recording(DistributedTrainer):
        def _step_loss(self, ids, stage, layers, loss_mask=None):
            seen.append(ids.tolist())
            if parallel == "fsdp":  # this rank holds only its shard of each trained parameter
                trained = [p for p in self.student.parameters() if p.requires_grad]
                assert all(isinstance(p, DTensor) for p in trained)
                assert sum(p.to_local().numel() for p in trained) * world <= sum(p.numel() for p in trained) + world * len(trained)
            return super()._step_loss(ids, stage, layers, loss_mask)

    for path, resume in jobs:
        Recording(load_train_config(path), resume=resume, progress=False, parallel=parallel).run()
    return seen


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, pair) -> Path:
    """The folder of the single-process run of the whole config."""
    root = tmp_path_factory.mktemp("reference")
    Trainer(load_train_config(config(root, pair, "single")), progress=False).run()
    return root / "single"


@pytest.fixture(scope="module")
def reference(reference_run) -> list[dict]:
    """The loss curve of the single-process run of the whole config."""
    return curve(reference_run)


def test_two_ranks_follow_the_single_process_curve_and_checkpoints_move_between_world_sizes(tmp_path, pair, reference):
    # two ranks: a whole run, and a run cut after the first distill stage that one process then resumes to the end
    rows = launch(_train_worker, 2, ([(config(tmp_path, pair, "two"), False), (config(tmp_path, pair, "cut", stages=3), False)],), timeout_s=120)
    assert len(rows[0]) == len(rows[1]) == 2 + 2 + 2 * 2 + 2 + 2  # micro-batches of both runs
    for mine, theirs in zip(*rows):  # each rank trains on its own half of every global batch of 4 rows
        assert len(mine) == len(theirs) == 2 and not {tuple(r) for r in mine} & {tuple(r) for r in theirs}
    Trainer(load_train_config(config(tmp_path, pair, "cut")), resume=True, progress=False).run()
    for name in ("two", "cut"):
        assert_same_curve(curve(tmp_path / name), reference)
    assert not list((tmp_path / "two" / "checkpoints").glob(".*"))  # no staging folders left
    assert {p.name for p in (tmp_path / "two").iterdir()} >= {"final", "delta.safetensors", "summary.json", "metrics.jsonl", "held_out.txt"}


def test_fsdp_ranks_follow_the_single_process_curve_and_checkpoints_move_between_world_sizes(tmp_path, pair, reference, reference_run):
    # FSDP2 on 2 ranks trains the first three stages (checkpoints: sharded parameters and optimizer state
    # gathered into the single-process format); losing the last checkpoint, one process resumes mid-distill
    # from step 4 to the end; losing the last again, 2 FSDP ranks resume mid-way through the grad_accum stage.
    out = tmp_path / "fsdp"
    rows = launch(_train_worker, 2, ([(config(tmp_path, pair, "fsdp", stages=3), False)], "fsdp"), timeout_s=120)
    assert len(rows[0]) == len(rows[1]) == 2 + 2
    for mine, theirs in zip(*rows):  # each rank trains on its own half of every global batch of 4 rows
        assert len(mine) == len(theirs) == 2 and not {tuple(r) for r in mine} & {tuple(r) for r in theirs}
    assert_same_curve(curve(out), [r for r in reference if r["step"] <= 5])
    path = config(tmp_path, pair, "fsdp")
    shutil.rmtree(out / "checkpoints" / "step-5")
    Trainer(load_train_config(path), resume=True, progress=False).run()
    assert_same_curve(curve(out), reference)
    shutil.rmtree(out / "checkpoints" / "step-7")
    shutil.rmtree(out / "final")
    launch(_train_worker, 2, ([(path, True)], "fsdp"), timeout_s=120)
    assert_same_curve(curve(out), reference)
    assert {p.name for p in out.iterdir()} >= {"final", "delta.safetensors", "summary.json", "metrics.jsonl"}
    # the final folder, written from the gathered parameters, holds the single-process run's weights
    got, want = (load_file(str(run / "final" / "model.safetensors")) for run in (out, reference_run))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert (got[name] - tensor).abs().max() <= 1e-3 * tensor.abs().max(), name


def _dies_while_checkpointing(rank: int, world: int, path: str) -> None:
    """Rank 0 dies half-way through writing the step-4 checkpoint (after its trained tensors, before the rest)."""
    import spikingbrain.train.trainer as trainer_module

    real = trainer_module.save_file

    def save_file(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        if rank == 0 and "step-4" in filename:
            os._exit(9)

    trainer_module.save_file = save_file
    DistributedTrainer(load_train_config(path), progress=False).run()


def test_a_rank_dying_during_a_checkpoint_leaves_the_last_complete_one(tmp_path, pair, reference):
    path = config(tmp_path, pair, "killed")
    with pytest.raises(DistributedError) as caught:
        launch(_dies_while_checkpointing, 2, (path,), timeout_s=10)
    message = str(caught.value)
    assert "rank 0: ended without reporting (exit code 9" in message
    assert "rank 1: " in message and "another rank stopped or stalled" in message
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-2", "step-3"]  # step-4 never appears
    assert list(checkpoints.glob(".step-4.*"))  # ... its half-written staging folder does, under a hidden name
    assert {p.name for p in (checkpoints / "step-3").iterdir()} == {"trained.safetensors", "optimizer.safetensors", "trainer_state.json"}
    assert not (tmp_path / "killed" / "final").exists() and not (tmp_path / "killed" / "summary.json").exists()
    # one process resumes from step 3 and ends on the uninterrupted curve
    Trainer(load_train_config(path), resume=True, progress=False).run()
    assert_same_curve(curve(tmp_path / "killed"), reference)
