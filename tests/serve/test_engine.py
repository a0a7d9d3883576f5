"""Sampling against hand-computed distributions, text streaming with stop strings, generation against ``generate()``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikingbrain.serve.engine import SamplingParams, TextStream, sample_token

from .conftest import make_tiny


def frequencies(logits, params, n=6000, seed=0, seen=None):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(logits))
    for _ in range(n):
        counts[sample_token(torch.tensor(logits), params, gen, seen)] += 1
    return (counts / n).tolist()


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_greedy_and_penalty_hand_computed():
    logits = torch.tensor([2.0, 1.5, -1.0, 0.3])
    gen = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams(temperature=0), gen) == 0
    # penalty 2 on token 0: 2.0 / 2 = 1.0 < 1.5, so token 1 wins; negative logits are multiplied.
    seen = torch.tensor([True, False, True, False])
    assert sample_token(logits, SamplingParams(temperature=0, repetition_penalty=2.0), gen, seen) == 1
    assert sample_token(torch.tensor([-1.0, -1.5]), SamplingParams(temperature=0, repetition_penalty=2.0), gen, torch.tensor([True, False])) == 1


@pytest.mark.parametrize(
    "params,expected",
    [
        # temperature 2: softmax(logits / 2)
        (SamplingParams(temperature=2.0), softmax([1.0, 0.5, 0.0, -0.5])),
        # top-k 2: the two largest, renormalised
        (SamplingParams(temperature=1.0, top_k=2), softmax([2.0, 1.0]) + [0.0, 0.0]),
        # probabilities .6439 .2369 .0871 .0321: top-p 0.8 keeps the first two (0.6439 < 0.8 <= 0.8808)
        (SamplingParams(temperature=1.0, top_p=0.8), softmax([2.0, 1.0]) + [0.0, 0.0]),
        # top-p 0.5: the most likely token alone already has the mass
        (SamplingParams(temperature=1.0, top_p=0.5), [1.0, 0.0, 0.0, 0.0]),
    ],
    ids=["temperature", "top-k", "top-p", "top-p-single"],
)
def test_sampling_frequencies_match_hand_computed(params, expected):
    observed = frequencies([2.0, 1.0, 0.0, -1.0], params)
    assert observed == pytest.approx(expected, abs=0.025)


def test_seeded_sampling_repeats():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [[sample_token(logits, params, g) for _ in range(20)] for g in (params.generator(), params.generator())]
    assert draws[0] == draws[1]
    other = SamplingParams(temperature=1.0, seed=8).generator()
    assert [sample_token(logits, params, other) for _ in range(20)] != draws[0]


def test_sampling_problems_name_the_field():
    bad = SamplingParams(temperature=-1, top_p=0, top_k=-2, repetition_penalty=0, max_tokens=0, stop=("",), seed=2**64)
    assert {name for name, _ in bad.problems()} == {"temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "stop", "seed"}
    assert SamplingParams().problems() == []


def test_text_stream_stop_string_across_tokens(default_tokenizer):
    text = "Hello world, this is the end. More text follows"
    ids = default_tokenizer(text, add_special_tokens=False).input_ids
    stream = TextStream(default_tokenizer, stop=("the end", "zzz"))
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(pieces) == "Hello world, this is "
    # 'the' alone was held back until the stop string was certain: no emitted piece ever contains it
    assert not any("the" in p for p in pieces)


def test_text_stream_holds_partial_characters(default_tokenizer):
    text = "snow ☃ and 🐍 done"
    ids = default_tokenizer(text, add_special_tokens=False).input_ids
    stream = TextStream(default_tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(text.split())  # the emoji really spans several byte tokens


@pytest.mark.parametrize("mixers", [("gla", "swa", "full"), ("parallel-swa", "gla")])
def test_greedy_generation_equals_transformers_generate(mixers, default_tokenizer):
    from spikingbrain.serve.engine import Engine

    model = make_tiny(mixers, seed=1)
    engine = Engine(model, default_tokenizer, "tiny", chunk_size=16)
    prompt = default_tokenizer("Once upon a time, in a small village by the sea, there lived an old fisherman named", add_special_tokens=False).input_ids
    assert len(prompt) > 16  # prefill runs in several chunks
    generation = engine.start(prompt, SamplingParams(temperature=0, max_tokens=12))
    pieces = list(generation.run())
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=2)
    expected_ids = expected[0, len(prompt) :].tolist()
    assert generation.completion_ids == expected_ids
    assert generation.finish_reason == "length"
    assert "".join(pieces) == default_tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert generation.cache.seen_tokens == len(prompt) + 11  # the last token is sampled, not fed


def test_eos_and_max_tokens_finish_reasons(tiny_engine):
    prompt = tiny_engine.encode_text("The weather today is")
    free = tiny_engine.start(prompt, SamplingParams(temperature=0, max_tokens=8))
    list(free.run())
    first = free.completion_ids[0]
    # the same run with its first token declared end-of-sequence stops at once, with nothing emitted
    tiny_engine.eos_ids.add(first)
    try:
        stopped = tiny_engine.start(prompt, SamplingParams(temperature=0, max_tokens=8))
        assert list(stopped.run()) == [] and stopped.finish_reason == "stop" and stopped.completion_ids == []
    finally:
        tiny_engine.eos_ids.discard(first)


def test_chunks_end_on_absolute_multiples(tiny_engine):
    assert tiny_engine.chunk_ends(0, 40) == [16, 32, 40]
    assert tiny_engine.chunk_ends(20, 40) == [32, 40]
    assert tiny_engine.chunk_ends(32, 33) == [33]


@settings(max_examples=300, deadline=None)
@given(text=st.text("ab\u00e9", max_size=12), pattern=st.text("ab\u00e9", min_size=1, max_size=8))
def test_held_stop_prefix_equals_brute_force(text, pattern):
    from spikingbrain.serve.engine import _border_table, _prefix_ending

    expected = max((n for n in range(1, len(pattern)) if text.endswith(pattern[:n])), default=0)
    assert _prefix_ending(text, pattern, _border_table(pattern)) == expected


@pytest.mark.parametrize("scale", [1.0, 12.0], ids=["flat: full sort", "peaked: among the candidates"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_keeps_the_nucleus_a_full_sort_finds(scale, top_p):
    import numpy as np

    from spikingbrain.serve.engine import NUCLEUS_CANDIDATES, _nucleus

    logits = torch.randn(49152, generator=torch.Generator().manual_seed(int(scale * 10)), dtype=torch.float64) * scale
    probs = np.exp(logits.numpy() - logits.numpy().max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
    expected = np.zeros(len(probs), dtype=bool)
    expected[order[(before < top_p) | (np.arange(len(order)) == 0)]] = True
    kept = torch.isfinite(_nucleus(logits, top_p)).numpy()
    assert (kept == expected).all()
    assert (expected.sum() > NUCLEUS_CANDIDATES) == (scale == 1.0), "both ways of finding the nucleus are exercised"
