"""`spikingbrain bench train`: the training steps run, are timed side by side, their ratios are consistent, and the
sliced distillation loss equals the full-logits one on the same first batch."""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reference_impl import randomize_
from spikingbrain.cli import main
from spikingbrain.convert.converter import convert_transformer
from spikingbrain.ops.int8 import int8_matmul_available


def test_bench_train_reports_side_by_side(tmp_path, capsys):
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    randomize_(LlamaForCausalLM(config), seed=1).save_pretrained(tmp_path / "teacher")
    convert_transformer(tmp_path / "teacher", tmp_path / "student", sliding_window=8)
    out = tmp_path / "bench"
    args = ["bench", "train", "--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
            "--seq-len", "32", "--batch-size", "2", "--repeats", "2", "--rank", "4", "--threads", "1", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((out / "train.json").read_text())
    results = report["results"]
    int8 = {"spikingbrain_distill_stored_targets_int8"} if int8_matmul_available("cpu") else set()
    assert set(results) == {"transformers_finetune", "spikingbrain_finetune", "spikingbrain_distill_full_logits",
                            "spikingbrain_distill", "spikingbrain_distill_checkpointed", "spikingbrain_distill_stored_targets",
                            "spikingbrain_distill_stored_targets_checkpointed"} | int8
    first = report["first_step_loss"]
    for other in ("spikingbrain_distill_full_logits", "spikingbrain_distill_checkpointed", "spikingbrain_distill_stored_targets",
                  "spikingbrain_distill_stored_targets_checkpointed"):
        assert abs(first[other] - first["spikingbrain_distill"]) < 1e-5 * first["spikingbrain_distill"], other
    # int8 products of the frozen weights: the same loss up to their rounding
    assert not int8 or abs(first["spikingbrain_distill_stored_targets_int8"] - first["spikingbrain_distill"]) < 0.05 * first["spikingbrain_distill"]
    assert report["teacher_targets_fill"]["rows"] == 3 * 2  # (repeats + 1) batches of 2 rows, each computed once
    assert report["distill_speedup_over_full_logits"] == (
        results["spikingbrain_distill"]["tokens_per_second"] / results["spikingbrain_distill_full_logits"]["tokens_per_second"])
    for name, r in results.items():
        assert len(r["seconds"]) == 2 and r["tokens_per_second"] == 64 / r["median_seconds"]
        assert r["peak_rss_bytes"] > 50 * 2**20  # the process holds torch and the models
        assert report["ratios_to_transformers_finetune"][name] == r["tokens_per_second"] / results["transformers_finetune"]["tokens_per_second"]
    assert (out / "train.png").read_bytes()[:4] == b"\x89PNG"
    assert "of transformers' fine-tune" in capsys.readouterr().out
