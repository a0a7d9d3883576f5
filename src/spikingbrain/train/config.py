"""Training configuration: a YAML or TOML file, checked key by key, with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["StageConfig", "TrainConfig", "comparable_fingerprint", "load_train_config", "apply_overrides", "STAGE_KINDS", "TRAINABLE_SETS", "CHAT_LOSSES"]

#: calibrate: closed-form least-squares fit of GLA output-norm scales to the teacher (one step);
#: transfer: each converted mixer matches the teacher's attention output (MSE);
#: distill: KL to the teacher's logits plus next-token cross-entropy over the whole model.
STAGE_KINDS = ("calibrate", "transfer", "distill")
#: new: parameters the source lacked (gates, norms); mixers: every parameter of converted mixers;
#: lora: adapters (plus the new parameters); all: every parameter except the embeddings.
TRAINABLE_SETS = ("new", "mixers", "lora", "all")
#: answer: a chat example's loss covers its answer only; all: every one of its tokens, like plain text.
CHAT_LOSSES = ("answer", "all")


@dataclass
class StageConfig:
    """One training stage; successive distill stages with growing ``seq_len`` make a context schedule."""

    kind: str
    steps: int
    name: str = ""
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip: float = 1.0
    trainable: str = "new"
    kl_weight: float = 1.0
    ce_weight: float = 0.1
    temperature: float = 1.0
    spiking_k: float | None = None  # spike-aware training: from this stage on the student spikes (straight-through)
    #: Sliding-window dropout: the probability that a training step (all its micro-batches) runs the sliding-window branches of parallel
    #: layers with a window of ``short_window`` keys, so that training cannot ignore their linear branches.
    window_dropout: float = 0.0
    short_window: int = 64
    #: Learning-rate multiplier for the parameters the conversion added (gates, norms, parallel-layer weights), e.g. 10 so
    #: that a linear branch whose weights start at zero grows within a short run; 1 trains them at ``lr`` like the rest.
    new_lr_scale: float = 1.0
    #: Data of this stage (files or folders, as the run's ``data``), e.g. longer chats for a late stage; empty: the run's
    #: ``data``. Its held-out documents (same fraction and seed) are left out; the evaluation keeps the run's held-out text.
    data: list[str] = field(default_factory=list)
    #: Share of a micro-batch's loss carried by the answer tokens of chat examples (the plain-text tokens carry the rest),
    #: e.g. 0.5 so that a few answer tokens are not drowned by thousands of text tokens; None: every scored token counts once.
    answer_share: float | None = None
    #: How a calibrate stage sets the GLA gate biases (``convert.calibrate.DECAY_INITS``): ``grid`` (the bias per head
    #: that best explains the teacher's output), ``distance`` (the teacher's attention distances) or ``multiscale``
    #: (half-lives log-spaced over each head's channels, from 2 to 16,384 tokens).
    decay_init: str = "grid"


@dataclass
class TrainConfig:
    """A conversion-training run: student folder, teacher, data, stages, checkpoints."""

    student: str
    out: str
    stages: list[StageConfig]
    teacher: str = "default"
    data: list[str] = field(default_factory=lambda: ["pydoc"])
    held_out_fraction: float = 0.1
    seed: int = 0
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 50
    eval_context: int = 2048
    eval_max_tokens: int = 8192
    teacher_pretraining_tokens: float = 2e12
    device: str = "auto"
    threads: int | None = None
    #: Recompute each block's activations in the backward pass: peak memory ~1/3, steps ~1/4 slower.
    gradient_checkpointing: bool = False
    #: LoRA steps multiply the frozen base weights in int8, forward and for the input gradients (``train.int8_products``;
    #: CPU): the student trains on W8A8 numbers of its frozen layers. Off: fp32 products.
    int8_frozen_products: bool = False
    #: A folder for the teacher's targets of each training row (``train.teacher_targets``: its expected head rows and
    #: negentropy): a step whose rows an earlier epoch or run stored skips the teacher's forward and one head product.
    #: 2,308 bytes per token at hidden 576; None: none kept.
    teacher_targets: str | None = None
    #: Pass-key accuracy of the student at these prompt lengths at every evaluation (3 depths x ``eval_passkey_trials``
    #: keys each), logged beside the perplexity and drawn in ``curve.png``; empty: perplexity only.
    eval_passkey_lengths: list[int] = field(default_factory=list)
    eval_passkey_trials: int = 3
    #: Which tokens of a chat example (``{"prompt", "answer"}`` data) the losses score: ``answer`` (the answer only, the
    #: default) or ``all`` (every token of the chat template, as if the example were plain text).
    chat_loss: str = "answer"
    #: Start from a delta file's trained tensors instead of fresh adapters: a shipped model's name (e.g.
    #: ``spikingbrain-smollm2``) or a ``delta.safetensors`` path, to train a finished conversion further. The
    #: student must be a conversion with the same layer layout; ``lora_rank``, ``lora_alpha``, ``lora_targets`` the delta's.
    init_delta: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix for any bad value."""
        from ..convert.calibrate import DECAY_INITS

        if not self.stages:
            raise ValueError("config: 'stages' is empty; add at least one stage (kind: transfer or distill)")
        for i, stage in enumerate(self.stages):
            where = f"config: stages[{i}]"
            if stage.kind not in STAGE_KINDS:
                raise ValueError(f"{where}.kind={stage.kind!r}; use one of {list(STAGE_KINDS)}")
            if stage.trainable not in TRAINABLE_SETS:
                raise ValueError(f"{where}.trainable={stage.trainable!r}; use one of {list(TRAINABLE_SETS)}")
            if not 0.0 <= stage.window_dropout <= 1.0:
                raise ValueError(f"{where}.window_dropout must be a probability in [0, 1], got {stage.window_dropout}")
            if stage.short_window < 0:
                raise ValueError(f"{where}.short_window must be >= 0 keys, got {stage.short_window}")
            if stage.spiking_k is not None and not stage.spiking_k > 0:
                raise ValueError(f"{where}.spiking_k must be > 0 (threshold = mean|x| / k; the report uses 3), got {stage.spiking_k}")
            for key in ("steps", "seq_len", "batch_size", "grad_accum"):
                if getattr(stage, key) < 1:
                    raise ValueError(f"{where}.{key} must be >= 1, got {getattr(stage, key)}")
            if stage.decay_init not in DECAY_INITS:
                raise ValueError(f"{where}.decay_init={stage.decay_init!r}; use one of {list(DECAY_INITS)}")
            if stage.decay_init != "grid" and stage.kind != "calibrate":
                raise ValueError(f"{where}.decay_init={stage.decay_init!r} is read by calibrate stages only (this one is "
                                 f"{stage.kind!r}); set it on the calibrate stage")
            if stage.kind == "calibrate" and stage.steps != 1:
                raise ValueError(f"{where}: a calibrate stage is closed-form; set steps: 1 (got {stage.steps})")
            if stage.lr <= 0:
                raise ValueError(f"{where}.lr must be > 0, got {stage.lr}")
            if stage.answer_share is not None and not 0.0 < stage.answer_share < 1.0:
                raise ValueError(f"{where}.answer_share must be in (0, 1) (the answers' share of the loss), got {stage.answer_share}")
            if stage.new_lr_scale <= 0:
                raise ValueError(f"{where}.new_lr_scale must be > 0 (1 trains new parameters at lr), got {stage.new_lr_scale}")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"config: held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if any(n < 16 for n in self.eval_passkey_lengths):
            raise ValueError(f"config: eval_passkey_lengths must be prompt lengths of >= 16 tokens, got {self.eval_passkey_lengths}")
        for key in ("checkpoint_every", "eval_every", "keep_checkpoints", "lora_rank", "eval_passkey_trials"):
            if getattr(self, key) < 1:
                raise ValueError(f"config: {key} must be >= 1, got {getattr(self, key)}")
        if self.chat_loss not in CHAT_LOSSES:
            raise ValueError(f"config: chat_loss={self.chat_loss!r}; use one of {list(CHAT_LOSSES)}")
        if self.eval_context < 2:
            raise ValueError(f"config: eval_context must be >= 2, got {self.eval_context}")

    def to_dict(self) -> dict:
        """Plain data (JSON-safe)."""
        return dataclasses.asdict(self)

    def fingerprint(self, through_stage: int | None = None) -> str:
        """What a checkpoint must agree on to be resumed by this run: everything but bookkeeping fields
        and the stages after ``through_stage`` (later stages may be changed, added or dropped)."""
        data = self.to_dict()
        if through_stage is not None:
            data["stages"] = data["stages"][: through_stage + 1]
        for key in EVALUATION_KEYS:
            data.pop(key)
        return json.dumps(comparable_fingerprint(data), sort_keys=True)


