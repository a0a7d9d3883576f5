"""Data-parallel conversion training under ``torchrun``: DDP or FSDP2 over the ranks, each training on its rows of every global batch.

With DDP every rank holds the whole student and teacher and ``DistributedDataParallel``
averages the gradients. With FSDP2 (``fully_shard``) each stage of training shards the
student's parameters, gradients and optimizer state over the ranks (one unit per block mixer
and feed-forward, gathered when the forward or backward reaches it); the gradients are
averaged by reduce-scatter, and the whole parameters are gathered back at the end of the
stage (calibration, export and the final folder see an ordinary model). Either way a step
equals the single-process step on the same global batch (the transfer loss divides by the
whole batch's target energy, all-reduced). Rank 0 writes every file; checkpoints hold the
full tensors in the single-process format, so a run resumes on any number of ranks and with
either kind of parallelism.
"""

from __future__ import annotations

import os
import re
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..train.config import StageConfig, TrainConfig
from ..train.trainer import Trainer, TrainingError
from .comm import describe_failure, init_from_env
from .options import PARALLEL_KINDS

__all__ = ["DistributedTrainer", "train_on_this_rank"]

#: Whole tensors gathered on rank 0 only, on the CPU (the format of a single-process checkpoint).
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


class _StepLoss(nn.Module):
    """The trainer's micro-batch loss as a module owning the student, so that DDP can wrap it."""

    def __init__(self, trainer: "DistributedTrainer"):
        super().__init__()
        self.student = trainer.student
        self.trainer = trainer

    def forward(self, ids: torch.Tensor, stage: StageConfig, layers: list[int], loss_mask: torch.Tensor | None = None):
        return Trainer._step_loss(self.trainer, ids, stage, layers, loss_mask)


class _Unit(nn.Module):
    """One FSDP unit of a training stage around a block's mixer or feed-forward (a module can be sharded only once)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _plain_name(qualified: str) -> str:
    """A student parameter's name from its name under the sharded root (``student.`` and ``.inner`` removed)."""
    return re.sub(r"\.(attn|mlp)\.inner\.", r".\1.", qualified.removeprefix("student."))


