"""SpikingBrain models: config, mixers, cache, causal LM, official-format support and Auto registration."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import SpikingBrainCache
from .config import MIXER_TYPES, SpikingBrainConfig, alternating_layers
from .modeling import SpikingBrainForCausalLM, SpikingBrainModel

AutoConfig.register(SpikingBrainConfig.model_type, SpikingBrainConfig, exist_ok=True)
AutoModel.register(SpikingBrainConfig, SpikingBrainModel, exist_ok=True)
AutoModelForCausalLM.register(SpikingBrainConfig, SpikingBrainForCausalLM, exist_ok=True)

__all__ = [
    "MIXER_TYPES",
    "SpikingBrainCache",
    "SpikingBrainConfig",
    "SpikingBrainForCausalLM",
    "SpikingBrainModel",
    "alternating_layers",
]
