"""oneDNN-packed linear weights for decode steps of a fixed number of rows.

On CPU, MKL's ``F.linear`` over a few rows with the ``[out, in]`` weight layout runs several times
slower per step than over one row (at 8 rows, SmolLM2's 49152-row output layer takes ~5x the time
of one row); the same weights packed once by oneDNN for that row count cost little more than one
row. :class:`PackedLinears` keeps such packed copies (the memory of the linear weights a second
time) and, inside :meth:`PackedLinears.active`, routes the plain fp32 ``nn.Linear`` modules of the
model through them. Modules with hooks (spiking inputs), other dtypes or devices keep their own
forward. With the row count fixed, a row's result does not depend on the other rows.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["PackedLinears", "packing_available"]


def packing_available() -> bool:
    """Whether this torch build can pack linear weights with oneDNN."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and not module._forward_pre_hooks
        and not module._forward_hooks
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
    )


class PackedLinears:
    """Packed copies of a model's plain fp32 CPU linear weights for inputs of exactly ``rows`` rows."""

    def __init__(self, model: nn.Module, rows: int):
        self.model, self.rows = model, rows
        self.packed: dict[nn.Linear, tuple[int, torch.Tensor]] = {}

    def _weight(self, module: nn.Linear) -> torch.Tensor:
        """The packed weight of ``module``, packed again when its weight changed in place."""
        version = module.weight._version
        entry = self.packed.get(module)
        if entry is None or entry[0] != version:
            with torch.no_grad():
                entry = (version, torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), self.rows))
            self.packed[module] = entry
        return entry[1]

    def _forward(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.rows * module.in_features:  # not a decode step of `rows` rows
            return nn.Linear.forward(module, x)
        return torch.ops.mkldnn._linear_pointwise(x, self._weight(module), module.bias, "none", [], "")

    @contextmanager
    def active(self):
        """Inside: the model's packable linears compute ``rows``-row inputs with the packed weights."""
        modules = [m for m in self.model.modules() if _packable(m)]
        for module in modules:
            module.forward = lambda x, module=module: self._forward(module, x)
        try:
            yield self
        finally:
            for module in modules:
                del module.forward

    def nbytes(self) -> int:
        """Bytes of the packed copies made so far."""
        return sum(module.weight.numel() * module.weight.element_size() for module in self.packed)
