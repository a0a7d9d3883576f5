"""Sequence-parallel prefill on real gloo process groups equals the single-process forward.

Reference: the same model's ordinary forward over the whole prompt in this process (last
position's logits and every cache tensor), and the hand-counted bytes of each exchange.
One group of 4 processes checks 4 ranks and, in a sub-group, 2 ranks; the CLI test starts 2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from reference_impl import assert_close, randomize_
from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM
from spikingbrain.cli import main
from spikingbrain.distributed.comm import DistributedError, free_port, launch
from spikingbrain.distributed.prefill import cache_tensors, sequence_parallel_prefill, split_lengths
from spikingbrain.model.checkpoint import TOKENIZER_FILES

TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
    sliding_window=6, gla_chunk_size=16, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096,
)
#: name -> (layer mixers, config overrides)
MODELS = {
    "7b": (["gla", "swa", "gla", "swa"], {}),
    "mixed": (["gla", "swa", "full", "parallel-swa", "parallel-full"], {"num_sink_tokens": 2}),
    "separate": (["parallel-swa", "parallel-full", "gla"], {"parallel_shared_projections": False, "gla_gate": "key_tied", "gla_feature_map": "sigmoid"}),
}
#: (model, prompt length, piece lengths or None for an even split, ranks)
CASES = [
    ("7b", 50, None, 2), ("mixed", 37, [30, 7], 2), ("separate", 23, [3, 20], 2),
    ("7b", 61, [5, 2, 40, 14], 4), ("mixed", 45, None, 4), ("separate", 40, [17, 1, 3, 19], 4), ("mixed", 9, [1, 1, 1, 6], 4),
]


def build(name: str) -> SpikingBrainForCausalLM:
    mixers, extra = MODELS[name]
    config = SpikingBrainConfig(num_hidden_layers=len(mixers), layer_mixers=mixers, **TINY, **extra)
    return randomize_(SpikingBrainForCausalLM(config), seed=3).eval()


def prompt(length: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))


def _cases_worker(rank: int, world: int, folder: str) -> dict:
    """Every case on the ranks it needs (2-rank cases on a sub-group of ranks 0 and 1); results written by the last rank."""
    pair = dist.new_group([0, 1])
    traffic = {}
    for index, (name, length, lengths, ranks) in enumerate(CASES + [("7b", 40, None, 4), ("7b", 400, None, 4)]):
        if rank >= ranks:
            continue
        result = sequence_parallel_prefill(build(name), prompt(length), lengths, group=pair if ranks == 2 else None)
        traffic[index] = result.traffic.by_kind
        if result.logits is not None:
            save_file({"logits": result.logits[:, -1], **cache_tensors(result.cache)}, f"{folder}/case{index}.safetensors",
                      metadata={"seen": str(result.cache.seen_tokens)})
    return traffic


def reference(name: str, length: int) -> dict[str, torch.Tensor]:
    model = build(name)
    cache = model.new_cache()
    with torch.no_grad():
        logits = model(prompt(length), cache=cache, use_cache=True).logits
    return {"logits": logits[:, -1], **cache_tensors(cache)}


def test_split_lengths():
    assert split_lengths(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="cannot split 3 tokens into 4"):
        split_lengths(3, 4)


def test_sequence_parallel_prefill_equals_single_process(tmp_path):
    traffic = launch(_cases_worker, 4, (str(tmp_path),), timeout_s=60)
    for index, (name, length, lengths, ranks) in enumerate(CASES):
        got = load_file(str(tmp_path / f"case{index}.safetensors"))
        want = reference(name, length)
        assert sorted(got) == sorted(want), (index, sorted(got), sorted(want))
        for key in want:
            assert_close(got[key], want[key], rel=1e-5, what=f"case {index} ({name}, {lengths or ranks}) {key}")
    # communication per rank of the 7B-style model (2 GLA and 2 SWA layers, Hkv=2, D=8, W=6), counted by hand
    state_pair = 2 * 8 * 8 * 4 + 2 * 8 * 4  # fp32 state [Hkv, K, V] and total decay [Hkv, K]
    tail = 2 * 6 * 2 * 8 * 4  # W rotated keys and values [W, Hkv, D]
    for rank in range(4):
        expected = {"gla-states": 2 * 3 * state_pair, **({"swa-tail": 2 * tail} if rank < 3 else {})}
        assert traffic[rank][len(CASES)] == expected  # 40 tokens
        assert traffic[rank][len(CASES) + 1] == expected  # 400 tokens: the same bytes


@pytest.mark.parametrize("start", ["nproc", "torchrun"])
def test_cli_prefill_two_processes(tmp_path, default_folder, capsys, start):
    """``spikingbrain prefill --nproc 2`` and under ``torchrun``: the file's logits and cache equal the
    single-process forward of the same text."""
    mixers = ["gla", "swa", "full", "parallel-swa"]
    config = SpikingBrainConfig(num_hidden_layers=4, layer_mixers=mixers, **{**TINY, "vocab_size": 49152}, num_sink_tokens=1)
    model = randomize_(SpikingBrainForCausalLM(config), seed=4).eval()
    model.save_pretrained(tmp_path / "model")
    for name in TOKENIZER_FILES:
        if (default_folder / name).is_file():
            shutil.copy2(default_folder / name, tmp_path / "model" / name)
    text = tmp_path / "prompt.txt"
    text.write_text("Sequence parallelism splits one long prompt into contiguous pieces, one per process. " * 3)
    out = tmp_path / "out" / "prefill.safetensors"
    args = ["prefill", "--model", str(tmp_path / "model"), "--text", str(text), "--out", str(out), "--json", "--timeout", "60"]
    if start == "nproc":
        assert main([*args, "--nproc", "2"]) == 0
        report = json.loads(capsys.readouterr().out)
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
        done = subprocess.run([*torchrun, "-m", "spikingbrain.cli", *args], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)  # printed once, by the last rank
    from spikingbrain.model.loading import load_model, load_tokenizer

    ids = load_tokenizer(tmp_path / "model")(text.read_text(), return_tensors="pt").input_ids
    assert report["tokens"] == ids.shape[1] and [r["tokens"] for r in report["per_rank"]] == split_lengths(ids.shape[1], 2)
    assert report["per_rank"][0]["bytes_sent"] > 0 and set(report["per_rank"][0]["bytes_by_kind"]) == {"gla-states", "swa-tail", "full-kv"}
    reference_model = load_model(tmp_path / "model")
    cache = reference_model.new_cache()
    with torch.no_grad():
        logits = reference_model(ids, cache=cache, use_cache=True).logits
    got = load_file(str(out))
    want = {"logits": logits[:, -1], **cache_tensors(cache)}
    assert sorted(got) == sorted(want)
    for key in want:
        assert_close(got[key], want[key], rel=1e-5, what=key)


def _dying_worker(rank: int, world: int, how: str) -> None:
    """Rank 1 dies (or stalls) before the prefill; rank 0 starts it and meets the failure in a collective."""
    if rank == 1:
        if how == "dies":
            import os

            os._exit(3)
        import time

        time.sleep(5)  # longer than the 2 s collective timeout
    sequence_parallel_prefill(build("7b"), prompt(20))


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_failed_rank_ends_the_job_with_an_error_naming_every_rank(how):
    with pytest.raises(DistributedError) as caught:
        launch(_dying_worker, 2, (how,), timeout_s=2)
    message = str(caught.value)
    assert "distributed job of 2 processes failed" in message
    assert "rank 0: " in message and "another rank stopped or stalled" in message
    if how == "dies":
        assert "rank 1: ended without reporting (exit code 3" in message
    else:
        assert "rank 1: " in message and "rank 1: finished" not in message
