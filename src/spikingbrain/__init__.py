"""SpikingBrain-style hybrid language models in plain PyTorch.

Importing the package registers the ``spikingbrain`` and ``gla_swa`` model types with
transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained(folder)`` works.
"""

from .model import (
    GLAswaConfig,
    GLAswaForCausalLM,
    SpikingBrainCache,
    SpikingBrainConfig,
    SpikingBrainForCausalLM,
    save_official,
)

__version__ = "0.1.0"

__all__ = [
    "GLAswaConfig",
    "GLAswaForCausalLM",
    "SpikingBrainCache",
    "SpikingBrainConfig",
    "SpikingBrainForCausalLM",
    "save_official",
]
