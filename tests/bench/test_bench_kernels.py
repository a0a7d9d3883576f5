"""``spikingbrain bench kernels``: a quick in-process smoke run and the analytical FLOP count.

Benchmarks are never timed tests: the smoke run only checks that every field is written
and every measured number is positive and finite, not how fast anything is.
"""

from __future__ import annotations

import json
import math

import pytest

from spikingbrain.bench.flops import attended_keys, gla_mixing_flops, prefill_flops
from spikingbrain.cli import main
from spikingbrain.model import SpikingBrainConfig

TINY_ARGS = [
    "--quick",
    "--hidden", "32",
    "--layers", "2",
    "--heads", "4",
    "--kv-heads", "2",
    "--ffn", "48",
    "--vocab", "97",
    "--window", "16",
    "--chunk", "64",
    "--gla-chunk", "16",
    "--lengths", "48,160",
    "--ref-length", "48",
    "--gla-lengths", "32,64",
    "--naive-max-length", "32",
    "--peak-size", "128,128,128",
    "--repeats", "1",
]  # fmt: skip


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_json_and_plot(tmp_path, capsys):
    assert main(["bench", "kernels", *TINY_ARGS, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed or "MISS" in printed
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert (tmp_path / "kernels.png").stat().st_size > 0

    assert data["machine"]["nproc"] >= 1 and data["machine"]["torch_threads"] >= 1
    assert _positive(data["peak"]["gflops"]) and data["peak"]["start"]["shape"] == [128, 128, 128]

    gla = {row["length"]: row for row in data["gla_kernels"]}
    assert sorted(gla) == [32, 64]
    assert all(_positive(row["chunk_s"]) and _positive(row["chunk_gflops"]) for row in gla.values())
    short = gla[32]  # naive and recurrent run up to --naive-max-length only
    assert _positive(short["naive_s"]) and _positive(short["recurrent_s"])
    assert _positive(short["speedup_vs_naive"]) and _positive(short["speedup_vs_recurrent"])
    assert short["max_abs_diff_vs_naive"] < 1e-3  # the kernels agree on the benchmark's inputs
    assert "naive_s" not in gla[64]

    prefill = {row["length"]: row for row in data["prefill"]}
    assert sorted(prefill) == [48, 160]  # 160 > --chunk 64: the streaming path runs
    for row in prefill.values():
        for key in ("seconds", "tokens_per_s", "flops", "gflops", "fraction_of_peak"):
            assert _positive(row[key]), key
        assert row["flops_by_kind"]["total"] == row["flops"]
    assert len(prefill[160]["step_seconds"]) == 3 and all(_positive(t) for t in prefill[160]["step_seconds"])
    assert prefill[48]["step_spread"] is None  # one step: nothing to compare
    # The reference length is measured again after the longest one; its figures use all runs.
    assert prefill[48]["runs"] == 2 and _positive(prefill[48]["again_median_s"])
    config = SpikingBrainConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16, streaming_chunk_size=64, gla_chunk_size=16,
    )  # fmt: skip
    assert prefill[160]["flops"] == prefill_flops(config, 160)["total"]

    targets = data["targets"]
    assert targets["scaling"]["long_length"] == 160 and targets["scaling"]["ref_length"] == 48
    for target in targets.values():
        assert _positive(target["value"]) and isinstance(target["pass"], bool)
    assert data["settings"]["window"] == 16 and data["settings"]["streaming_chunk_size"] == 64


def _tiny_config(**overrides) -> SpikingBrainConfig:
    fields = dict(
        vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, layer_mixers=["gla", "swa", "full"], sliding_window=2,
        gla_chunk_size=4, gla_gate_rank=2, streaming_chunk_size=100,
    )  # fmt: skip
    fields.update(overrides)
    return SpikingBrainConfig(**fields)


def test_prefill_flops_by_hand():
    """Hidden 8, 2 heads / 1 kv head of dim 4, FFN 12, vocab 10, layers gla/swa/full, 6 tokens."""
    counts = prefill_flops(_tiny_config(), 6, logits_to_keep=1)
    # q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192 weights per layer, 3 layers; 2 FLOPs per weight and token.
    assert counts["attention_projections"] == 2 * 3 * 192 * 6 == 6912
    # GLA gate: 8x2 + 2x4 = 24 weights, one GLA layer.
    assert counts["gla_gate"] == 2 * 24 * 6 == 288
    # SwiGLU: 3 x 8x12 = 288 weights per layer.
    assert counts["mlp"] == 2 * 3 * 288 * 6 == 10368
    assert counts["lm_head"] == 2 * 8 * 10 * 1 == 160  # only the kept position
    # GLA, chunks of 4 and 2 tokens: 10 + 3 causal pairs, 2 heads x 2 x (K + V) = 16 FLOPs each;
    # read-out q S: 2 heads x 6 tokens x 2 K V (= 32); state update k^T v: 1 kv head x 6 x 32.
    assert counts["gla_mixing"] == 2 * 13 * 16 + 2 * 6 * 32 + 1 * 6 * 32 == 992
    # SWA, window 2 (3 keys): positions 0..5 attend 1, 2, 3, 3, 3, 3 keys; 4 H D = 32 per key.
    assert counts["swa_attention"] == 32 * 15 == 480
    # Full attention: 1 + 2 + ... + 6 = 21 keys.
    assert counts["full_attention"] == 32 * 21 == 672
    assert counts["total"] == 6912 + 288 + 10368 + 160 + 992 + 480 + 672 == 19872


def test_prefill_flops_options():
    base = prefill_flops(_tiny_config(), 6)
    # Every logit kept: 6 positions of the lm_head.
    assert prefill_flops(_tiny_config(), 6, logits_to_keep=0)["lm_head"] == 6 * 160
    # The release's SDPA window semantics: W keys (here 2): 1, 2, 2, 2, 2, 2 = 11.
    assert prefill_flops(_tiny_config(window_semantics="sdpa"), 6)["swa_attention"] == 32 * 11
    # Streaming in steps of 3: the GLA chunks restart, 2 chunks of 3 tokens -> 6 + 6 pairs.
    streamed = prefill_flops(_tiny_config(streaming_chunk_size=3), 6)
    assert streamed["gla_mixing"] == 2 * 12 * 16 + 2 * 6 * 32 + 6 * 32 == 960
    assert streamed["swa_attention"] == base["swa_attention"]  # the window cache keeps the keys
    assert prefill_flops(_tiny_config(), 6, batch=3)["total"] == 3 * base["total"]
    assert prefill_flops(_tiny_config(), 0)["total"] == 0
    with pytest.raises(ValueError):
        prefill_flops(_tiny_config(), -1)


def test_helpers_closed_forms_match_loops():
    for length in range(0, 40):
        for window in (0, 1, 5, 100):
            assert attended_keys(length, window) == sum(min(p, window) + 1 for p in range(length))
        assert attended_keys(length, None) == sum(p + 1 for p in range(length))
    # chunked pairs against a direct count over chunks of 5
    length, chunk = 23, 5
    pairs = sum(c * (c + 1) // 2 for c in [5, 5, 5, 5, 3])
    assert gla_mixing_flops(length, 2, 1, 4, 3, chunk) == 2 * pairs * 2 * 7 + 2 * length * 24 + length * 24
