"""Turning spiking on and off in a model: the inputs of its projections become spike counts times threshold.

``spikify`` puts an adaptive-threshold neuron (``neuron.spike_quantize``) in front of every
``nn.Linear`` whose name ends in one of ``targets`` (by default every projection of the
attention, the GLA gate, the MLP and the experts; embeddings, router and ``lm_head`` stay
dense), as the released W8ASpike code does. Optionally it spikes the sliding-window query after
RoPE (threshold per token per head) and fake-quantises the keys and values seen by softmax
attention to symmetric INT8 per token per head: modules that support these expose the
attributes ``query_spike_k`` and ``int8_kv``. ``unspikify`` restores the dense model exactly.
The settings live in ``model.config.spiking`` so a saved model reloads spiking.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .neuron import SpikingInput, spike_counts, spike_quantize

__all__ = [
    "DEFAULT_TARGETS",
    "current_spiking",
    "spiking_settings",
    "spikify",
    "unspikify",
    "spiking_off",
    "spiking_linears",
    "projection_name",
    "observe_spikes",
    "observing_first_rows",
]

#: Last components of the names of the projections whose inputs spike.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gk_proj", "gate_proj", "up_proj", "down_proj")

#: Called with (module name, counts, threshold) for every spiking input while observing.
Observer = Callable[[str, torch.Tensor, torch.Tensor], None]


def spiking_settings(
    k: float = 3.0, targets: Iterable[str] = DEFAULT_TARGETS, spike_query: bool = False, int8_kv: bool = False
) -> dict:
    """The validated ``config.spiking`` dictionary for these settings."""
    k = float(k)
    if not k > 0:
        raise ValueError(f"spiking k must be > 0 (the threshold is mean|x| / k; the report uses 3), got {k}")
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"spiking targets must be a non-empty list of projection names like {list(DEFAULT_TARGETS)}, got {targets}")
    return {"k": k, "targets": targets, "spike_query": bool(spike_query), "int8_kv": bool(int8_kv)}


def _is_target(name: str, targets: list[str]) -> bool:
    parts = name.split(".")
    # the GLA gate is a low-rank pair gk_proj.0 / gk_proj.1: its input is gk_proj.0's
    return parts[-1] in targets or (len(parts) > 1 and parts[-2] in targets and parts[-1] == "0")


def spiking_linears(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, nn.Module]:
    """The modules (by name) whose inputs spike under ``targets``: linear layers and INT8 linear layers."""
    targets = list(targets)
    return {
        name: module
        for name, module in model.named_modules()
        if name and _is_target(name, targets) and isinstance(getattr(module, "weight", None), torch.Tensor)
        and not isinstance(module, nn.Embedding) and module.weight.dim() == 2
    }


def projection_name(module_name: str) -> tuple[int | None, str]:
    """``(layer index, projection)`` of a module name, experts merged: ``model.layers.3.mlp.experts.5.up_proj`` -> ``(3, 'mlp.experts.up_proj')``."""
    match = re.match(r"(?:.*\.)?layers\.(\d+)\.(.+)$", module_name)
    if not match:
        return None, module_name
    projection = re.sub(r"(experts)\.\d+\.", r"\1.", match.group(2))
    return int(match.group(1)), projection.removesuffix(".0") if projection.endswith("gk_proj.0") else projection


class _SpikeInput:
    """A projection's neuron: replaces its input by the spike counts times threshold. A forward pre-hook on plain
    linear layers; layers that take ``SpikingInput`` (INT8 layers) hold it as ``spike_input`` and call :meth:`apply`
    themselves, which spares a decode step the cost of a module hook on each of its ~220 projections."""

    def __init__(self, name: str, k: float):
        self.name, self.k = name, k
        self.observer: Observer | None = None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.apply(module, args[0]), *args[1:])

    def apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | SpikingInput:
        """What ``module`` multiplies: ``x`` spiked, or (INT8 layers, not observed) ``SpikingInput`` to count itself."""
        if self.observer is None and getattr(module, "takes_spiking_input", False):
            return SpikingInput(x, self.k)
        if self.observer is None:
            return spike_quantize(x, self.k)
        counts, threshold = spike_counts(x.detach(), self.k)
        self.observer(self.name, counts, threshold)
        spiked = counts.to(x.dtype) * threshold
        return x + (spiked - x).detach() if x.requires_grad else spiked  # straight through


class _HeldNeuron:
    """The removable handle of a neuron a layer holds as ``spike_input`` (as a hook's handle removes the hook)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.spike_input = None


def current_spiking(model: nn.Module) -> dict | None:
    """The settings ``model`` is spiking with, or None."""
    return getattr(model, "_spike_settings", None)


def _hooks(model: nn.Module) -> dict[str, tuple[_SpikeInput, torch.utils.hooks.RemovableHandle]]:
    if not hasattr(model, "_spike_hooks"):
        model._spike_hooks = {}
    return model._spike_hooks


def spikify(
    model: nn.Module,
    k: float = 3.0,
    targets: Iterable[str] = DEFAULT_TARGETS,
    spike_query: bool = False,
    int8_kv: bool = False,
) -> nn.Module:
    """Spike the inputs of ``model``'s projections (in place; returns the model); see the module docstring."""
    settings = spiking_settings(k, targets, spike_query, int8_kv)
    unspikify(model)
    linears = spiking_linears(model, settings["targets"])
    if not linears:
        raise ValueError(
            f"no projection of this model matches spiking targets {settings['targets']}; "
            f"use names like {list(DEFAULT_TARGETS)}"
        )
    hooks = _hooks(model)
    model._spike_settings = settings
    for name, module in linears.items():
        hook = _SpikeInput(name, settings["k"])
        if hasattr(module, "spike_input"):
            module.spike_input = hook
            hooks[name] = (hook, _HeldNeuron(module))
        else:
            hooks[name] = (hook, module.register_forward_pre_hook(hook))
    for module in model.modules():
        if hasattr(module, "query_spike_k"):
            module.query_spike_k = settings["k"] if settings["spike_query"] else None
        if hasattr(module, "int8_kv"):
            module.int8_kv = settings["int8_kv"]
    if hasattr(model, "config"):
        model.config.spiking = settings
    return model


def unspikify(model: nn.Module) -> nn.Module:
    """Remove spiking from ``model`` (in place; returns the model): it computes exactly as before ``spikify``."""
    for _, handle in _hooks(model).values():
        handle.remove()
    model._spike_hooks = {}
    model._spike_settings = None
    for module in model.modules():
        if hasattr(module, "query_spike_k"):
            module.query_spike_k = None
        if hasattr(module, "int8_kv"):
            module.int8_kv = False
    if hasattr(model, "config"):
        model.config.spiking = None
    return model


@contextmanager
def spiking_off(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: ``model`` enters dense; on exit it spikes again exactly as it did before (or stays dense),
    whatever the block changed."""
    settings = current_spiking(model)
    unspikify(model)
    try:
        yield model
    finally:
        unspikify(model)
        if settings:
            spikify(model, **settings)


class observe_spikes:
    """Context manager: call ``observer(name, counts, threshold)`` for every spiking projection input of a spikified model."""

    def __init__(self, model: nn.Module, observer: Observer):
        self.hooks = [hook for hook, _ in _hooks(model).values()]
        if not self.hooks:
            raise ValueError("the model is not spiking; call spikify(model, k=...) first")
        self.observer = observer

    def __enter__(self):
        for hook in self.hooks:
            hook.observer = self.observer
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.observer = None


@contextmanager
def observing_first_rows(model: nn.Module, rows: int) -> Iterator[None]:
    """Inside: the observers of ``model``'s spiking inputs see only the first ``rows`` batch rows of each input
    (a batched decode step whose other rows are padding)."""
    hooks = [hook for hook, _ in _hooks(model).values() if hook.observer is not None]
    observers = [hook.observer for hook in hooks]
    for hook, observer in zip(hooks, observers):
        hook.observer = lambda name, counts, threshold, observer=observer: observer(name, counts[:rows], threshold[:rows])
    try:
        yield
    finally:
        for hook, observer in zip(hooks, observers):
            hook.observer = observer
