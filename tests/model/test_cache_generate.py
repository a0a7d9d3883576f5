"""Inference with a cache: prefill + decode, cache sizes, generate(), padding, streaming prefill, limits.

Every logit is compared with the independent fp64 reference of tests/reference_impl.py
(the whole sequence recomputed without any cache); see test_reference.py for the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reference_impl import assert_close, greedy_reference, int8_rows_rounded, reference_logits, spec_for

TOL = 5e-5
MIXED = ["gla", "swa", "full", "gla"]


def random_ids(B, T, seed=0, vocab=97):
    return torch.randint(1, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def run_in_pieces(model, ids, pieces, grad=False):
    """Feed ``ids`` through one cache in pieces of the given sizes; return the concatenated logits and the cache."""
    assert sum(pieces) == ids.shape[1]
    cache, logits, start = None, [], 0
    with torch.set_grad_enabled(grad):
        for size in pieces:
            out = model(ids[:, start : start + size], cache=cache, use_cache=True)
            cache, start = out.cache, start + size
            logits.append(out.logits.detach())
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize(
    "pieces",
    [[10] + [1] * 30, [3, 1, 9, 2, 17, 1, 7], [40]],
    ids=["prefill-then-tokens", "uneven", "one-piece"],
)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_pieces_through_the_cache_equal_one_shot(tiny_model, pieces, grad):
    model = tiny_model(MIXED)
    ids = random_ids(2, 40)
    logits, cache = run_in_pieces(model, ids, pieces, grad)
    assert cache.seen_tokens == 40
    assert_close(logits, reference_logits(model.state_dict(), spec_for(model.config), ids), TOL, f"pieces {pieces}")


@pytest.mark.parametrize("step", [5, 40], ids=["streamed", "one-shot"])
def test_mask_of_only_the_new_tokens_continues_positions(tiny_model, step):
    """With a cache, an all-ones mask that covers only the new tokens means an unpadded past."""
    model = tiny_model(MIXED)
    model.config.streaming_chunk_size = step
    ids = random_ids(2, 40)
    cache, logits = None, []
    with torch.no_grad():
        for start, size in ((0, 25), (25, 15)):
            piece = ids[:, start : start + size]
            out = model(piece, attention_mask=torch.ones_like(piece), cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits)
    assert_close(torch.cat(logits, 1), reference_logits(model.state_dict(), spec_for(model.config), ids), TOL, "mask of new tokens")


def test_cache_sizes(tiny_model):
    """GLA state and SWA window stop growing once the window is full; a full-attention cache grows linearly."""
    model = tiny_model(MIXED)  # 2 kv heads, head_dim 8, flash window 5 -> 5 cached keys
    B, Hkv, D, W, fp32 = 2, 2, 8, 5, 4
    gla_bytes = B * Hkv * D * D * fp32

    def kv_bytes(n):
        return 2 * B * n * Hkv * D * fp32

    ids = random_ids(B, 60)
    sizes = {}
    _, cache = run_in_pieces(model, ids[:, :3], [3])
    sizes[3] = [layer.nbytes() for layer in cache.layers]
    for start, end in ((3, 25), (25, 60)):
        with torch.no_grad():
            model(ids[:, start:end], cache=cache, use_cache=True)
        sizes[end] = [layer.nbytes() for layer in cache.layers]
        assert cache.nbytes() == sum(sizes[end])
    assert sizes[3] == [gla_bytes, kv_bytes(3), kv_bytes(3), gla_bytes]  # window not yet full
    assert sizes[25] == [gla_bytes, kv_bytes(W), kv_bytes(25), gla_bytes]
    assert sizes[60] == [gla_bytes, kv_bytes(W), kv_bytes(60), gla_bytes]
    assert cache.layers[0].state.dtype == torch.float32


@pytest.mark.parametrize("prompt_length", [7, 1, 0])
@pytest.mark.parametrize("keep_first,sinks", [(0, 0), (2, 3)])
def test_window_ring_buffer_holds_the_ordered_window(keep_first, sinks, prompt_length):
    """One-token steps through the step buffer keep the same window as the copying path, key for key, while it
    fills (from a prompt shorter than the window, or none) and once it is a ring, and attention over the ring's
    (unordered) keys is attention over the ordered ones. The buffer is allocated once."""
    from spikingbrain.model.cache import WindowKV
    from spikingbrain.ops import sliding_window_attention

    gen = torch.Generator().manual_seed(3)
    window, B, H, D = 4, 2, 2, 8
    ring, copying = WindowKV(window, keep_first), WindowKV(window, keep_first)
    if sinks:
        sink = (torch.randn(1, sinks, H, D, generator=gen), torch.randn(1, sinks, H, D, generator=gen))
        ring.set_sinks(*sink)
        copying.set_sinks(*sink)
    if prompt_length:
        prompt = (torch.randn(B, prompt_length, H, D, generator=gen), torch.randn(B, prompt_length, H, D, generator=gen))
        ring.extend(*prompt)
        copying.extend(*prompt)
    buffers = set()
    for step in range(13 + keep_first + window):  # the ring (window + 1 = 5 slots) goes round more than twice
        k, v, q = (torch.randn(B, 1, H, D, generator=gen) for _ in range(3))
        got = ring.extend(k, v, ring=True)
        buffers.add(ring._ring[0].data_ptr())
        expected = copying.extend(k, v)
        assert ring.length == copying.length, step
        assert torch.equal(ring.keys, copying.keys) and torch.equal(ring.values, copying.values), step
        out = sliding_window_attention(q, *got, window, num_sinks=sinks, keep_first=keep_first)
        reference = sliding_window_attention(q, *expected, window, num_sinks=sinks, keep_first=keep_first)
        torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    assert ring._ring is not None and ring.length == copying.length == keep_first + window and len(buffers) == 1
    # the buffer: sinks, first tokens and window + 1 slots
    assert ring.nbytes() == 2 * B * (sinks + keep_first + window + 1) * H * D * 4
    # a longer step reads the ring back in order and copies again
    k, v = torch.randn(B, 3, H, D, generator=gen), torch.randn(B, 3, H, D, generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(ring.extend(k, v, ring=True), copying.extend(k, v)))
    assert ring._ring is None and torch.equal(ring.keys, copying.keys)


def test_the_step_buffer_doubles_as_a_long_window_fills():
    """From an empty cache, a window of 300 filled one step at a time equals the copying path at every step,
    with O(log) allocations: 64 slots first, doubling, then the whole window as a ring."""
    from spikingbrain.model.cache import MIN_STEP_SLOTS, WindowKV

    gen = torch.Generator().manual_seed(5)
    window, keep_first, H, D = 300, 8, 1, 4
    ring, copying = WindowKV(window, keep_first), WindowKV(window, keep_first)
    sizes = []
    for step in range(window + keep_first + 40):
        k, v = torch.randn(1, 1, H, D, generator=gen), torch.randn(1, 1, H, D, generator=gen)
        got, expected = ring.extend(k, v, ring=True), copying.extend(k, v)
        if ring._ring[0].shape[1] not in sizes:
            sizes.append(ring._ring[0].shape[1])
        if step < window + keep_first:  # still filling: the returned keys are in order
            assert torch.equal(got[0], expected[0]), step
        assert torch.equal(ring.keys, copying.keys) and torch.equal(ring.values, copying.values), step
    assert sizes == [MIN_STEP_SLOTS, 128, 256, window + keep_first + 1]


def test_step_buffers_store_each_heads_keys_contiguously():
    """Decode steps hand attention keys whose positions are contiguous per head (SDPA reads them without a copy),
    and the values they return equal the copying path's."""
    from spikingbrain.model.cache import FullKV, WindowKV

    gen = torch.Generator().manual_seed(6)
    window, ring, full, copying = 5, WindowKV(5), FullKV(), WindowKV(5)
    for step in range(9):
        k, v = torch.randn(2, 1, 3, 4, generator=gen), torch.randn(2, 1, 3, 4, generator=gen)
        for keys, values in (ring.extend(k, v, ring=True), full.extend(k, v)):
            for t in (keys, values):
                assert t.stride(1) == t.shape[3] and t.stride(3) == 1, (step, t.stride())
        copying.extend(k, v)
        assert torch.equal(ring.keys, copying.keys) and torch.equal(ring.values, copying.values), step
    assert ring.length == window and full.length == 9


