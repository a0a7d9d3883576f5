"""Teacher targets computed once per training row, kept in a folder: the teacher's distribution reduced to what the
distillation loss needs (``train.losses.TeacherExpectations``).

A distillation step needs the teacher's output for its rows. With a ``teacher_targets`` folder the
trainer takes it from there when an earlier step, epoch or run on the same rows already computed it,
and then runs only the student. Each row is one safetensors file named by a hash of the teacher's
weights, the student's frozen output head, the temperature and the row's token ids. The file holds the
ids, which are checked on reading, the expected head rows ``[seq_len, hidden]`` and the negentropy
``[seq_len]``: 2,308 bytes per token for SmolLM2 (hidden 576, fp32). The distillation loss from these
equals the loss from a live teacher forward up to fp32 rounding, with one ``[tokens, vocab]`` head
product less per step.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .losses import TeacherExpectations, teacher_expectations

__all__ = ["TeacherTargets", "weights_fingerprint"]


def _digest_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes and bytes), in hex."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _digest_tensor(digest, name, tensor)
    return digest.hexdigest()


class TeacherTargets:
    """The teacher's targets of token rows for a student head and temperature, read from ``folder`` or computed and
    written there.

    ``mode`` names how the teacher runs (for example ``"cpu"`` or ``"cuda-bf16"``): targets computed one
    way are not taken for another. ``hits`` and ``misses`` count rows since construction.
    """

    def __init__(self, folder: str | Path, teacher: torch.nn.Module, mode: str = "cpu"):
        self.folder, self.teacher = Path(folder).expanduser(), teacher
        self.key = f"{weights_fingerprint(teacher)}|{mode}"
        self.hits = self.misses = 0
        self._heads: dict[tuple, str] = {}  # (storage, version, shape, dtype) of a student head -> its fingerprint

    def _head_key(self, head_weight: torch.Tensor, temperature: float) -> str:
        """The part of a row's name that the student's head and the temperature make (the head hashed once)."""
        version = None if head_weight.is_inference() else head_weight._version
        seen = (head_weight.data_ptr(), version, tuple(head_weight.shape), head_weight.dtype)
        if seen not in self._heads:
            digest = hashlib.sha256()
            _digest_tensor(digest, "head", head_weight)
            self._heads[seen] = digest.hexdigest()
        return f"{self._heads[seen]}|T={float(temperature)!r}"

    def path_of(self, row: torch.Tensor, head_weight: torch.Tensor, temperature: float = 1.0) -> Path:
        """Where the targets of one row of token ids live, for this student head and temperature."""
        key = f"{self.key}|{self._head_key(head_weight, temperature)}".encode()
        digest = hashlib.sha256(key + row.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def _read(self, path: Path, row: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """A stored row's expected head rows and negentropy, or None where none is stored."""
        if not path.exists():
            return None
        try:
            stored = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"teacher targets file {path} is unreadable ({error}); delete it and it is recomputed") from error
        if not {"ids", "expected", "negentropy"} <= stored.keys() or not torch.equal(stored["ids"], row.to("cpu", torch.int64)):
            raise ValueError(f"teacher targets file {path} does not hold the targets of its token row; delete it and it is recomputed")
        return stored

    def _write(self, path: Path, row: torch.Tensor, expected: torch.Tensor, negentropy: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store one row atomically (a partly written file never has the final name); returns what was stored."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        stored = {"ids": row.to("cpu", torch.int64).contiguous(), "expected": expected.detach().to("cpu").contiguous(),
                  "negentropy": negentropy.detach().to("cpu").contiguous()}
        save_file(stored, partial)
        os.replace(partial, path)
        return stored

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, head_weight: torch.Tensor, temperature: float = 1.0) -> TeacherExpectations:
        """The teacher's targets for ``ids`` ``[B, T]`` and the student head ``head_weight`` at ``temperature``, on
        ``ids.device``; rows not stored yet are computed together in one teacher forward and written."""
        paths = [self.path_of(row, head_weight, temperature) for row in ids]
        found = [self._read(path, row) for path, row in zip(paths, ids)]
        missing = [i for i, stored in enumerate(found) if stored is None]
        if missing:
            hidden = self.teacher.model(input_ids=ids[missing], use_cache=False).last_hidden_state
            computed = teacher_expectations(hidden, self.teacher.lm_head.weight, head_weight, temperature)
            for j, i in enumerate(missing):
                found[i] = self._write(paths[i], ids[i], computed.expected[j], computed.negentropy[j])
        self.hits += len(ids) - len(missing)
        self.misses += len(missing)
        return TeacherExpectations(torch.stack([stored["expected"].to(ids.device) for stored in found]),
                                   torch.stack([stored["negentropy"].to(ids.device) for stored in found]), float(temperature))