#: Keys that change what a run writes or measures, not what it trains: a checkpoint resumes across them.
EVALUATION_KEYS = ("out", "checkpoint_every", "keep_checkpoints", "eval_every", "threads", "device",
                   "eval_passkey_lengths", "eval_passkey_trials", "teacher_targets")


def comparable_fingerprint(data: dict) -> dict:
    """A fingerprint without the keys at their defaults, so that a checkpoint written before a key with a
    default existed still resumes (the key's default is what that run used)."""
    defaults, stage_defaults = _field_defaults(TrainConfig), _field_defaults(StageConfig)
    data = {k: v for k, v in data.items() if defaults.get(k, object()) != v}
    data["stages"] = [{k: v for k, v in s.items() if stage_defaults.get(k, object()) != v} for s in data.get("stages", [])]
    return data


def _field_defaults(cls) -> dict:
    """Each field's default value, from ``default`` or ``default_factory``."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _coerce(value, hint, where: str):
    """``value`` as the field type ``hint`` (YAML reads ``1e-3`` as a string), or a ValueError naming ``where``."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        base = typing.get_origin(kind) or kind
        if base is list and isinstance(value, (list, tuple)):
            return list(value)
        if base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is str and isinstance(value, str):
            return value
        if base is bool and isinstance(value, bool):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ValueError(f"{where} = {value!r}: expected {names}")


