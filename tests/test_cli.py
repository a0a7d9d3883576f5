"""The ``spikingbrain`` command, run as a real subprocess on the embedded model and on tiny folders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from spikingbrain.model import SpikingBrainConfig, SpikingBrainForCausalLM


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spikingbrain.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.real_model
def test_generate_default_matches_transformers_greedy(default_folder, default_tokenizer):
    from transformers import AutoModelForCausalLM

    prompt = "What is the capital of France?"
    result = run_cli("generate", "--model", "default", "--prompt", prompt, "--chat", "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    ids = default_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    teacher = AutoModelForCausalLM.from_pretrained(default_folder).eval()
    with torch.no_grad():
        expected = teacher.generate(ids, max_new_tokens=12, do_sample=False)
    text = default_tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    assert result.stdout.strip() == text.strip()
    assert stats["prompt_tokens"] == ids.shape[1]
    assert stats["new_tokens"] == expected.shape[1] - ids.shape[1]
    assert stats["prefill_seconds"] > 0 and stats["decode_tokens_per_second"] > 0


@pytest.mark.real_model
def test_prompt_over_the_limit_is_refused(default_folder):
    result = run_cli("generate", "--model", "default", "--prompt", "one two three four five six", "--max-prompt-tokens", "3")
    assert result.returncode == 2
    assert "--max-prompt-tokens 3" in result.stderr


@pytest.mark.real_model
def test_info_default_counts(default_folder):
    result = run_cli("info", "--model", "default", "--length", "1000", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["model_type"] == "llama" and info["layer_layout"] == "F" * 30
    # SmolLM2-135M: 30 layers x 3 kv heads x 64 dims, keys and values, fp32, 1000 tokens.
    assert info["transformer_kv_cache_bytes"] == 2 * 30 * 1000 * 3 * 64 * 4
    assert info["state_bytes_per_sequence"] == info["transformer_kv_cache_bytes"]


def test_info_hybrid_state_is_smaller(tmp_path):
    config = SpikingBrainConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
    )
    SpikingBrainForCausalLM(config).save_pretrained(tmp_path)
    result = run_cli("info", "--model", str(tmp_path), "--length", "1000", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    gla = 2 * 2 * 8 * 8 * 4  # two GLA layers, 2 kv heads, 8x8 fp32 state
    swa = 2 * 2 * 16 * 2 * 8 * 4  # two SWA layers, keys and values of 16 positions
    assert info["layer_layout"] == "LSLS"
    assert info["state_bytes_per_sequence"] == gla + swa
    assert info["transformer_kv_cache_bytes"] == 2 * 4 * 1000 * 2 * 8 * 4


def test_bad_model_folder_is_named(tmp_path):
    result = run_cli("info", "--model", str(tmp_path))
    assert result.returncode == 2
    assert str(tmp_path) in result.stderr and "config.json" in result.stderr


HELP_OF_EVERY_COMMAND = """
import argparse, contextlib, io, json, sys
from spikingbrain.cli import build_parser

def paths(parser, path):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from paths(sub, path + [name])

helped = []
for path in paths(build_parser(), []):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        build_parser().parse_args(path + ["--help"])
    helped.append([" ".join(path), "usage: spikingbrain" in out.getvalue()])
print(json.dumps({"helped": helped, "loaded": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""


def test_help_of_every_command_imports_neither_torch_nor_transformers():
    result = subprocess.run([sys.executable, "-c", HELP_OF_EVERY_COMMAND], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    helped = dict(report["helped"])
    assert len(helped) >= 26 and all(helped.values()), helped  # every command and group printed its usage
    assert {"bench ttft", "eval ppl", "train", "serve", "demo"} <= set(helped)
    assert report["loaded"] == []


def test_register_with_transformers_makes_auto_classes_load_our_folders():
    """``import spikingbrain`` stays light; ``register_with_transformers()`` lets AutoModelForCausalLM load our configs."""
    import subprocess
    import sys

    code = (
        "import sys, spikingbrain\n"
        "assert 'torch' not in sys.modules\n"
        "spikingbrain.register_with_transformers()\n"
        "from transformers import AutoConfig\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "assert 'spikingbrain' in CONFIG_MAPPING and 'gla_swa' in CONFIG_MAPPING\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
