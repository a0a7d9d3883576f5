"""scripts/set_delta_window.py: a delta copied with another serving window or sink count, every tensor and metadata entry kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from spikingbrain.model.shipped import write_delta

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "set_delta_window.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {name: f.get_tensor(name) for name in f.keys()}


def test_the_window_changes_and_everything_else_is_kept(tmp_path):
    tensors = {"model.layers.0.attn.g_norm.weight": torch.randn(8), "model.layers.1.mlp.up_proj.lora_a": torch.randn(4, 16)}
    config = {"layer_mixers": ["gla", "swa"], "sliding_window": 1024, "keep_first_tokens": 4}
    write_delta(tmp_path / "d.safetensors", tensors, config, "default", {"lora_scale": 2.0, "steps": 491})
    done = run(tmp_path / "d.safetensors", tmp_path / "w4096.safetensors", "--window", 4096)
    assert done.returncode == 0, done.stderr
    meta, copied = read(tmp_path / "w4096.safetensors")
    assert json.loads(meta["config"]) == {**config, "sliding_window": 4096}
    assert meta["teacher"] == "default" and json.loads(meta["lora_scale"]) == 2.0 and json.loads(meta["steps"]) == 491
    assert json.loads(meta["trained_sliding_window"]) == 1024
    assert copied.keys() == tensors.keys() and all(torch.equal(copied[n], t) for n, t in tensors.items())
    # a second change keeps the window it was trained with
    assert run(tmp_path / "w4096.safetensors", tmp_path / "w2048.safetensors", "--window", 2048).returncode == 0
    meta, _ = read(tmp_path / "w2048.safetensors")
    assert json.loads(meta["config"])["sliding_window"] == 2048 and json.loads(meta["trained_sliding_window"]) == 1024
    assert "trained_keep_first_tokens" not in meta


def test_the_kept_first_tokens_change_alone(tmp_path):
    tensors = {"model.layers.0.attn.g_norm.weight": torch.randn(8)}
    config = {"layer_mixers": ["gla", "swa"], "sliding_window": 4096, "keep_first_tokens": 4}
    write_delta(tmp_path / "d.safetensors", tensors, config, "default", {"trained_sliding_window": 1024})
    done = run(tmp_path / "d.safetensors", tmp_path / "f512.safetensors", "--keep-first-tokens", 512)
    assert done.returncode == 0, done.stderr
    meta, copied = read(tmp_path / "f512.safetensors")
    assert json.loads(meta["config"]) == {**config, "keep_first_tokens": 512}
    assert json.loads(meta["trained_keep_first_tokens"]) == 4 and json.loads(meta["trained_sliding_window"]) == 1024
    assert torch.equal(copied["model.layers.0.attn.g_norm.weight"], tensors["model.layers.0.attn.g_norm.weight"])
    # a config without the key was trained with a plain window
    write_delta(tmp_path / "plain.safetensors", tensors, {"layer_mixers": ["swa"], "sliding_window": 64}, "default")
    assert run(tmp_path / "plain.safetensors", tmp_path / "p8.safetensors", "--keep-first-tokens", 8, "--window", 128).returncode == 0
    meta, _ = read(tmp_path / "p8.safetensors")
    assert json.loads(meta["config"]) == {"layer_mixers": ["swa"], "sliding_window": 128, "keep_first_tokens": 8}
    assert json.loads(meta["trained_keep_first_tokens"]) == 0 and json.loads(meta["trained_sliding_window"]) == 64


def test_refusals_name_the_problem(tmp_path):
    write_delta(tmp_path / "d.safetensors", {"w": torch.ones(2)}, {"layer_mixers": ["gla"]}, "default")
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    taken = run(tmp_path / "d.safetensors", tmp_path / "taken.safetensors", "--window", 64)
    assert taken.returncode != 0 and "exists; give a new file name" in taken.stderr
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    zero = run(tmp_path / "d.safetensors", tmp_path / "o.safetensors", "--window", 0)
    assert zero.returncode != 0 and "--window 0: give a window of at least 1 key" in zero.stderr
    nothing = run(tmp_path / "d.safetensors", tmp_path / "o.safetensors")
    assert nothing.returncode != 0 and "give --window, --keep-first-tokens or both" in nothing.stderr
    negative = run(tmp_path / "d.safetensors", tmp_path / "o.safetensors", "--keep-first-tokens", -1)
    assert negative.returncode != 0 and "--keep-first-tokens -1: give 0 or more" in negative.stderr
    no_window = run(tmp_path / "d.safetensors", tmp_path / "o.safetensors", "--window", 64)
    assert no_window.returncode != 0 and "has no sliding_window" in no_window.stderr
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    plain = run(tmp_path / "plain.safetensors", tmp_path / "o.safetensors", "--window", 64)
    assert plain.returncode != 0 and "not a spikingbrain delta file" in plain.stderr
