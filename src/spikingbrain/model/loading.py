"""Load a ``--model`` reference (``default``, a short name, a SpikingBrain folder, an official folder, a Llama-family folder)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..ops.memory import keep_freed_memory
from .checkpoint import CheckpointError, read_config
from .config import SpikingBrainConfig
from .hf_import import TRANSFORMER_FAMILIES, load_transformer
from .modeling import SpikingBrainForCausalLM
from .official import GLAswaConfig
from .shipped import resolve_folder
from .w8aspike_release import is_w8aspike_release, load_w8aspike_release

__all__ = ["resolve_folder", "read_source_config", "load_model", "load_tokenizer", "NATIVE_TYPES"]

#: model_type values loaded directly into our classes.
NATIVE_TYPES = (SpikingBrainConfig.model_type, GLAswaConfig.model_type)


def read_source_config(folder: Path) -> tuple[dict, bool]:
    """A folder's parsed config.json and whether it is native (loaded as is) or a Llama-family import."""
    raw = read_config(folder)
    if raw["model_type"] in NATIVE_TYPES + TRANSFORMER_FAMILIES:
        return raw, raw["model_type"] in NATIVE_TYPES
    raise CheckpointError(
        f"{folder / 'config.json'}: model_type {raw['model_type']!r} is not supported; "
        f"use a folder of type {list(NATIVE_TYPES + TRANSFORMER_FAMILIES)} or 'default'"
    )


def load_model(ref: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SpikingBrainForCausalLM:
    """A SpikingBrain model (eval mode) for any supported reference; Llama-family folders load as all-``full`` layers,
    released W8ASpike folders as INT8 spiking models (:mod:`.w8aspike_release`). On CPU, the process keeps freed memory
    for reuse from here on (:func:`~spikingbrain.ops.memory.keep_freed_memory`)."""
    if torch.device(device).type == "cpu":
        keep_freed_memory()
    folder = resolve_folder(ref)
    raw, native = read_source_config(folder)
    if raw["model_type"] == GLAswaConfig.model_type and is_w8aspike_release(folder):
        model = load_w8aspike_release(folder, dtype=dtype)
    elif native:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        model = load_transformer(folder, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(ref: str | Path):
    """The tokenizer stored in a model folder, with a clear error when the folder has none."""
    folder = resolve_folder(ref)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(
            f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
            "copy the tokenizer of the source model into this folder"
        )
    return AutoTokenizer.from_pretrained(folder)