def test_sdpa_window_caches_one_key_less(tiny_model):
    model = tiny_model(["swa"], window_semantics="sdpa")  # 5 keys including the query: 4 cached
    _, cache = run_in_pieces(model, random_ids(1, 30), [30])
    assert cache.nbytes() == 2 * 4 * 2 * 8 * 4


def test_generate_greedy_equals_reference_loop(tiny_model, record_chunks):
    model = tiny_model(MIXED)
    prompt = random_ids(1, 9, seed=1)
    lengths = record_chunks(model)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert lengths == [9] + [1] * 11  # one prefill, then one token per step through the cache
    expected = greedy_reference(model.state_dict(), spec_for(model.config), prompt, 12)
    assert out.tolist() == expected.tolist()
    top1 = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=1)
    assert top1.tolist() == expected.tolist()


def test_sampling_equals_hand_written_sampling_loop(tiny_model):
    """Same seed, same draws: temperature, top-k filter, softmax, one multinomial draw per step."""
    model = tiny_model(MIXED)
    spec, state = spec_for(model.config), model.state_dict()
    prompt = random_ids(1, 9, seed=2)
    torch.manual_seed(1234)
    out = model.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=10)
    torch.manual_seed(1234)
    ids = prompt
    for _ in range(10):
        scores = reference_logits(state, spec, ids)[:, -1].float() / 0.8
        kth = scores.topk(10).values[:, -1:]
        probs = torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)
        ids = torch.cat((ids, torch.multinomial(probs, num_samples=1)), dim=1)
    assert out.tolist() == ids.tolist()


