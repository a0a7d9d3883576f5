"""scripts/restore_window_layers.py: chosen GLA layers of a delta become the teacher's sliding-window attention again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from spikingbrain.model.shipped import build_from_delta, write_delta

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "restore_window_layers.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def tiny_teacher(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(config).eval()
    teacher.save_pretrained(folder)
    return teacher


def test_restored_layers_run_the_teachers_attention_and_keep_the_rest(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    generator = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    config = {"layer_mixers": ["gla", "gla", "swa"], "sliding_window": 64, "keep_first_tokens": 0, "gla_gate_rank": 4}
    tensors = {  # layer 0: what a conversion trains in a GLA layer; layer 1: a GLA layer that stays; layer 0's MLP adapter
        "model.layers.0.attn.gk_proj.0.weight": rand(4, 32), "model.layers.0.attn.gk_proj.1.weight": rand(16, 4),
        "model.layers.0.attn.gk_proj.1.bias": rand(16), "model.layers.0.attn.g_norm.weight": 1 + rand(8),
        "model.layers.0.attn.q_proj.lora_a": rand(2, 32), "model.layers.0.attn.q_proj.lora_b": rand(32, 2),
        "model.layers.0.mlp.up_proj.lora_a": rand(2, 32), "model.layers.0.mlp.up_proj.lora_b": rand(48, 2),
        "model.layers.1.attn.gk_proj.1.bias": rand(16),
    }
    write_delta(tmp_path / "d.safetensors", tensors, config, str(tmp_path / "teacher"), {"lora_scale": 2.0, "steps": 7})
    done = run(tmp_path / "d.safetensors", tmp_path / "r.safetensors", "--layers", "0")
    assert done.returncode == 0, done.stderr
    with safe_open(str(tmp_path / "r.safetensors"), framework="pt") as f:
        meta, kept = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    assert json.loads(meta["config"]) == {**config, "layer_mixers": ["swa", "gla", "swa"]}
    assert json.loads(meta["restored_window_layers"]) == [0] and json.loads(meta["steps"]) == 7
    assert set(kept) == {"model.layers.0.mlp.up_proj.lora_a", "model.layers.0.mlp.up_proj.lora_b", "model.layers.1.attn.gk_proj.1.bias"}

    build_from_delta(tmp_path / "r.safetensors", tmp_path / "built")
    from spikingbrain import SpikingBrainForCausalLM

    built = SpikingBrainForCausalLM.from_pretrained(tmp_path / "built").eval()
    assert built.config.layer_mixers == ["swa", "gla", "swa"]
    source = teacher.model.layers[0]
    for p in "qkvo":  # the teacher's own attention projections, untouched by the dropped adapter
        assert torch.equal(getattr(built.model.layers[0].attn, f"{p}_proj").weight, getattr(source.self_attn, f"{p}_proj").weight)
    up = source.mlp.up_proj.weight + 2.0 * tensors["model.layers.0.mlp.up_proj.lora_b"] @ tensors["model.layers.0.mlp.up_proj.lora_a"]
    assert torch.allclose(built.model.layers[0].mlp.up_proj.weight, up, atol=1e-6)
    assert torch.equal(built.model.layers[1].attn.gate_bias, tensors["model.layers.1.attn.gk_proj.1.bias"])

    # restoring every GLA layer, with the window past the input, gives the teacher's own logits
    assert run(tmp_path / "r.safetensors", tmp_path / "all.safetensors", "--layers", "1").returncode == 0
    with safe_open(str(tmp_path / "all.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["restored_window_layers"]) == [0, 1]
    without_mlp = {n: t for n, t in kept.items() if ".mlp." not in n and not n.startswith("model.layers.1.attn.")}
    write_delta(tmp_path / "attn-only.safetensors", without_mlp, config, str(tmp_path / "teacher"), {"lora_scale": 2.0})
    assert run(tmp_path / "attn-only.safetensors", tmp_path / "none.safetensors", "--layers", "0,1").returncode == 0
    build_from_delta(tmp_path / "none.safetensors", tmp_path / "teacher-again")
    again = SpikingBrainForCausalLM.from_pretrained(tmp_path / "teacher-again").eval()
    ids = torch.randint(0, 97, (1, 20), generator=generator)
    with torch.no_grad():
        assert (again(ids, use_cache=False).logits - teacher(ids).logits).abs().max() < 1e-5


def test_refusals_name_the_layer_and_the_fix(tmp_path):
    config = {"layer_mixers": ["gla", "swa"], "sliding_window": 64}
    write_delta(tmp_path / "d.safetensors", {"model.layers.0.attn.g_norm.weight": torch.ones(8)}, config, "default")
    not_gla = run(tmp_path / "d.safetensors", tmp_path / "o.safetensors", "--layers", "1")
    assert not_gla.returncode != 0 and "layer 1 is 'swa', not a GLA layer" in not_gla.stderr
    beyond = run(tmp_path / "d.safetensors", tmp_path / "o.safetensors", "--layers", "2")
    assert beyond.returncode != 0 and "--layers 2: the model has layers 0..1" in beyond.stderr
    words = run(tmp_path / "d.safetensors", tmp_path / "o.safetensors", "--layers", "nine")
    assert words.returncode != 0 and "give 0-indexed layer numbers separated by commas" in words.stderr
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    taken = run(tmp_path / "d.safetensors", tmp_path / "taken.safetensors", "--layers", "0")
    assert taken.returncode != 0 and "exists; give a new file name" in taken.stderr
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    assert not (tmp_path / "o.safetensors").exists()
