"""Teacher targets computed once: the teacher's final hidden states for each training row, kept in a folder.

A distillation step needs the teacher's output for its rows. With a ``teacher_targets`` folder the
trainer takes it from there when an earlier step, epoch or run on the same rows already computed it,
and then runs only the student. Each row is one safetensors file named by a hash of the teacher's
weights and the row's token ids. The file holds the ids, which are checked on reading, and the hidden
states ``[seq_len, hidden]`` in the teacher's output dtype: 2,304 bytes per token for SmolLM2
(hidden 576, fp32). The distillation loss from these equals the loss from a live teacher forward.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["TeacherTargets", "weights_fingerprint"]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes and bytes), in hex."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TeacherTargets:
    """The teacher's final hidden states of token rows, read from ``folder`` or computed and written there.

    ``mode`` names how the teacher runs (for example ``"cpu"`` or ``"cuda-bf16"``): targets computed one
    way are not taken for another. ``hits`` and ``misses`` count rows since construction.
    """

    def __init__(self, folder: str | Path, teacher: torch.nn.Module, mode: str = "cpu"):
        self.folder, self.teacher = Path(folder).expanduser(), teacher
        self.key = f"{weights_fingerprint(teacher)}|{mode}"
        self.hits = self.misses = 0

    def path_of(self, row: torch.Tensor) -> Path:
        """Where the targets of one row of token ids live."""
        digest = hashlib.sha256(self.key.encode() + row.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def _read(self, path: Path, row: torch.Tensor) -> torch.Tensor | None:
        """A stored row's hidden states, or None where none is stored."""
        if not path.exists():
            return None
        try:
            stored = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"teacher targets file {path} is unreadable ({error}); delete it and it is recomputed") from error
        if "ids" not in stored or "hidden" not in stored or not torch.equal(stored["ids"], row.to("cpu", torch.int64)):
            raise ValueError(f"teacher targets file {path} does not hold the targets of its token row; delete it and it is recomputed")
        return stored["hidden"]

    def _write(self, path: Path, row: torch.Tensor, hidden: torch.Tensor) -> None:
        """Store one row atomically (a partly written file never has the final name)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        save_file({"ids": row.to("cpu", torch.int64).contiguous(), "hidden": hidden.detach().to("cpu").contiguous()}, partial)
        os.replace(partial, path)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The teacher's final hidden states ``[B, T, hidden]`` for ``ids`` ``[B, T]``, on ``ids.device``; rows not
        stored yet are computed together in one teacher forward and written."""
        paths = [self.path_of(row) for row in ids]
        found = [self._read(path, row) for path, row in zip(paths, ids)]
        missing = [i for i, hidden in enumerate(found) if hidden is None]
        if missing:
            computed = self.teacher.model(input_ids=ids[missing], use_cache=False).last_hidden_state
            for i, hidden in zip(missing, computed):
                self._write(paths[i], ids[i], hidden)
                found[i] = hidden
        self.hits += len(ids) - len(missing)
        self.misses += len(missing)
        return torch.stack([hidden.to(ids.device) for hidden in found])