def test_left_padded_batch_equals_each_sequence_alone(tiny_model):
    model = tiny_model(MIXED)
    spec, state = spec_for(model.config), model.state_dict()
    short, long = random_ids(1, 6, seed=3), random_ids(1, 13, seed=4)
    pad = model.config.pad_token_id
    batch = torch.full((2, 13), pad)
    batch[0, 7:], batch[1] = short[0], long[0]
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :7] = 0
    # Forward without cache: every real position matches its sequence alone.
    logits = model(batch, attention_mask=mask, use_cache=False).logits
    assert_close(logits[0, 7:], reference_logits(state, spec, short)[0], TOL, "padded row")
    assert_close(logits[1], reference_logits(state, spec, long)[0], TOL, "full row")
    # Generation: the same new tokens as each prompt alone.
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert out[0, 13:].tolist() == greedy_reference(state, spec, short, 8)[0, 6:].tolist()
    assert out[1, 13:].tolist() == greedy_reference(state, spec, long, 8)[0, 13:].tolist()


def test_generate_after_streaming_prefill_of_padded_batch(tiny_model):
    """A left-padded batch whose prompt is longer than streaming_chunk_size: prefill streams, then decodes."""
    model = tiny_model(MIXED, streaming_chunk_size=4)
    spec, state = spec_for(model.config), model.state_dict()
    short, long = random_ids(1, 7, seed=8), random_ids(1, 18, seed=9)
    batch = torch.cat((torch.cat((torch.zeros(1, 11, dtype=torch.long), short), dim=1), long))
    mask = (torch.arange(18) >= torch.tensor([[11], [0]])).long()
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
    assert_close(out.logits[0, 11:], reference_logits(state, spec, short)[0], TOL, "streamed padded row")
    assert_close(out.logits[1], reference_logits(state, spec, long)[0], TOL, "streamed full row")
    gen = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert gen[0, 18:].tolist() == greedy_reference(state, spec, short, 6)[0, 7:].tolist()
    assert gen[1, 18:].tolist() == greedy_reference(state, spec, long, 6)[0, 18:].tolist()


def test_reordered_cache_follows_its_sequences(tiny_model):
    """Beam search reorders the batch of a cache: every layer's state must move with its sequence."""
    model = tiny_model(MIXED)
    ids = random_ids(3, 20, seed=10)
    _, cache = run_in_pieces(model, ids[:, :15], [15])
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    with torch.no_grad():
        logits = model(ids[order, 15:], cache=cache).logits
    expected = reference_logits(model.state_dict(), spec_for(model.config), ids[order])[:, 15:]
    assert_close(logits, expected, TOL, "reordered cache")


