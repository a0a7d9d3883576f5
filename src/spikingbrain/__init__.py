"""SpikingBrain-style hybrid language models in plain PyTorch.

The names below load on first use (PEP 562), so ``import spikingbrain`` and the command line's
``--help`` stay fast. :func:`register_with_transformers` (or using any of them) registers the
``spikingbrain`` and ``gla_swa`` model types with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(folder)`` works.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "GLAswaConfig",
    "GLAswaForCausalLM",
    "SpikingBrainCache",
    "SpikingBrainConfig",
    "SpikingBrainForCausalLM",
    "save_official",
    "register_with_transformers",
]


def register_with_transformers() -> None:
    """Register the ``spikingbrain`` and ``gla_swa`` model types with transformers' Auto classes."""
    from .model import modeling, official  # noqa: F401  (importing them registers the types)


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import model

    return getattr(model, name)
