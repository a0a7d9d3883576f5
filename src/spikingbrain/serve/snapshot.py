"""State snapshots: the cache after a prefix, copied out, restored, and stored as safetensors files.

A file holds every tensor of the cache (GLA states, windows of keys/values, full KV caches,
sink keys/values) and metadata naming the model fingerprint, the token count, the hash of
the prefix tokens and whether the size is independent of the prefix length. Files are
written atomically (temporary file, fsync, rename), so a reader sees a whole file or none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..model.cache import FullKV, GLAState, ParallelState, SpikingBrainCache, WindowKV
from ..model.checkpoint import CheckpointError

__all__ = ["FORMAT", "Snapshot", "take_snapshot", "save_snapshot", "load_snapshot", "atomic_write"]

#: Value of the ``format`` metadata field of snapshot files.
FORMAT = "spikingbrain-state/1"


@dataclass
class Snapshot:
    """Copied cache tensors after ``token_count`` tokens whose hash is ``prefix_sha256`` (``extra``: more metadata)."""

    tensors: dict[str, torch.Tensor]
    token_count: int
    prefix_sha256: str
    fingerprint: str
    layer_mixers: list[str]
    window: int
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the snapshot's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def constant_size(self) -> bool:
        """True when no layer keeps every key/value, so the size does not grow with the prefix."""
        return not any(m.endswith("full") for m in self.layer_mixers)

    def metadata(self, model_name: str) -> dict[str, str]:
        """The string metadata stored in a snapshot file."""
        full = sum(m.endswith("full") for m in self.layer_mixers)
        note = (
            "size is constant in the prefix length (GLA states and sliding windows only)"
            if self.constant_size
            else f"size grows with the prefix length ({full} full-attention layers keep every key/value)"
        )
        return {
            "format": FORMAT,
            "model": model_name,
            "model_fingerprint": self.fingerprint,
            "token_count": str(self.token_count),
            "prefix_sha256": self.prefix_sha256,
            "layer_mixers": ",".join(self.layer_mixers),
            "window": str(self.window),
            "constant_size": str(self.constant_size).lower(),
            "size_note": note,
            "nbytes": str(self.nbytes),
            **self.extra,
        }

    def restore(self, model) -> SpikingBrainCache:
        """A new cache for ``model`` holding copies of this snapshot's tensors."""
        if list(model.config.layer_mixers) != self.layer_mixers or model.config.attention_window != self.window:
            raise CheckpointError(
                f"snapshot of layers {self.layer_mixers} (window {self.window}) does not fit a model with layers "
                f"{list(model.config.layer_mixers)} (window {model.config.attention_window}); use the model it was made with"
            )
        cache = model.new_cache()
        for i, layer in enumerate(cache.layers):
            prefix = f"layers.{i}."
            _fill(layer, {k[len(prefix) :]: v.clone() for k, v in self.tensors.items() if k.startswith(prefix)})
        cache.seen_tokens = self.token_count
        return cache


def _layer_tensors(layer) -> dict[str, torch.Tensor]:
    if isinstance(layer, ParallelState):
        return {f"{branch}.{k}": v for branch, part in (("linear", layer.linear), ("softmax", layer.softmax)) for k, v in _layer_tensors(part).items()}
    tensors = dict(layer.tensors())
    if getattr(layer, "sinks", None) is not None:
        tensors["sinks.keys"], tensors["sinks.values"] = layer.sinks
    return tensors


def _fill(layer, parts: dict[str, torch.Tensor]) -> None:
    if isinstance(layer, ParallelState):
        for branch, part in (("linear", layer.linear), ("softmax", layer.softmax)):
            _fill(part, {k[len(branch) + 1 :]: v for k, v in parts.items() if k.startswith(branch + ".")})
    elif isinstance(layer, GLAState):
        layer.state = parts.get("state")
    elif isinstance(layer, (WindowKV, FullKV)):
        sinks = 0
        if "sinks.keys" in parts:
            layer.set_sinks(parts["sinks.keys"], parts["sinks.values"])
            sinks = parts["sinks.keys"].shape[1]
        if "keys" in parts:
            real = slice(sinks, None) if isinstance(layer, FullKV) else slice(None)
            layer.extend(parts["keys"][:, real], parts["values"][:, real])
    else:
        raise TypeError(f"no snapshot support for cache entries of type {type(layer).__name__}")


def take_snapshot(cache: SpikingBrainCache, prefix_sha256: str, fingerprint: str) -> Snapshot:
    """Copy the tensors of ``cache`` (batch of one) into a snapshot."""
    tensors = {
        f"layers.{i}.{name}": t.detach().clone().contiguous()
        for i, layer in enumerate(cache.layers)
        for name, t in _layer_tensors(layer).items()
    }
    return Snapshot(tensors, cache.seen_tokens, prefix_sha256, fingerprint, list(cache.layer_mixers), cache.window)


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)``, fsync the file, then rename it onto ``path`` (and fsync the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_snapshot(path: str | Path, snapshot: Snapshot, model_name: str) -> None:
    """Write ``snapshot`` to a safetensors file atomically."""
    atomic_write(Path(path), lambda tmp: save_file(snapshot.tensors, str(tmp), metadata=snapshot.metadata(model_name)))


def load_snapshot(path: str | Path, fingerprint: str | None = None) -> Snapshot:
    """Read a snapshot file, checking its format and (when given) that it was made by the model with ``fingerprint``."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable state snapshot ({err}); delete the file so it is made again") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}; this is not a state snapshot")
    if fingerprint is not None and meta.get("model_fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: made by another model (model_fingerprint {meta.get('model_fingerprint')!r}, model "
            f"{meta.get('model')!r}); use that model or delete the snapshot"
        )
    known = ("format", "model", "model_fingerprint", "token_count", "prefix_sha256", "layer_mixers", "window", "constant_size", "size_note", "nbytes")
    try:
        return Snapshot(
            tensors, int(meta["token_count"]), meta["prefix_sha256"], meta["model_fingerprint"],
            meta["layer_mixers"].split(","), int(meta["window"]), {k: v for k, v in meta.items() if k not in known},
        )
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: metadata field {err} is missing or invalid; delete the snapshot so it is made again") from err
