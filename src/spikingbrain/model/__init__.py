"""SpikingBrain models: config, mixers, MoE, cache, causal LM, presets, official-format support and Auto registration.

Names load on first use (PEP 562), so ``spikingbrain.model.names`` imports without torch. The
model classes register ``spikingbrain`` and ``gla_swa`` with transformers' Auto classes when
their modules load; importing any name below but those of ``names`` loads them.
"""

from __future__ import annotations

import importlib

#: Public name -> the module of this package that defines it.
_EXPORTS = {
    "GLAswaConfig": "official",
    "GLAswaForCausalLM": "official",
    "save_official": "official_format",
    "MIXER_TYPES": "names",
    "PARALLEL_MIXERS": "names",
    "PRESETS": "presets",
    "SpikingBrainCache": "cache",
    "SpikingBrainConfig": "config",
    "SpikingBrainForCausalLM": "modeling",
    "SpikingBrainModel": "modeling",
    "alternating_layers": "names",
    "preset_config": "presets",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS[name]
    if module != "names":
        importlib.import_module(".official", __name__)  # loads the model classes: both types registered
    return getattr(importlib.import_module(f".{module}", __name__), name)