def _typed(raw: dict, cls, where: str) -> dict:
    hints = typing.get_type_hints(cls)
    return {key: _coerce(value, hints[key], f"{where}: {key}") for key, value in raw.items()}


def _check_keys(raw: dict, cls, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing required keys {missing}")


def config_from_dict(raw: dict, where: str = "config") -> TrainConfig:
    """A validated ``TrainConfig`` from parsed YAML/TOML data."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: the top level must be a mapping of keys to values")
    _check_keys(raw, TrainConfig, where)
    stages = []
    for i, stage in enumerate(raw["stages"] or []):
        if not isinstance(stage, dict):
            raise ValueError(f"{where}: stages[{i}] must be a mapping")
        _check_keys(stage, StageConfig, f"{where}: stages[{i}]")
        stages.append(StageConfig(**_typed(stage, StageConfig, f"{where}: stages[{i}]")))
    if isinstance(raw.get("data"), str):
        raw = {**raw, "data": [raw["data"]]}
    config = TrainConfig(**{**_typed({k: v for k, v in raw.items() if k != "stages"}, TrainConfig, where), "stages": stages})
    config.validate()
    return config


def _parse_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err})") from None
    raise ValueError(f"{path}: unknown config format {path.suffix!r}; use .yaml, .yml or .toml")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``key=value`` (``stages.1.lr=3e-4`` for a stage) in parsed config data; values are parsed as YAML scalars."""
    import yaml

    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: write key=value, e.g. stages.0.steps=100")
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = raw
        for part in path:
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"override {item!r}: {part!r} does not exist in the config") from None
        if isinstance(node, list):
            try:
                index = int(last)
                node[index]  # noqa: B018 - raises IndexError for a missing entry
            except (ValueError, IndexError):
                raise ValueError(f"override {item!r}: {last!r} is not an index of that list") from None
            node[index] = yaml.safe_load(value)
        else:
            node[last] = yaml.safe_load(value)
    return raw


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read, override and validate a training config file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    return config_from_dict(apply_overrides(_parse_file(path), list(overrides)), where=str(path))