def test_one_key_window_decodes(tiny_model):
    """sdpa semantics with sliding_window=1: each query sees itself only, and the window cache stays empty."""
    model = tiny_model(["swa", "gla"], window_semantics="sdpa", sliding_window=1)
    ids = random_ids(1, 12, seed=11)
    logits, cache = run_in_pieces(model, ids, [5, 1, 1, 5])
    assert cache.layers[0].nbytes() == 0
    assert_close(logits, reference_logits(model.state_dict(), spec_for(model.config), ids), TOL, "window of one key")


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_logits_to_keep_is_the_last_row(tiny_model, grad):
    model = tiny_model(MIXED)
    ids = random_ids(2, 25)
    with torch.set_grad_enabled(grad):
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    expected = reference_logits(model.state_dict(), spec_for(model.config), ids)[:, -1:]
    assert_close(last, expected, TOL, "logits_to_keep=1")


def test_streaming_prefill_long_prompt(tiny_model, record_chunks):
    model = tiny_model(MIXED, streaming_chunk_size=16, sliding_window=12, gla_chunk_size=32)
    ids = random_ids(1, 300, seed=5)
    calls = record_chunks(model)
    with torch.no_grad():
        out = model(ids)
    assert calls == [16] * 18 + [12]  # really streamed, in chunks of streaming_chunk_size
    assert out.cache.seen_tokens == 300
    expected = reference_logits(model.state_dict(), spec_for(model.config), ids)
    assert_close(out.logits, expected, TOL, "streaming prefill")
    # The cache it leaves continues exactly like a one-shot forward would.
    nxt = random_ids(1, 3, seed=6)
    with torch.no_grad():
        more = model(nxt, cache=out.cache).logits
    full = reference_logits(model.state_dict(), spec_for(model.config), torch.cat((ids, nxt), dim=1))
    assert_close(more, full[:, -3:], TOL, "decode after streaming")


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_streaming_prefill_memory_is_constant(tiny_model):
    """20k tokens, no full layers: the same cache bytes and the same largest tensor as after 2k tokens."""
    model = tiny_model(["gla", "swa"], streaming_chunk_size=1024, sliding_window=64)
    ids = random_ids(1, 20480, seed=7)
    results = {}
    for length in (2048, 20480):
        with torch.no_grad(), LargestTensor() as probe:
            out = model(ids[:, :length], logits_to_keep=1)
        assert out.logits.shape == (1, 1, 97)
        assert torch.isfinite(out.logits).all()
        results[length] = (out.cache.nbytes(), probe.largest)
    assert results[20480] == results[2048]
    gla, swa = 2 * 8 * 8 * 4, 2 * 64 * 2 * 8 * 4
    assert results[20480][0] == gla + swa
    assert results[20480][1] < 20480 * 32  # nothing as large as one hidden state per token


def test_max_sequence_length_is_enforced(tiny_model):
    model = tiny_model(MIXED, max_sequence_length=20)
    ids = random_ids(1, 21)
    with pytest.raises(ValueError, match="max_sequence_length"):
        model(ids)
    with torch.no_grad():
        cache = model(ids[:, :15]).cache
        with pytest.raises(ValueError, match="max_sequence_length"):
            model(ids[:, 15:], cache=cache)
    assert model(ids[:, :20], use_cache=False).logits.shape == (1, 20, 97)


