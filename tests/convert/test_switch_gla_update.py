"""scripts/switch_gla_update.py: a trained folder copied with its GLA layers on the delta rule, every weight kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from reference_impl import randomize_

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "switch_gla_update.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_switch_keeps_every_weight_and_adds_zero_write_strengths(tmp_path):
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    config = SpikingBrainConfig(num_hidden_layers=2, layer_mixers=["gla", "swa"], hidden_size=32, intermediate_size=48,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=97, sliding_window=5)
    source = randomize_(SpikingBrainForCausalLM(config), 0)
    source.save_pretrained(tmp_path / "additive")
    done = run(tmp_path / "additive", tmp_path / "delta")
    assert done.returncode == 0, done.stderr
    switched = SpikingBrainForCausalLM.from_pretrained(tmp_path / "delta")
    assert switched.config.gla_update == "delta"
    weights = switched.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    beta = switched.model.layers[0].attn.beta_proj
    assert beta.weight.abs().max() == 0 and beta.bias.abs().max() == 0
    again = run(tmp_path / "delta", tmp_path / "twice")
    assert again.returncode != 0 and "already 'delta'" in again.stderr
