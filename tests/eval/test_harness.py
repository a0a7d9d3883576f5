"""``spikingbrain eval harness``: lm-eval's HFLM on our model object, the shipped local tasks against a direct computation."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from spikingbrain.eval.harness import TASK_NAMES, local_task_config, run_harness


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random GLA + SWA model with the real tokenizer's vocabulary."""
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    torch.manual_seed(0)
    config = SpikingBrainConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, gla_chunk_size=16, layer_mixers=["gla", "swa"], max_position_embeddings=2048,
    )
    return SpikingBrainForCausalLM(config).eval()


def _docs(name: str, n: int) -> list[dict]:
    path = local_task_config(name)["dataset_kwargs"]["data_files"]["test"]
    with open(path) as handle:
        return [json.loads(line) for line in handle][:n]


def _logprob_sum(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one full forward, fp64 log-softmax."""
    ids = torch.tensor([context + continuation])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids, use_cache=False).logits[0].double(), -1)
    start = len(context)
    return sum(float(logp[start + i - 1, t]) for i, t in enumerate(continuation))


def test_shipped_task_files_resolve():
    for name in TASK_NAMES:
        config = local_task_config(name)
        assert config["task"] == name
        assert all(open(path).readline().startswith("{") for path in config["dataset_kwargs"]["data_files"].values())
    with pytest.raises(ValueError, match="not a shipped task"):
        local_task_config("wikitext")


@pytest.mark.real_model
def test_rolling_task_equals_direct_log_likelihood(tiny_lm, default_tokenizer):
    out = run_harness(tiny_lm, default_tokenizer, ["spikingbrain_prose_rolling"], limit=3)
    metrics = out["results"]["spikingbrain_prose_rolling"]
    prefix = out["settings"]["prefix_token_id"]
    assert prefix == (default_tokenizer.bos_token_id if default_tokenizer.bos_token_id is not None else default_tokenizer.eos_token_id)
    total, words, nbytes = 0.0, 0, 0
    for doc in _docs("spikingbrain_prose_rolling", 3):
        ids = default_tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
        total += _logprob_sum(tiny_lm, [prefix], ids)
        words += len(re.split(r"\s+", doc["text"]))
        nbytes += len(doc["text"].encode("utf-8"))
    assert out["n_samples"]["spikingbrain_prose_rolling"]["effective"] == 3
    assert metrics["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert metrics["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)


@pytest.mark.real_model
def test_multiple_choice_task_equals_direct_scoring(tiny_lm, default_tokenizer):
    n = 4
    out = run_harness(tiny_lm, default_tokenizer, ["spikingbrain_facts_mc"], limit=n)
    correct = 0
    for doc in _docs("spikingbrain_facts_mc", n):
        context = f"Question: {doc['question']}\nAnswer:"
        ctx = default_tokenizer(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = default_tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            scores.append(_logprob_sum(tiny_lm, ctx, whole[len(ctx):]))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert out["results"]["spikingbrain_facts_mc"]["acc,none"] == pytest.approx(correct / n)
