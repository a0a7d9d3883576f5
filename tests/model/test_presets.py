"""Presets: the report's shapes, parameter counts against hand arithmetic, `spikingbrain info --preset`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spikingbrain.model.info import parameter_counts
from spikingbrain.model.presets import PRESETS, preset_config, spikingbrain_7b, spikingbrain_76b

HIDDEN, LAYERS, HEADS, KV, D, FFN, VOCAB = 3584, 28, 28, 4, 128, 18944, 152064


def attention_params() -> int:
    """q/k/v with biases, o without: Qwen2.5-7B's attention of one layer."""
    return HIDDEN * HEADS * D + HEADS * D + 2 * (HIDDEN * KV * D + KV * D) + HEADS * D * HIDDEN


FFN_PARAMS = 3 * HIDDEN * FFN
EMBEDDINGS = 2 * VOCAB * HIDDEN  # untied input and output embeddings
NORMS = 2 * HIDDEN  # attn_norm and mlp_norm per layer


def test_7b_counts_by_hand():
    gate = HIDDEN * 16 + 16 * KV * D + KV * D  # low-rank gate of a GLA layer
    expected = EMBEDDINGS + HIDDEN + LAYERS * (attention_params() + FFN_PARAMS + NORMS) + 14 * (gate + D)
    total, active = parameter_counts(spikingbrain_7b())
    assert total == active == expected
    assert 7.60e9 < total < 7.63e9  # Qwen2.5-7B (7.615B) plus 0.9M gate parameters


def test_76b_counts_by_hand():
    """21 MoE layers x (16 routed + 1 shared) FFNs + 7 dense FFNs + shared q/k/v/o: the report's 76B-A12B."""
    config = spikingbrain_76b()
    moe_layers, dense_layers = 21, 7
    per_layer = attention_params() + NORMS + 2 * D + 2 + 128 * HIDDEN  # + g_norm, softmax norm, branch weights, sinks
    router = 16 * HIDDEN
    total_expected = (
        EMBEDDINGS + HIDDEN + LAYERS * per_layer + dense_layers * FFN_PARAMS + moe_layers * (17 * FFN_PARAMS + router)
    )
    active_expected = total_expected - moe_layers * 15 * FFN_PARAMS
    total, active = parameter_counts(config)
    assert (total, active) == (total_expected, active_expected)
    assert 75.5e9 < total < 76.5e9 and 11.5e9 < active < 12.5e9  # "76B-A12B" (report check: 76.05B / 11.9B)


def test_76b_layout_is_the_report_read_one_indexed():
    config = spikingbrain_76b()
    full = [i for i, m in enumerate(config.layer_mixers) if m == "parallel-full"]
    assert full == [6, 13, 20, 27]  # 1-indexed 7, 14, 21, 28
    assert set(config.layer_mixers) == {"parallel-swa", "parallel-full"}
    assert config.dense_ffn_layers == [0, 1, 2, 4, 6, 8, 10]  # 1-indexed 1, 2, 3, 5, 7, 9, 11
    assert len(config.moe_layers) == 21
    assert (config.num_sink_tokens, config.gla_gate, config.gla_feature_map) == (128, "key_tied", "sigmoid")
    assert (config.num_experts, config.num_experts_per_tok, config.num_shared_experts) == (16, 1, 1)
    assert config.parallel_shared_projections


def test_7b_preset_is_the_release():
    config = spikingbrain_7b()
    assert config.layer_mixers == ["gla", "swa"] * 14
    assert (config.sliding_window, config.rope_theta, config.attention_bias, config.tie_word_embeddings) == (4096, 1e6, True, False)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (28, 4, 18944)


def test_presets_at_other_sizes_follow_the_layer_count():
    small = preset_config("spikingbrain-76b", num_hidden_layers=16, hidden_size=256, intermediate_size=512,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    assert [i for i, m in enumerate(small.layer_mixers) if m == "parallel-full"] == [6, 13]
    assert small.dense_ffn_layers == [0, 1, 2, 4, 6, 8, 10] and small.moe_layers == [3, 5, 7, 9, 11, 12, 13, 14, 15]
    tiny = preset_config("spikingbrain-76b", num_hidden_layers=3, num_experts=0)
    assert tiny.layer_mixers == ["parallel-swa"] * 3 and tiny.moe_layers == [] and tiny.dense_ffn_layers == []
    assert preset_config("spikingbrain-7b", num_hidden_layers=5).layer_mixers == ["gla", "swa", "gla", "swa", "gla"]
    with pytest.raises(ValueError, match="unknown preset 'spikingbrain-1b'"):
        preset_config("spikingbrain-1b")
    assert sorted(PRESETS) == ["spikingbrain-76b", "spikingbrain-7b"]


def run_info(*args):
    return subprocess.run([sys.executable, "-m", "spikingbrain.cli", "info", *args], capture_output=True, text=True, timeout=300)


def test_cli_info_preset_json_without_allocating_weights():
    # The child reports its own peak (VmHWM of its memory map after exec): getrusage's ru_maxrss would also
    # count the pages it shared with this (large) test process between fork and exec.
    code = ("import sys\nfrom spikingbrain.cli import main\ncode = main(sys.argv[1:])\n"
            "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
            "print('peak-kib', peak, file=sys.stderr)\nsys.exit(code)")
    child = subprocess.run([sys.executable, "-c", code, "info", "--preset", "spikingbrain-76b", "--json", "--length", "8192"],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    stdout = child.stdout
    peak_kib = int(child.stderr.split("peak-kib")[-1].split()[0])
    info = json.loads(stdout)
    assert (info["parameters"], info["active_parameters"]) == parameter_counts(spikingbrain_76b())
    assert info["layer_layout"] == ("s" * 6 + "f") * 4 and info["sink_tokens"] == 128
    # 76B fp32 weights would be 300 GB; meta-device counting stays far below 3 GB of resident memory.
    assert peak_kib < 3 * 2**20
    seven = json.loads(run_info("--preset", "spikingbrain-7b", "--json").stdout)
    assert seven["parameters"] == seven["active_parameters"] == parameter_counts(spikingbrain_7b())[0]


def test_cli_preset_and_model_are_exclusive():
    result = run_info("--preset", "spikingbrain-7b", "--model", "default")
    assert result.returncode == 2 and "not allowed with" in result.stderr
