"""SpikingBrain models: config, mixers, MoE, cache, causal LM, presets, official-format support and Auto registration."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import SpikingBrainCache
from .config import MIXER_TYPES, PARALLEL_MIXERS, SpikingBrainConfig, alternating_layers
from .modeling import SpikingBrainForCausalLM, SpikingBrainModel
from .official import GLAswaConfig, GLAswaForCausalLM, save_official
from .presets import PRESETS, preset_config

AutoConfig.register(SpikingBrainConfig.model_type, SpikingBrainConfig, exist_ok=True)
AutoModel.register(SpikingBrainConfig, SpikingBrainModel, exist_ok=True)
AutoModelForCausalLM.register(SpikingBrainConfig, SpikingBrainForCausalLM, exist_ok=True)
AutoConfig.register(GLAswaConfig.model_type, GLAswaConfig, exist_ok=True)
AutoModelForCausalLM.register(GLAswaConfig, GLAswaForCausalLM, exist_ok=True)

__all__ = [
    "GLAswaConfig",
    "GLAswaForCausalLM",
    "save_official",
    "MIXER_TYPES",
    "PARALLEL_MIXERS",
    "PRESETS",
    "SpikingBrainCache",
    "SpikingBrainConfig",
    "SpikingBrainForCausalLM",
    "SpikingBrainModel",
    "alternating_layers",
    "preset_config",
]