def rounded_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a step buffer of ``dtype`` stores it: fp16, or int8 codes of scale max|row| / 127 per position and head."""
    return x.half().float() if dtype == torch.float16 else int8_rows_rounded(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("keep_first,sinks", [(0, 0), (2, 3)])
def test_low_precision_step_buffer_holds_the_window_rounded_once(keep_first, sinks, dtype):
    """A window cache whose step buffer is fp16 or int8 holds what the fp32 one holds, each key rounded once (read
    back as fp32), while it fills and as a ring; attention over its ring is attention over those rounded keys; it
    takes low the bytes (fp16), or a quarter plus a scale per position and head (int8)."""
    from spikingbrain.model.cache import WindowKV
    from spikingbrain.ops import sliding_window_attention

    gen = torch.Generator().manual_seed(8)
    window, B, H, D = 6, 2, 2, 16
    low, full = WindowKV(window, keep_first, dtype), WindowKV(window, keep_first)
    if sinks:
        sink = (torch.randn(1, sinks, H, D, generator=gen), torch.randn(1, sinks, H, D, generator=gen))
        low.set_sinks(*sink)
        full.set_sinks(*sink)
    prompt = (torch.randn(B, 4, H, D, generator=gen), torch.randn(B, 4, H, D, generator=gen))
    low.extend(*prompt)
    full.extend(*prompt)
    for step in range(20):
        k, v, q = (torch.randn(B, 1, H, D, generator=gen) for _ in range(3))
        got, expected = low.extend(k, v, ring=True), full.extend(k, v, ring=True)
        assert got[0].dtype == dtype
        assert low.keys.dtype == torch.float32
        for stored, exact in ((low.keys, full.keys), (low.values, full.values)):
            torch.testing.assert_close(stored, rounded_once(exact, dtype), rtol=1e-6, atol=1e-7)
        out = sliding_window_attention(q, *got, window, num_sinks=sinks, keep_first=keep_first)
        rounded = [rounded_once(t, dtype) for t in expected]
        reference = sliding_window_attention(q, *rounded, window, num_sinks=sinks, keep_first=keep_first)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    rows = 2 * B * (sinks + keep_first + window + 1) * H
    assert low.nbytes() == (rows * D * 2 if dtype == torch.float16 else rows * (D + 4))


@pytest.mark.parametrize("name,dtype,tolerance", [("float16", torch.float16, 1e-2), ("int8", torch.int8, 5e-2)])
def test_window_kv_dtype_decodes_like_fp32(tiny_model, name, dtype, tolerance):
    """A model with ``window_kv_dtype: float16`` or ``int8`` decodes from the same prompt to logits within that
    rounding of the fp32 model's (fp16: the same greedy tokens); the config refuses other dtypes by name."""
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    model = tiny_model(["swa", "gla", "swa", "gla"], sliding_window=8)
    low = SpikingBrainForCausalLM(SpikingBrainConfig.derived_from(model.config, window_kv_dtype=name)).eval()
    low.load_state_dict(model.state_dict())
    ids = random_ids(1, 30, seed=4)
    fp32_logits, _ = run_in_pieces(model, ids, [12] + [1] * 18)
    low_logits, cache = run_in_pieces(low, ids, [12] + [1] * 18)
    assert cache.layers[0]._ring[0].dtype == dtype
    assert torch.equal(low_logits[:, :12], fp32_logits[:, :12])  # the prompt never touches the step buffer
    assert (low_logits - fp32_logits).abs().max() < tolerance * fp32_logits.abs().max()
    if dtype == torch.float16:
        assert torch.equal(low_logits.argmax(-1), fp32_logits.argmax(-1))
    with pytest.raises(ValueError, match="window_kv_dtype='int4'"):
        SpikingBrainConfig.derived_from(model.config, window_kv_dtype="int4")


def test_int8_window_caches_hold_what_int8_kv_attends(tiny_model):
    """W8ASpike's INT8 keys and values (``int8_kv``) with an int8 window ring (``window_kv_dtype: int8``): the ring holds
    the rows as ``int8_kv`` rounds them (the same codes and scales, once), so decoding gives the logits of ``int8_kv``
    over the fp32 ring, up to fp32 rounding, and the same greedy tokens."""
    from spikingbrain import SpikingBrainConfig, SpikingBrainForCausalLM

    model = tiny_model(["swa", "gla", "swa", "gla"], sliding_window=8)
    low = SpikingBrainForCausalLM(SpikingBrainConfig.derived_from(model.config, window_kv_dtype="int8")).eval()
    low.load_state_dict(model.state_dict())
    for m in (model, low):
        for module in m.modules():
            if hasattr(module, "int8_kv"):
                module.int8_kv = True
    ids = random_ids(1, 30, seed=4)
    fp32_logits, _ = run_in_pieces(model, ids, [12] + [1] * 18)
    low_logits, cache = run_in_pieces(low, ids, [12] + [1] * 18)
    assert cache.layers[0]._ring[0].dtype == torch.int8
    assert_close(low_logits, fp32_logits, 1e-5, "int8 ring against int8_kv over the fp32 ring")
    assert torch.equal(low_logits.argmax(-1), fp32_logits.argmax(-1))
