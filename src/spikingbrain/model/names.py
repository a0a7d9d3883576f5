"""Names of the model layer that need no torch: mixer types, the SpikingBrain-7B layout, presets and short model names.

The command line builds its parser from them without importing torch or transformers.
"""

from __future__ import annotations

__all__ = ["PARALLEL_MIXERS", "MIXER_TYPES", "alternating_layers", "PRESET_NAMES", "SHIPPED_MODELS", "SHORT_NAMES"]

#: Mixers that run linear attention in parallel with a softmax branch (sliding-window or full).
PARALLEL_MIXERS = ("parallel-swa", "parallel-full")
#: Token mixers a layer can use: gated linear attention, sliding-window attention, full attention,
#: or linear attention in parallel with one of the two softmax kinds.
MIXER_TYPES = ("gla", "swa", "full", *PARALLEL_MIXERS)

#: Named configurations (``model.presets``).
PRESET_NAMES = ("spikingbrain-7b", "spikingbrain-76b")

#: Short name of a shipped conversion -> its delta file inside the package (src/spikingbrain/shipped/).
SHIPPED_MODELS = {
    "spikingbrain-smollm2": "spikingbrain-smollm2.safetensors",  # the SpikingBrain-7B layout: GLA + SWA, constant state
    "spikingbrain-smollm2-hybrid": "spikingbrain-smollm2-hybrid.safetensors",  # the 76B layout scaled down
}
#: Short names accepted wherever a model folder is: the embedded teacher and the shipped conversions.
SHORT_NAMES = ("default", *SHIPPED_MODELS)


def alternating_layers(num_layers: int) -> list[str]:
    """The SpikingBrain-7B layout: GLA on even (0-indexed) layers, SWA on odd layers."""
    return ["gla" if i % 2 == 0 else "swa" for i in range(num_layers)]
