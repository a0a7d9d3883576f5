"""Reading checkpoint folders safely: config.json and safetensors shards, with errors that say what to do."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

__all__ = ["TOKENIZER_FILES", "copy_tokenizer_files", "refuse_non_empty", "written_folder", "CheckpointError", "read_config", "read_shapes", "safetensors_files", "read_state_dict", "check_state_dict"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


#: Files besides the weights that make a model folder usable (tokenizer, chat template, generation settings).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_tokenizer_files(source: Path, dest: Path) -> list[str]:
    """Copy the ``TOKENIZER_FILES`` that ``source`` has into ``dest``; returns their names."""
    copied = [name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]
    for name in copied:
        shutil.copy2(Path(source) / name, Path(dest) / name)
    return copied


def refuse_non_empty(target: str | Path) -> None:
    """Raise ``FileExistsError`` (naming ``--force``) when ``target`` is a non-empty folder."""
    target = Path(target).expanduser()
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty; choose another folder or pass --force to replace it")


@contextlib.contextmanager
def written_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` to fill; on success it replaces ``target``.

    A failure removes it, so readers see the old folder or the whole new one.
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used, with the reason and the fix."""


def read_config(folder: str | Path) -> dict:
    """The parsed ``config.json`` of a model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass a model folder (with config.json) or 'default'")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json; a model folder needs config.json next to its *.safetensors weights"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); restore the file from the original checkpoint") from err
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{path}: field 'model_type' is missing; add the model type (e.g. \"spikingbrain\")")
    return config


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of a folder (from ``model.safetensors.index.json`` when present); never pickles."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: unreadable index ({err}); it needs a 'weight_map' object") from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that are not in the folder: {missing}; copy them there")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); they are never loaded here because unpickling "
            "can run code. Convert them to safetensors (e.g. save_pretrained(..., safe_serialization=True)) first"
        )
    raise CheckpointError(f"{folder}: no *.safetensors weights found")


def read_shapes(folder: str | Path) -> dict[str, torch.Size]:
    """Tensor shapes from the safetensors headers of a folder (reads no tensor data)."""
    shapes = {}
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = torch.Size(f.get_slice(name).get_shape())
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file ({err}); re-copy or re-save the checkpoint"
            ) from err
    return shapes


def read_state_dict(folder: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files, optionally cast to ``dtype``."""
    state = {}
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file ({err}); re-copy or re-save the checkpoint"
            ) from err
    return state


def check_state_dict(
    source: str, found: dict[str, torch.Size], expected: dict[str, torch.Size], allowed_missing: set[str] = frozenset()
) -> None:
    """Raise naming every missing, unexpected or mis-shaped tensor of ``found`` shapes against ``expected`` ones."""
    missing = sorted(set(expected) - set(found) - set(allowed_missing))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{name}: file {tuple(found[name])} vs model {tuple(expected[name])}"
        for name in set(found) & set(expected)
        if found[name] != expected[name]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_short(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors {_short(misshaped)}")
    if problems:
        raise CheckpointError(
            f"{source}: weights do not match config.json: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights (layer count, sizes, layer mixers)"
        )


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} in all)"
