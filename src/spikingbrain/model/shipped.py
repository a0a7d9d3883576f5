"""Short model names resolved to folders: the embedded teacher, and shipped converted models rebuilt from a delta once.

A shipped model is a compact delta file on top of a teacher, rebuilt into a cached folder on first use.

A delta is a safetensors file holding only what conversion training changed (new parameters,
trained tensors, LoRA factors) plus, in its metadata, the student's config and the teacher it
was trained from. Rebuilding converts the teacher with that config, folds the LoRA factors
into their base weights, copies the other tensors and saves an ordinary SpikingBrain folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import CheckpointError, copy_tokenizer_files, refuse_non_empty, written_folder
from .embedded import MARKER_FILENAME, _build_folder, cache_dir, default_model_folder
from .hf_import import import_transformer
from .names import SHIPPED_MODELS, SHORT_NAMES

__all__ = ["resolve_folder", "shipped_delta_path", "shipped_conversion_of", "shipped_conversions_of", "shipped_model_folder",
           "shipped_training_curve", "write_delta", "read_delta", "read_delta_to_copy", "build_from_delta", "export_model"]
_CONFIG_KEYS_NOT_OVERRIDDEN = ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype", "_name_or_path")


def resolve_folder(ref: str | Path) -> Path:
    """The folder behind a model reference.

    ``default`` is the embedded SmolLM2-135M-Instruct; ``spikingbrain-smollm2`` is its shipped
    conversion, rebuilt from the teacher plus the delta file in the package on first use.
    """
    if str(ref) == "default":
        return default_model_folder()
    if str(ref) in SHORT_NAMES:
        return shipped_model_folder(str(ref))
    return Path(ref).expanduser()


def shipped_delta_path(name: str) -> Path:
    """The delta file of a shipped model name."""
    if name not in SHIPPED_MODELS:
        raise CheckpointError(f"{name!r} is not a shipped model; shipped: {sorted(SHIPPED_MODELS)}")
    path = Path(str(resources.files("spikingbrain") / "shipped" / SHIPPED_MODELS[name]))
    if not path.is_file():
        raise CheckpointError(f"{path}: the delta file of {name!r} is missing from this installation; reinstall spikingbrain")
    return path


def shipped_conversions_of(teacher: str) -> list[str]:
    """The short names of the shipped models converted from ``teacher`` (as their deltas name it, e.g. ``default``)
    whose delta files this installation has, in the order of ``SHIPPED_MODELS``."""
    names = []
    for name in SHIPPED_MODELS:
        try:
            path = shipped_delta_path(name)
        except CheckpointError:
            continue
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("teacher") == str(teacher):
                names.append(name)
    return names


def shipped_conversion_of(teacher: str) -> str | None:
    """The first of :func:`shipped_conversions_of` ``teacher``, else None."""
    return next(iter(shipped_conversions_of(teacher)), None)


def shipped_training_curve(name: str) -> dict | None:
    """The training curve a shipped model's delta carries (``train.report.training_curve`` of its run), else None."""
    with safe_open(str(shipped_delta_path(name)), framework="pt") as f:
        curve = (f.metadata() or {}).get("training_curve")
    return None if curve is None else json.loads(curve)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_model_folder(name: str, progress: bool = True) -> Path:
    """The rebuilt folder of a shipped model (built on first use, cached, rebuilt when the delta changes)."""
    delta = shipped_delta_path(name)
    source = {"distribution": "spikingbrain", "file": delta.name, "size": delta.stat().st_size, "sha256": file_sha256(delta), "path": str(delta)}
    return _build_folder(cache_dir() / name, source, build_from_delta, progress, label=f"the shipped model {name}")


def write_delta(path: str | Path, tensors: dict[str, torch.Tensor], config: dict, teacher: str, extra: dict | None = None) -> Path:
    """Write a delta file: ``tensors`` (LoRA factors named ``<linear>.lora_a/.lora_b`` with ``lora_scale`` in ``extra``)."""
    metadata = {"config": json.dumps(config), "teacher": teacher, **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_delta(path: str | Path) -> tuple[dict, str, dict[str, torch.Tensor], dict]:
    """``(config, teacher, tensors, extra)`` of a delta file: what :func:`write_delta` was given."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if "config" not in meta or "teacher" not in meta:
        raise CheckpointError(f"{path}: not a spikingbrain delta file (no 'config'/'teacher' metadata)")
    extra = {k: json.loads(v) for k, v in meta.items() if k not in ("config", "teacher")}
    return json.loads(meta["config"]), meta["teacher"], tensors, extra


def read_delta_to_copy(delta: str | Path, out: str | Path) -> tuple[dict, str, dict[str, torch.Tensor], dict]:
    """:func:`read_delta` of ``delta`` for writing an edited copy to ``out``, which must not exist (a delta is never overwritten)."""
    if Path(out).exists():
        raise CheckpointError(f"{out}: exists; give a new file name (the delta is never overwritten)")
    return read_delta(delta)


def build_from_delta(delta: Path, out: Path) -> None:
    """Rebuild the model a delta describes into the folder ``out``."""
    config, teacher_ref, tensors, extra = read_delta(delta)
    config = {k: v for k, v in config.items() if k not in _CONFIG_KEYS_NOT_OVERRIDDEN}
    teacher = resolve_folder(teacher_ref)
    model, _ = import_transformer(teacher, config.pop("layer_mixers"), torch.float32, **config)
    params = dict(model.named_parameters())
    scale = float(extra.get("lora_scale", 1))
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name.endswith(".lora_b"):
                continue
            if name.endswith(".lora_a"):
                base = name[: -len(".lora_a")] + ".weight"
                params[base] += scale * (tensors[name[:-1] + "b"].float() @ tensor.float())
                continue
            if name not in params or params[name].shape != tensor.shape:
                raise CheckpointError(f"{delta}: tensor {name} {tuple(tensor.shape)} does not fit the rebuilt model; the delta and the teacher disagree")
            params[name].copy_(tensor)
    model.save_pretrained(out)
    copy_tokenizer_files(teacher, out)


def export_model(name: str, out: str | Path, overwrite: bool = False) -> Path:
    """Write a short-named model as a plain Hugging Face folder (``default`` as transformers' own Llama)."""
    if name not in SHORT_NAMES:
        raise CheckpointError(f"{name!r} is not a short model name; use one of {list(SHORT_NAMES)}")
    if not overwrite:
        refuse_non_empty(out)
    folder = resolve_folder(name)
    with written_folder(out) as staging:
        shutil.copytree(folder, staging, ignore=shutil.ignore_patterns(MARKER_FILENAME), dirs_exist_ok=True)
    return Path(out).expanduser()