class DistributedTrainer(Trainer):
    """A :class:`Trainer` on one rank of an initialised process group (data parallel with DDP, or sharded with FSDP2: ``parallel="fsdp"``)."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True, parallel: str = "ddp"):
        if not dist.is_initialized():
            raise TrainingError("DistributedTrainer needs a process group; start the run with torchrun")
        if parallel not in PARALLEL_KINDS:
            raise TrainingError(f"parallel={parallel!r} is not one of {list(PARALLEL_KINDS)}")
        self.parallel = parallel
        self._sharded: nn.Module | None = None  # the FSDP2 root (a _StepLoss) while a stage trains sharded
        self._sharded_names: list[str] = []  # the sharded optimizer's parameters by their names under that root, in order
        self._gathered: tuple[dict, dict] | None = None  # rank 0's whole parameters and optimizer state while it writes a checkpoint
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

    def _step_loss(self, ids: torch.Tensor, stage: StageConfig, layers: list[int], loss_mask: torch.Tensor | None = None):
        if self._sharded is not None:
            loss, parts = self._sharded(ids, stage, layers, loss_mask)
        else:
            if self._wrapped is None or self._wrapped[0] != self.stage_index:  # trainable parameters change per stage
                self._wrapped = (self.stage_index, DistributedDataParallel(_StepLoss(self)))
            loss, parts = self._wrapped[1](ids, stage, layers, loss_mask)
        # The log shows the global batch's values: the mean over ranks ("loss" here replaces the local one).
        values = torch.tensor([loss.item(), *parts.values()], dtype=torch.float64)
        dist.all_reduce(values)
        return loss, dict(zip(["loss", *parts], (values / self.world).tolist()))

    def _target_energy(self, target: torch.Tensor) -> torch.Tensor:
        # the whole global batch's energy, so that the averaged gradients are those of one process
        energy = target.detach().float().pow(2).mean()
        dist.all_reduce(energy)
        return (energy / self.world).clamp_min(1e-12)

    # ----- FSDP2: each training stage shards the student, and gathers it back at its end -----

    def _prepare_trainable(self, trainable):
        if self.parallel != "fsdp":
            return trainable
        # Units built afresh for each stage (the trained parameters change): every block's mixer and feed-forward
        # (a transfer stage calls the mixers on their own), and the root with the rest (embeddings, norms, head).
        mesh = init_device_mesh(self.device.type, (self.world,))
        for layer in self.student.model.layers:
            for part in ("attn", "mlp"):
                unit = _Unit(getattr(layer, part))
                fully_shard(unit, mesh=mesh)
                setattr(layer, part, unit)
        root = _StepLoss(self)
        fully_shard(root, mesh=mesh)
        self._sharded = root
        sharded = {_plain_name(name): (name, param) for name, param in root.named_parameters()}
        self._sharded_names = [sharded[name][0] for name in trainable]  # the optimizer's parameters, in its order
        return {name: sharded[name][1] for name in trainable}

    def _run_stage(self, stage, state, bar) -> None:
        super()._run_stage(stage, state, bar)
        if self._sharded is not None:
            self._unshard_for_good()

    def _unshard_for_good(self) -> None:
        """Put the student back together: whole parameters (ties kept) in place of the shards, no units, no FSDP root."""
        whole = {_plain_name(name): t for name, t in get_model_state_dict(self._sharded, options=StateDictOptions(full_state_dict=True)).items()}
        for layer in self.student.model.layers:
            layer.attn, layer.mlp = layer.attn.inner, layer.mlp.inner
        replaced: dict[int, nn.Parameter] = {}
        for qualified, param in self.student.named_parameters(remove_duplicate=False):
            module_name, _, name = qualified.rpartition(".")
            if id(param) not in replaced:
                replaced[id(param)] = nn.Parameter(whole[qualified].detach().to(self.device), requires_grad=param.requires_grad)
            self.student.get_submodule(module_name)._parameters[name] = replaced[id(param)]
        self._sharded = None

    def evaluate(self) -> dict:
        """Held-out perplexity (all ranks take part; a sharded student is gathered for it)."""
        if self._sharded is None:
            return super().evaluate()
        self._sharded.unshard()
        try:
            return super().evaluate()
        finally:
            self._sharded.reshard()

    def _clip_gradients(self, params, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _full_parameters(self):
        return super()._full_parameters() if self._gathered is None else self._gathered[0]

    def _full_optimizer_state(self, optimizer):
        return super()._full_optimizer_state(optimizer) if self._gathered is None else self._gathered[1]

    def _gather_for_checkpoint(self, optimizer) -> tuple[dict, dict]:
        """Whole parameters and optimizer state (on rank 0, CPU) in the single-process format; every rank must call it."""
        params = {_plain_name(name): t for name, t in get_model_state_dict(self._sharded, options=_FULL_ON_RANK0).items()}
        full = get_optimizer_state_dict(self._sharded, optimizer, options=_FULL_ON_RANK0)
        index = {name: i for i, name in enumerate(self._sharded_names)}
        state = {index[name]: entry for name, entry in full.get("state", {}).items()}
        groups = [{**group, "params": [index[name] for name in group["params"]]} for group in full.get("param_groups", [])]
        return params, {"state": state, "param_groups": groups}

    def _load_optimizer_state(self, optimizer, state_dict: dict) -> None:
        if self._sharded is None:
            return super()._load_optimizer_state(optimizer, state_dict)
        names = self._sharded_names
        full = {
            "state": {names[int(i)]: entry for i, entry in state_dict["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state_dict["param_groups"]],
        }
        set_optimizer_state_dict(self._sharded, optimizer, full, options=StateDictOptions(full_state_dict=True))

    def _log(self, record: dict) -> None:
        if self.writes_files:
            super()._log(record)

    def _truncate_metrics(self) -> None:
        if self.writes_files:
            super()._truncate_metrics()

    def _save_checkpoint(self, optimizer, scheduler, batches):
        if self._sharded is not None:
            self._gathered = self._gather_for_checkpoint(optimizer)
        try:
            path = super()._save_checkpoint(optimizer, scheduler, batches) if self.writes_files else None
        finally:
            self._gathered = None
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


def train_on_this_rank(config: TrainConfig, resume: bool, progress: bool, parallel: str, timeout_s: float) -> dict | None:
    """Run ``config`` on this rank of a ``torchrun`` job; the summary on rank 0, None on the other ranks."""
    device = "cuda" if torch.cuda.is_available() and config.device in ("auto", "cuda") else "cpu"
    init_from_env(device, timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        summary = DistributedTrainer(config, resume=resume, progress=progress, parallel=parallel).run()
    except BaseException as err:
        print(f"rank {rank} of {world}: {describe_failure(err)}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()
    return summary if rank == 0 else None
