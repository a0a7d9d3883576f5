"""Batched decode steps over per-row caches against one-row runs, for every kind of layer cache."""

from __future__ import annotations

import copy

import pytest
import torch

ARCHITECTURES = {
    "gla-swa-sinks": (["gla", "swa", "gla", "swa"], dict(num_sink_tokens=2, keep_first_tokens=2)),
    "parallel-hybrid": (["parallel-swa", "parallel-full", "gla"], dict(num_sink_tokens=3)),
    "full-attention": (["full", "full"], {}),
    "moe": (["gla", "swa"], dict(dense_ffn_layers=[0], num_experts=4, num_experts_per_tok=2)),
}

#: Prompt lengths of the rows: shorter and longer than the window (5) and the kept first tokens.
LENGTHS = (1, 3, 9, 14)


def prefilled(model, seed: int = 0, lengths=LENGTHS):
    """A cache per row, each filled by a one-row forward of its own random prompt."""
    gen = torch.Generator().manual_seed(seed)
    caches = []
    for n in lengths:
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.randint(3, 97, (1, n), generator=gen), cache=cache, use_cache=True)
        caches.append(cache)
    return caches


def cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in layer.tensors().values()]


@pytest.mark.parametrize("packed", [False, True], ids=["linear", "packed"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_rows_continue_like_separate_one_row_runs(tiny_model, name, packed):
    layers, overrides = ARCHITECTURES[name]
    model = tiny_model(layers, **overrides)
    batched, alone = prefilled(model), prefilled(model)
    tokens = torch.randint(3, 97, (6, len(LENGTHS)), generator=torch.Generator().manual_seed(1))
    for step in tokens:
        logits = model.decode_rows(torch.cat((step, torch.zeros(4, dtype=torch.long))).view(-1, 1), batched + [None] * 4, packed=packed)
        for row, cache in enumerate(alone):
            with torch.no_grad():
                expected = model(step[row].view(1, 1), cache=cache, use_cache=True).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(batched, alone):
        assert got.seen_tokens == want.seen_tokens
        for a, b in zip(cache_tensors(got), cache_tensors(want), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["linear", "packed"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_a_row_does_not_depend_on_its_neighbours_or_its_place(tiny_model, name, packed):
    """Eight rows: the same row with other neighbours, at another index, or with padding only, computes the same bits."""
    layers, overrides = ARCHITECTURES[name]
    model = tiny_model(layers, **overrides)
    caches = prefilled(model)
    others = prefilled(model, seed=5)
    token = torch.tensor([7, 11, 13, 17])
    arrangements = [
        ([0, 1, 2, 3], caches),  # row index -> cache index, in the order given
        ([7, 5, 0, 2], caches),
        ([3, 2, 1, 0], caches),
    ]
    results = []
    for places, source in arrangements:
        rows, ids = [None] * 8, [0] * 8
        for i, place in enumerate(places):
            rows[place], ids[place] = copy.deepcopy(source[i]), int(token[i])
        filler = [p for p in range(8) if rows[p] is None][:2]
        for p, cache in zip(filler, others):  # unrelated neighbours in some of the free rows
            rows[p], ids[p] = copy.deepcopy(cache), 42
        logits = model.decode_rows(torch.tensor(ids).view(-1, 1), rows, packed=packed)
        results.append([logits[p] for p in places])
    alone = []
    for i in range(len(LENGTHS)):
        rows = [copy.deepcopy(caches[i])] + [None] * 7
        alone.append(model.decode_rows(torch.tensor([int(token[i])] + [0] * 7).view(-1, 1), rows, packed=packed)[0])
    for result in results:
        for got, want in zip(result, alone):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_one_row_steps_are_the_plain_forward_bit_for_bit(tiny_model, name):
    layers, overrides = ARCHITECTURES[name]
    model = tiny_model(layers, **overrides)
    rows, plain = prefilled(model), prefilled(model)
    for row, cache in zip(rows, plain):
        with torch.no_grad():
            expected = model(torch.tensor([[9]]), cache=cache, use_cache=True).logits[0, -1]
        assert torch.equal(model.decode_rows(torch.tensor([[9]]), [row])[0], expected)


def test_wrong_shapes_and_overlong_rows_are_refused(tiny_model):
    model = tiny_model(["gla", "swa"], max_sequence_length=4)
    caches = prefilled(model, lengths=(1, 3))
    with pytest.raises(ValueError, match=r"input_ids must be \[rows, 1\]"):
        model.decode_rows(torch.zeros(3, 1, dtype=torch.long), caches)
    model.decode_rows(torch.zeros(2, 1, dtype=torch.long), caches)  # 2 and 4 tokens: at the limit
    with pytest.raises(ValueError, match="max_sequence_length=4"):
        model.decode_rows(torch.zeros(2, 1, dtype=torch.long), caches)
    assert [c.seen_tokens for c in caches] == [2, 4], "a refused step leaves every cache as it was"


def test_packed_linears_route_only_plain_linears_of_that_many_rows():
    from torch import nn

    from spikingbrain.model.packed import PackedLinears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8, bias=False), nn.Linear(8, 4))
    model[2].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    packed = PackedLinears(model, 8)
    x8, x3 = torch.randn(8, 1, 16), torch.randn(3, 16)
    with torch.no_grad():
        dense8, dense3 = model(x8), model(x3)
        with packed.active():
            got8, got3 = model(x8), model(x3)
        assert packed.nbytes() == (16 * 24 + 24 * 8) * 4, "the hooked linear is not packed"
        torch.testing.assert_close(got8, dense8, rtol=1e-5, atol=1e-6)
        assert torch.equal(got3, dense3), "three rows are not a decode step of eight: F.linear as before"
        model[0].weight.mul_(2)  # changed in place: packed again
        with packed.active():
            again = model[0](x8)
        torch.testing.assert_close(again, nn.functional.linear(x8, model[0].weight, model[0].bias), rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(model[0]), "leaving the context restores the modules' own forward"
