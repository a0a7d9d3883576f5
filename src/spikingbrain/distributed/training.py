"""Data-parallel conversion training under ``torchrun``: DDP over the ranks, each training on its rows of every global batch.

Every rank holds the whole student and teacher; ``DistributedDataParallel`` averages the
gradients, so a step equals the single-process step on the same global batch (the transfer
loss divides by the whole batch's target energy, all-reduced). Rank 0 writes every file;
checkpoints hold the full tensors in the single-process format, so a run resumes on any
number of ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..train.config import StageConfig, TrainConfig
from ..train.trainer import Trainer, TrainingError, config_from_args
from .comm import DEFAULT_TIMEOUT_S, describe_failure, init_from_env, launched_by_torchrun

__all__ = ["DistributedTrainer", "extend_train_command"]


class _StepLoss(nn.Module):
    """The trainer's micro-batch loss as a module owning the student, so that DDP can wrap it."""

    def __init__(self, trainer: "DistributedTrainer"):
        super().__init__()
        self.student = trainer.student
        self.trainer = trainer

    def forward(self, ids: torch.Tensor, stage: StageConfig, layers: list[int]):
        return Trainer._step_loss(self.trainer, ids, stage, layers)


class DistributedTrainer(Trainer):
    """A :class:`Trainer` on one rank of an initialised process group (data parallel with DDP)."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True):
        if not dist.is_initialized():
            raise TrainingError("DistributedTrainer needs a process group; start the run with torchrun")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writes_files = self.rank == 0
        for i, stage in enumerate(config.stages):
            if stage.batch_size % self.world:
                raise TrainingError(
                    f"config: stages[{i}].batch_size={stage.batch_size} is not a multiple of the {self.world} ranks; "
                    "use a global batch that divides evenly (each rank trains on batch_size / ranks rows)"
                )
        if torch.cuda.is_available() and config.device in ("auto", "cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", self.rank)))
        self._wrapped: tuple[int, DistributedDataParallel] | None = None
        super().__init__(config, resume=resume, progress=progress and self.rank == 0)

    def _local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        rows = batch.shape[0] // self.world
        return batch[self.rank * rows : (self.rank + 1) * rows]

    def _step_loss(self, ids: torch.Tensor, stage: StageConfig, layers: list[int]):
        if self._wrapped is None or self._wrapped[0] != self.stage_index:  # trainable parameters change per stage
            self._wrapped = (self.stage_index, DistributedDataParallel(_StepLoss(self)))
        loss, parts = self._wrapped[1](ids, stage, layers)
        # The log shows the global batch's values: the mean over ranks ("loss" here replaces the local one).
        values = torch.tensor([loss.item(), *parts.values()], dtype=torch.float64)
        dist.all_reduce(values)
        return loss, dict(zip(["loss", *parts], (values / self.world).tolist()))

    def _target_energy(self, target: torch.Tensor) -> torch.Tensor:
        # the whole global batch's energy, so that the averaged gradients are those of one process
        energy = target.detach().float().pow(2).mean()
        dist.all_reduce(energy)
        return (energy / self.world).clamp_min(1e-12)

    def _log(self, record: dict) -> None:
        if self.writes_files:
            super()._log(record)

    def _truncate_metrics(self) -> None:
        if self.writes_files:
            super()._truncate_metrics()

    def _save_checkpoint(self, optimizer, scheduler, batches):
        path = super()._save_checkpoint(optimizer, scheduler, batches) if self.writes_files else None
        dist.barrier()  # no rank starts the next step before the checkpoint is whole
        return path

    def export_delta(self, path, lora_dtype: torch.dtype = torch.bfloat16):
        """Rank 0 writes the delta file (see :meth:`Trainer.export_delta`)."""
        result = super().export_delta(path, lora_dtype) if self.writes_files else path
        dist.barrier()
        return result

    def _save_final_model(self, folder) -> None:
        if self.writes_files:
            super()._save_final_model(folder)
        dist.barrier()


def _run_distributed(args: argparse.Namespace) -> int:
    """``spikingbrain train`` on one rank of a ``torchrun`` job."""
    config = config_from_args(args)
    device = "cuda" if torch.cuda.is_available() and config.device in ("auto", "cuda") else "cpu"
    init_from_env(device, args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        summary = DistributedTrainer(config, resume=args.resume, progress=not args.no_progress).run()
    except BaseException as err:
        print(f"rank {rank} of {world}: {describe_failure(err)}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(summary, indent=1))
    return 0


def extend_train_command(parser: argparse.ArgumentParser) -> None:
    """Let ``spikingbrain train`` run data-parallel when started by ``torchrun`` (one process per rank)."""
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="under torchrun: seconds a rank waits for the others")
    single = parser.get_default("func")

    def run(args: argparse.Namespace) -> int:
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not args.plot:
            return _run_distributed(args)
        return single(args)

    parser.set_defaults(func=run)
