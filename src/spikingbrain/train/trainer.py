"""Conversion training: attention transfer, then distillation, with exact checkpoint/resume.

Stages run in order. A *transfer* stage trains every converted mixer to reproduce the teacher's
attention output for the teacher's own layer input (relative MSE, all layers at once from one
teacher forward). A *distill* stage trains the whole student on KL divergence to the teacher's
logits plus next-token cross-entropy. Checkpoints hold the trained tensors, optimizer, scheduler,
data position and RNG, so a killed run resumes onto the same loss curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..convert.calibrate import calibrate_gla
from ..eval.passkey import run_passkey
from ..eval.perplexity import perplexity
from ..model.hf_import import is_source_parameter
from ..model.mixers import ParallelHybridAttention
from ..model.checkpoint import copy_tokenizer_files, written_folder
from ..model.loading import load_model, load_tokenizer, resolve_folder
from ..model.names import SHIPPED_MODELS
from ..model.shipped import read_delta, shipped_delta_path, write_delta
from ..runtime.machine import flushing_denormals
from ..spiking.apply import spikify
from .config import StageConfig, TrainConfig, comparable_fingerprint
from .data import (
    PackedBatches,
    encode_documents,
    joined_token_ids,
    load_documents,
    pack,
    packed_rows_with_targets,
    split_held_out,
)
from .int8_products import int8_frozen_products
from .report import continued_curve, plot_training_curve, training_curve
from .lora import LoRALinear, add_lora, lora_parameters, merge_lora
from .losses import chunked_distill_loss, full_distill_loss
from .teacher_targets import TeacherTargets

__all__ = ["Trainer", "TrainingError", "distill_loss"]


#: Where the key sits in the training run's pass-key prompts: near the start, the middle, near the end.
PASSKEY_DEPTHS = [0.1, 0.5, 0.9]


class TrainingError(ValueError):
    """A training run cannot start or resume (bad checkpoint, mismatched config, ...)."""


def _lr_factor(step: int, stage: StageConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` by the stage's last step."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def distill_loss(student, teacher, ids: torch.Tensor, kl_weight: float, ce_weight: float, temperature: float = 1.0,
                 sliced: bool | None = None, loss_mask: torch.Tensor | None = None, teacher_targets=None):
    """``kl_weight * T² KL(teacher || student) + ce_weight * CE(next token)`` per scored token, and its parts
    (``loss_mask``: which tokens are targets, a boolean mask or float weights, see ``train.losses.position_weights``; None: all).

    With frozen output heads (conversion training never trains them) the loss is computed from
    the final hidden states a slice of positions at a time (``train.losses``), which never holds
    the whole ``[tokens, vocab]`` logits; otherwise, or with ``sliced=False``, from the full logits.
    ``teacher_targets`` (a ``train.teacher_targets.TeacherTargets``) gives the teacher's targets reduced for the
    student's head from its folder where they are stored; the sliced loss only.
    """
    heads_frozen = not (student.lm_head.weight.requires_grad or teacher.lm_head.weight.requires_grad)
    if sliced and not heads_frozen:
        raise ValueError("the sliced distillation loss needs frozen output heads; freeze lm_head or pass sliced=None")
    if not (heads_frozen if sliced is None else sliced):
        if teacher_targets is not None:
            raise ValueError("stored teacher targets serve the sliced loss only; freeze the output heads or drop teacher_targets")
        with torch.no_grad():
            target = teacher(ids, use_cache=False).logits
        return full_distill_loss(student(ids, use_cache=False).logits, target, ids, kl_weight, ce_weight, temperature,
                                 loss_mask)
    if teacher_targets is not None:
        target, target_head = teacher_targets(ids, student.lm_head.weight, temperature), None
    else:
        with torch.no_grad():
            target, target_head = teacher.model(input_ids=ids, use_cache=False).last_hidden_state, teacher.lm_head.weight
    hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
    return chunked_distill_loss(
        hidden, student.lm_head.weight, target, target_head, ids, kl_weight, ce_weight, temperature, loss_mask=loss_mask,
    )


def target_weights(targets: torch.Tensor, answer_share: float | None) -> torch.Tensor:
    """The loss weights of a micro-batch's target codes (``Trainer._packed``: 0 not scored, 1 plain text, 2 an answer):
    the scored tokens alike (a boolean mask), or with ``answer_share`` the answers' tokens carrying that share of the
    loss and the plain text the rest (alike within each group; all alike when either group is absent)."""
    scored = targets > 0
    answers, plain = targets == 2, targets == 1
    if answer_share is None or not answers.any() or not plain.any():
        return scored
    return answers * (answer_share / answers.sum()) + plain * ((1.0 - answer_share) / plain.sum())


def _delta_name(name: str) -> str:
    """A student parameter's name in a delta file: a LoRA-wrapped linear's weight named as in the plain model."""
    return name.replace(".base.", ".")


class Trainer:
    """Runs a ``TrainConfig``; ``run()`` returns a summary dict and writes everything under ``config.out``."""

    #: False on the ranks of a distributed run other than 0: they train but write no files.
    writes_files = True

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True):
        config.validate()
        self.config, self.progress = config, progress
        self.out = Path(config.out).expanduser()
        self.checkpoints = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self._last_evaluation: tuple[int, dict] | None = None  # (step, record) of the latest evaluation
        latest = self._latest_checkpoint()
        if latest is not None and not resume:
            raise TrainingError(f"{self.out} already holds checkpoints ({latest.name}); pass --resume to continue or choose a new --out")
        self._resume_from = latest if resume else None
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = _pick_device(config.device)
        torch.manual_seed(config.seed)  # adapters are initialised below: same seed, same run
        self.tokenizer = load_tokenizer(config.student)
        self.student = load_model(config.student).to(self.device)
        self.teacher = load_model(config.teacher).to(self.device)
        self.teacher.requires_grad_(False)
        self.teacher_targets = None
        if config.teacher_targets:
            mode = self.device.type + ("-bf16" if self.device.type == "cuda" else "")  # the steps' autocast
            self.teacher_targets = TeacherTargets(config.teacher_targets, self.teacher, mode)
        if config.gradient_checkpointing:
            self.student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self._check_pair()
        self.lora_names = []
        if any(s.trainable == "lora" for s in config.stages):
            self.lora_names = add_lora(self.student, config.lora_rank, config.lora_alpha, config.lora_targets)
            int8_frozen_products(self.student, config.int8_frozen_products)
        elif config.int8_frozen_products:
            raise TrainingError("int8_frozen_products multiplies the frozen base weights of LoRA layers; no stage trains LoRA "
                                "(trainable: lora), so set int8_frozen_products: false")
        self.ever_trained: set[str] = set()
        self.started_from: dict | None = None  # init_delta as given, its steps, tokens and curve
        if config.init_delta:
            self._start_from_delta(config.init_delta)
        self.global_step, self.tokens_seen, self.stage_index, self.stage_step = 0, 0, 0, 0
        self.data_state: dict | None = None
        self._prepare_data()

    # ----- set-up -------------------------------------------------------------------------

    def _check_pair(self) -> None:
        s, t = self.student.config, self.teacher.config
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if getattr(s, key) != getattr(t, key):
                raise TrainingError(
                    f"student {self.config.student} and teacher {self.config.teacher} differ in {key} "
                    f"({getattr(s, key)} vs {getattr(t, key)}); the student must be a conversion of the teacher"
                )

    def _start_from_delta(self, ref: str) -> None:
        """Load a delta's tensors (``config.init_delta``) into the student: LoRA factors into its adapters, the rest into
        the parameters they name. They count as trained, so the exported delta carries them on."""
        path = shipped_delta_path(ref) if ref in SHIPPED_MODELS else Path(ref).expanduser()
        if not path.is_file():
            raise TrainingError(f"config: init_delta={ref!r} is neither a shipped model ({sorted(SHIPPED_MODELS)}) nor a delta file")
        config, _, tensors, extra = read_delta(path)
        if config.get("layer_mixers") != list(self.student.config.layer_mixers):
            raise TrainingError(
                f"{path}: its layers {config.get('layer_mixers')} differ from student {self.config.student}'s "
                f"{list(self.student.config.layer_mixers)}; convert the student with the delta's layout"
            )
        scales = self._lora_scales()
        if any(n.endswith(".lora_a") for n in tensors) and scales != {float(extra.get("lora_scale", 1.0))}:
            raise TrainingError(f"{path}: LoRA scale {extra.get('lora_scale')} differs from this run's {sorted(scales)}; "
                                "set lora_rank and lora_alpha to the delta's (or add LoRA stages)")
        params = {_delta_name(name): (name, p) for name, p in self.student.named_parameters()}
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name not in params or params[name][1].shape != tensor.shape:
                    shape = tuple(params[name][1].shape) if name in params else "absent"
                    raise TrainingError(f"{path}: tensor {name} {tuple(tensor.shape)} does not fit the student ({shape}); "
                                        "check lora_rank and lora_targets against the delta's")
                params[name][1].copy_(tensor)
                self.ever_trained.add(params[name][0])
        self.started_from = {"delta": ref, "steps": int(extra.get("steps", 0)),
                             "tokens_seen": int(extra.get("tokens_seen", 0)), "curve": extra.get("training_curve")}

    def _lora_scales(self) -> set[float]:
        """The scales of the student's LoRA adapters (one value when it has any, as ``add_lora`` gives them)."""
        return {m.scale for m in self.student.modules() if isinstance(m, LoRALinear)}

    def _prepare_data(self) -> None:
        self.separator = self.tokenizer.eos_token_id
        self.train_tokens, self.train_masks, held_docs = self._encoded(self.config.data)
        self._stage_data: dict[tuple[str, ...], tuple] = {}
        self.held_out_ids = joined_token_ids(held_docs, self.tokenizer, self.config.eval_max_tokens, self.separator)
        if self.writes_files:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "held_out.txt").write_text("\n\n".join(d.text for d in held_docs))

    def _encoded(self, sources: list[str]) -> tuple[list[list[int]], list | None, list]:
        """``(token lists, answer-only masks or None, held-out documents)`` of the training split of ``sources``;
        masks where the data has chat examples and ``chat_loss`` is ``answer`` (a None entry: every token is scored,
        as for plain text)."""
        train_docs, held_docs = split_held_out(load_documents(sources), self.config.held_out_fraction, self.config.seed)
        encoded = encode_documents(train_docs, self.tokenizer, self.separator)
        masks = [mask if self.config.chat_loss == "answer" else None for _, mask in encoded]
        return [ids for ids, _ in encoded], (masks if any(m is not None for m in masks) else None), held_docs

    def _packed(self, stage: StageConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[N, seq_len]`` rows of the stage's data (``stage.data`` or the run's) and their target codes (None: all
        targets; see ``packed_rows_with_targets``)."""
        if stage.data:
            key = tuple(stage.data)
            if key not in self._stage_data:
                self._stage_data[key] = self._encoded(stage.data)[:2]
            tokens, masks = self._stage_data[key]
        else:
            tokens, masks = self.train_tokens, self.train_masks
        if masks is None:
            return pack(tokens, stage.seq_len, self.separator), None
        return packed_rows_with_targets(tokens, masks, stage.seq_len, self.separator)

    def _trainable(self, stage: StageConfig) -> dict[str, torch.nn.Parameter]:
        """The parameters a stage trains (by name)."""
        params = dict(self.student.named_parameters())
        converted = {i for i, m in enumerate(self.student.config.layer_mixers) if m != "full"}
        lora = set(lora_parameters(self.student))
        new = self._new_parameter_names()
        if stage.trainable == "new":
            names = new
        elif stage.trainable == "lora":
            names = new | lora
        elif stage.trainable == "mixers":
            names = {n for n in params if any(n.startswith(f"model.layers.{i}.attn.") for i in converted)}
            names -= lora
        else:
            names = {n for n in params if "embeddings" not in n and "lm_head" not in n} - lora
        if stage.kind == "transfer":  # only mixers have a transfer loss
            names = {n for n in names if ".attn." in n and int(n.split(".")[2]) in converted}
        if not names:
            raise TrainingError(f"stage {stage.name or stage.kind}: trainable={stage.trainable!r} selects no parameters in this model")
        # source-model parameters first, then the new ones: the order of the optimizer's two groups (see _optimizer)
        return {n: params[n] for n in sorted(names, key=lambda n: (n in new, n))}

    def _new_parameter_names(self) -> set[str]:
        """The parameters the conversion added (the source model has no such tensor), adapters excluded."""
        lora = set(lora_parameters(self.student))
        return {n for n, _ in self.student.named_parameters() if not is_source_parameter(_delta_name(n)) and n not in lora}

    def _optimizer(self, trainable: dict[str, torch.nn.Parameter], new: set[str], stage: StageConfig) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters, in their order; the conversion's ``new`` ones (last in
        ``_trainable``'s order) in a second group at ``lr * new_lr_scale``."""
        groups = [
            {"params": [p for n, p in trainable.items() if n not in new], "lr": stage.lr},
            {"params": [p for n, p in trainable.items() if n in new], "lr": stage.lr * stage.new_lr_scale},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=stage.weight_decay)

    # ----- losses -------------------------------------------------------------------------

    def _transfer_loss(self, ids: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, dict]:
        """Mean over converted layers of ``|student_mixer(x) - teacher_attn(x)|² / |teacher_attn(x)|²``."""
        captured = {}

        def hook(index):
            def save(module, args, output):
                captured[index] = (args[0], args[1], output)

            return save

        handles = [self.teacher.model.layers[i].attn.register_forward_hook(hook(i)) for i in layers]
        try:
            with torch.no_grad():
                self.teacher.model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        losses = []
        for i in layers:
            x, inputs, target = captured[i]
            got = self.student.model.layers[i].attn(x, inputs, None)
            losses.append((got.float() - target.float()).pow(2).mean() / self._target_energy(target))
        loss = torch.stack(losses).mean()
        return loss, {"mse": loss.item()}

    def _target_energy(self, target: torch.Tensor) -> torch.Tensor:
        """Mean square of a teacher attention output: the denominator of the relative transfer error."""
        return target.float().pow(2).mean().clamp_min(1e-12)

    def _distill_loss(self, ids: torch.Tensor, stage: StageConfig, targets: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        return distill_loss(self.student, self.teacher, ids, stage.kl_weight, stage.ce_weight, stage.temperature,
                            loss_mask=None if targets is None else target_weights(targets, stage.answer_share),
                            teacher_targets=self.teacher_targets)

    def _step_loss(self, ids: torch.Tensor, stage: StageConfig, layers: list[int],
                   targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch of a transfer or distill stage, and its parts for the log (``targets``: the
        rows' target codes, see ``_packed``; a transfer stage matches every position's attention output, so it ignores them)."""
        if stage.kind == "transfer":
            return self._transfer_loss(ids, layers)
        return self._distill_loss(ids, stage, targets)

    @contextlib.contextmanager
    def _window_dropout(self, stage: StageConfig):
        """With probability ``stage.window_dropout`` (drawn from the step number, so a resumed run draws
        the same), the sliding-window branches of parallel layers see only ``stage.short_window`` keys."""
        if not stage.window_dropout:  # the usual case: no draw, no walk over the modules
            yield
            return
        draw = torch.rand((), generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.global_step))
        branches = [m.softmax for m in self.student.modules() if isinstance(m, ParallelHybridAttention) and m.softmax.window is not None]
        if not branches or float(draw) >= stage.window_dropout:
            yield
            return
        saved = [b.window for b in branches]
        for b in branches:
            b.window = min(stage.short_window, b.window)
        try:
            yield
        finally:
            for b, window in zip(branches, saved):
                b.window = window

    def _local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """The rows of a global batch this process trains on (all of them in a single-process run)."""
        return batch

    def _prepare_trainable(self, trainable: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
        """The parameters the stage's optimizer updates (a sharded run replaces them by their shards)."""
        return trainable

    def _clip_gradients(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the gradients' total norm to ``max_norm``; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ----- checkpoints --------------------------------------------------------------------

    def _latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        done = sorted((p for p in self.checkpoints.glob("step-*") if (p / "trainer_state.json").is_file()), key=lambda p: int(p.name[5:]))
        return done[-1] if done else None

    def _save_checkpoint(self, optimizer, scheduler, batches: PackedBatches) -> Path:
        final = self.checkpoints / f"step-{self.global_step}"
        with written_folder(final) as staging:
            params = self._full_parameters()
            save_file({n: params[n].detach().cpu().contiguous() for n in sorted(self.ever_trained)}, str(staging / "trained.safetensors"))
            opt = self._full_optimizer_state(optimizer)
            tensors, state_meta = {}, {}
            for index, entry in opt["state"].items():
                for key, value in entry.items():
                    if torch.is_tensor(value):
                        tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                    else:
                        state_meta[f"{index}.{key}"] = value
            tensors["rng.torch"] = torch.get_rng_state()
            save_file(tensors, str(staging / "optimizer.safetensors"))
            state = {
                "fingerprint": self.config.fingerprint(),
                "global_step": self.global_step,
                "stage_index": self.stage_index,
                "stage_step": self.stage_step,
                "tokens_seen": self.tokens_seen,
                "ever_trained": sorted(self.ever_trained),
                "optimizer_param_groups": opt["param_groups"],
                "optimizer_state_scalars": state_meta,
                "scheduler": scheduler.state_dict(),
                "data": batches.state_dict(),
            }
            (staging / "trainer_state.json").write_text(json.dumps(state))
        kept = sorted((p for p in self.checkpoints.glob("step-*")), key=lambda p: int(p.name[5:]))
        for old in kept[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)
        return final

    def _full_parameters(self) -> dict[str, torch.Tensor]:
        """The student's whole (unsharded) parameters by name, for a checkpoint."""
        return dict(self.student.named_parameters())

    def _full_optimizer_state(self, optimizer) -> dict:
        """The optimizer's state dict in the single-process format (state keyed by parameter index)."""
        return optimizer.state_dict()

    def _load_optimizer_state(self, optimizer, state_dict: dict) -> None:
        """Load a state dict in the format of :meth:`_full_optimizer_state`."""
        optimizer.load_state_dict(state_dict)

    def _load_checkpoint(self, path: Path) -> dict:
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise TrainingError(f"{path}: unreadable checkpoint ({err}); delete it to resume from an earlier one") from None
        # stages after the checkpoint's own may differ: a run can be extended or cut short
        through = state.get("stage_index", 0)
        theirs = json.loads(state.get("fingerprint") or "{}")
        theirs = comparable_fingerprint({**theirs, "stages": theirs.get("stages", [])[: through + 1]})
        ours = json.loads(self.config.fingerprint(through))
        if theirs != ours:
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise TrainingError(
                f"{path}: checkpoint belongs to another run (config differs in {differ}); "
                "resume with the same config, or choose a new --out"
            )
        trained = load_file(str(path / "trained.safetensors"))
        params = dict(self.student.named_parameters())
        with torch.no_grad():
            for name, tensor in trained.items():
                params[name].copy_(tensor)
        self.ever_trained = set(state["ever_trained"])
        self.global_step, self.tokens_seen = state["global_step"], state["tokens_seen"]
        self.stage_index, self.stage_step = state["stage_index"], state["stage_step"]
        return state

    def _restore_optimizer(self, path: Path, state: dict, optimizer, scheduler, batches: PackedBatches) -> None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("rng.torch"))
        entries: dict[int, dict] = {}
        for key, value in list(tensors.items()) + list(state["optimizer_state_scalars"].items()):
            index, name = key.split(".", 1)
            entries.setdefault(int(index), {})[name] = value
        self._load_optimizer_state(optimizer, {"state": entries, "param_groups": state["optimizer_param_groups"]})
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])

    # ----- the loop -----------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop metric lines written after the checkpoint a resumed run starts from."""
        if not self.metrics_path.is_file():
            return
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if json.loads(line).get("step", 0) <= self.global_step]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def evaluate(self) -> dict:
        """Held-out perplexity of the student (and its ratio to the teacher's), and its pass-key accuracy by
        length when ``eval_passkey_lengths`` asks for it."""
        result = perplexity(self.student, self.held_out_ids, self.config.eval_context)
        record = {"ppl": result["ppl"], "ppl_ratio": result["ppl"] / self.teacher_ppl, "eval_tokens": result["tokens"]}
        if self.config.eval_passkey_lengths:
            record["passkey"] = self._passkey_accuracy(self.student)
        self.student.train()
        self._last_evaluation = self.global_step, record
        return record

    def _passkey_accuracy(self, model) -> dict[str, float]:
        """Pass-key accuracy by prompt length (``eval.passkey``: 3 depths x ``eval_passkey_trials`` keys, fixed seed)."""
        model.eval()
        result = run_passkey({"model": model}, self.tokenizer, self.config.eval_passkey_lengths, PASSKEY_DEPTHS,
                             trials=self.config.eval_passkey_trials, seed=self.config.seed, show_progress=False)
        return result["models"]["model"]["accuracy_by_length"]

    def run(self) -> dict:
        """Train every stage to the end (resuming if asked); returns a summary. Subnormal floats are flushed
        to zero meanwhile (``runtime.machine.flushing_denormals``)."""
        with flushing_denormals():
            return self._run()

    def _run(self) -> dict:
        config = self.config
        state = self._load_checkpoint(self._resume_from) if self._resume_from else None
        self.teacher_ppl = perplexity(self.teacher, self.held_out_ids, config.eval_context)["ppl"]
        if state is None:
            if self.writes_files:
                self.metrics_path.unlink(missing_ok=True)
                (self.out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=1))
            teacher = {"teacher_ppl": self.teacher_ppl}
            if config.eval_passkey_lengths:
                teacher["teacher_passkey"] = self._passkey_accuracy(self.teacher)
            self._log({"step": 0, "stage": "converted", "tokens_seen": 0, **teacher, **self.evaluate()})
        else:
            self._truncate_metrics()
        total_steps = sum(s.steps for s in config.stages)
        bar = tqdm(total=total_steps, initial=self.global_step, disable=not self.progress, unit="step", desc="train")
        start_index = self.stage_index
        if state is not None and self.stage_step >= config.stages[start_index].steps:
            start_index, state = start_index + 1, None  # the checkpoint ended its stage: nothing of it to restore
        for index in range(start_index, len(config.stages)):
            stage = config.stages[index]
            if index != start_index or state is None:
                self.stage_index, self.stage_step = index, 0
            self._run_stage(stage, state if index == start_index else None, bar)
            state = None
        bar.close()
        last = self._last_evaluation  # the last step of a stage is evaluated: reuse it
        final = last[1] if last is not None and last[0] == self.global_step else self.evaluate()
        summary = {"steps": self.global_step, "tokens_seen": self.tokens_seen, "teacher_ppl": self.teacher_ppl, **final}
        self.export_delta(self.out / "delta.safetensors")
        self._save_final_model(self.out / "final")
        if self.writes_files:
            summary["delta_bytes"] = (self.out / "delta.safetensors").stat().st_size
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            plot_training_curve(self.out)
        return summary

    def export_delta(self, path: Path, lora_dtype: torch.dtype = torch.bfloat16) -> Path:
        """Write what training changed (see ``model.shipped``): trained tensors, LoRA factors in ``lora_dtype``."""
        params = dict(self.student.named_parameters())
        lora = lora_parameters(self.student)
        tensors = {
            _delta_name(name): params[name].detach().to(lora_dtype if name in lora else params[name].dtype)
            for name in sorted(self.ever_trained)
        }
        scales = self._lora_scales()
        extra = {"lora_scale": scales.pop() if scales else 1.0, "tokens_seen": self.tokens_seen, "steps": self.global_step}
        curve = None
        if self.metrics_path.is_file():  # the delta carries its training curve (``model.shipped.shipped_training_curve``)
            curve = training_curve(self.out)
            curve["points"] = [point for point in curve["points"] if point["step"] <= self.global_step]
        if self.started_from:  # a continuation counts steps and tokens from the delta's first run, and continues its curve
            start = self.started_from
            extra["continued_from"] = {key: start[key] for key in ("delta", "steps", "tokens_seen")}
            extra["steps"], extra["tokens_seen"] = start["steps"] + self.global_step, start["tokens_seen"] + self.tokens_seen
            if curve:
                curve = continued_curve(start["curve"], curve, start["steps"], start["tokens_seen"],
                                        self.config.teacher_pretraining_tokens)
        if curve:
            extra["training_curve"] = curve
        return write_delta(path, tensors, self.student.config.to_dict(), self.config.teacher, extra)

    def export_latest_checkpoint(self) -> Path:
        """Write the student of the latest checkpoint, without training further, as ``<out>/at-step-N/``: its
        ``delta.safetensors`` (with the curve so far) and ``model/`` (an ordinary folder); returns that folder."""
        latest = self._latest_checkpoint()
        if latest is None:
            raise TrainingError(f"{self.checkpoints}: no checkpoint to export; train first (checkpoint_every sets how often one is written)")
        self._load_checkpoint(latest)
        folder = self.out / f"at-step-{self.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        self.export_delta(folder / "delta.safetensors")
        self._save_final_model(folder / "model")
        return folder

    def _save_final_model(self, folder: Path) -> None:
        """The trained student as an ordinary SpikingBrain folder (adapters merged), with the tokenizer files."""
        import copy

        model = copy.deepcopy(self.student).cpu()
        merge_lora(model)
        with written_folder(folder) as staging:
            model.save_pretrained(staging)
            copy_tokenizer_files(resolve_folder(self.config.student), staging)

    def _calibrate(self, stage: StageConfig, bar) -> None:
        """One closed-form step: fit GLA output-norm scales on one training batch (see ``calibrate_gla``)."""
        rows, _ = self._packed(stage)
        ids = next(iter(PackedBatches(rows, stage.batch_size, seed=self.config.seed + 1000 * self.stage_index)))
        errors = calibrate_gla(self.student, self.teacher, ids.to(self.device), decay_init=stage.decay_init)
        self.ever_trained |= {f"model.layers.{i}.attn.g_norm.weight" for i in errors}
        self.ever_trained |= self._gate_bias_names(errors)  # set by the calibration too (a delta must carry them)
        self.tokens_seen += ids.numel()
        self.stage_step, self.global_step = 1, self.global_step + 1
        record = {"step": self.global_step, "stage": stage.name or stage.kind, "stage_step": 1, "tokens_seen": self.tokens_seen}
        record["mse"] = sum(errors.values()) / max(1, len(errors))
        record.update(self.evaluate())
        self._log(record)
        bar.update(1)

    def _gate_bias_names(self, layers) -> set[str]:
        """Parameter names of the gate biases of GLA ``layers`` (none for key-tied gates, which have no parameters)."""
        biases = {id(self.student.model.layers[i].attn.gate_bias) for i in layers
                  if not self.student.model.layers[i].attn.key_tied}
        return {name for name, p in self.student.named_parameters() if id(p) in biases}

    def _run_stage(self, stage: StageConfig, state: dict | None, bar) -> None:
        config = self.config
        if stage.kind == "calibrate":
            if self.stage_step == 0:
                self._calibrate(stage, bar)
            return
        spiking_k = next((s.spiking_k for s in reversed(config.stages[: self.stage_index + 1]) if s.spiking_k), None)
        if spiking_k is not None:  # this stage or an earlier one trains spiking (also after a resume)
            spikify(self.student, k=spiking_k)
        trainable = self._trainable(stage)
        for p in self.student.parameters():
            p.requires_grad_(False)
        for p in trainable.values():
            p.requires_grad_(True)
        self.ever_trained |= set(trainable)
        new = self._new_parameter_names()  # by the plain names, before a sharded run wraps the modules
        trainable = self._prepare_trainable(trainable)
        optimizer = self._optimizer(trainable, new, stage)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, stage))
        rows, masks = self._packed(stage)
        batches = PackedBatches(rows, stage.batch_size, seed=config.seed + 1000 * self.stage_index, loss_mask=masks)
        if state is not None:
            self._restore_optimizer(self._resume_from, state, optimizer, scheduler, batches)
        layers = sorted({int(n.split(".")[2]) for n in trainable if n.startswith("model.layers.")})
        iterator = iter(batches)
        self.student.train()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        name = stage.name or stage.kind
        while self.stage_step < stage.steps:
            t0 = time.perf_counter()
            totals: dict[str, float] = {}
            for _ in range(stage.grad_accum):
                batch, mask = iterator.next_with_mask()
                ids = self._local_rows(batch).to(self.device)
                if mask is not None:
                    mask = self._local_rows(mask).to(self.device)
                with autocast, self._window_dropout(stage):
                    loss, parts = self._step_loss(ids, stage, layers, mask)
                (loss / stage.grad_accum).backward()
                for key, value in {"loss": loss.item(), **parts}.items():
                    totals[key] = totals.get(key, 0.0) + value / stage.grad_accum
                self.tokens_seen += batch.numel()
            grad_norm = self._clip_gradients(list(trainable.values()), stage.clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            self.stage_step += 1
            self.global_step += 1
            seconds = time.perf_counter() - t0
            record = {
                "step": self.global_step, "stage": name, "stage_step": self.stage_step, **totals,
                "lr": lr, "grad_norm": float(grad_norm), "seq_len": stage.seq_len,
                "tokens_seen": self.tokens_seen,
                "fraction_of_teacher_pretraining": self.tokens_seen / config.teacher_pretraining_tokens,
                "tokens_per_second": stage.batch_size * stage.grad_accum * stage.seq_len / seconds,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
            }
            if self.teacher_targets is not None:  # rows so far whose teacher targets were read, and computed
                record["teacher_targets_read"], record["teacher_targets_computed"] = self.teacher_targets.hits, self.teacher_targets.misses
            last = self.stage_step == stage.steps
            if self.global_step % config.eval_every == 0 or last:
                record.update(self.evaluate())
            self._log(record)
            bar.set_postfix(stage=name, loss=f"{totals['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
            bar.update(1)
            if self.global_step % config.checkpoint_every == 0 or last:
                self._save_checkpoint(optimizer, scheduler, batches)

