"""GLA kernels (naive, chunked, recurrent, the C recurrence) against the published recurrence written in
tests/reference_impl.py.

Tolerances. The reference runs in fp64; the kernels compute in fp32. The token loops
(naive, recurrent) only multiply by decays exp(g) <= 1 and add, so every output is a sum
of at most T*K bounded products each carrying a relative rounding error of about
2^-24 ~ 6e-8; with T <= 150 and K = 8 errors of random sign stay near 1e-6 and we allow
2e-5 relative to the output's magnitude (``assert_close`` scales by max(1, max|expected|)). The C recurrence
(``kernel_gla``) does the same operations in fp32, with its sums over K in another order.
The chunked kernel forms each decay between positions j < i of one chunk as
exp(b_i - b_j) from the in-chunk cumulative sums b of g. Both sums carry an absolute
rounding error of about |b| * 2^-24, so a decay factor is off by a relative
2 * |b|max * 2^-24 even when b_i - b_j is small; with g ~ -300 on some steps (the
"mixed" regime) |b| reaches thousands and this term dominates. ``chunk_tol`` adds it,
computed from the actual inputs. A wrong decay, a missing term or an off-by-one at a
chunk boundary produces errors of order one. In fp64 the same reasoning gives ~1e-14
(times |b|); we allow 1e-10.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_impl import assert_close, gla_reference
from spikingbrain.ops import chunk_gla, gla_kernel, kernel_gla, naive_gla, prefill_gla, recurrent_gla
from spikingbrain.ops import gla as gla_module

#: the C recurrence where this machine builds and runs it (AVX-512 and a C compiler)
HAS_KERNEL = gla_module._recurrence_library() is not None
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="no AVX-512 or no C compiler: the GLA kernel is off here")
FP32_KERNELS = [("naive", naive_gla, {}), ("recurrent", recurrent_gla, {})] + ([("kernel", kernel_gla, {})] if HAS_KERNEL else [])

FP32_TOL = 2e-5
FP64_TOL = 1e-10
K, V = 8, 6


def make_inputs(B, T, H, Hkv, decay="moderate", dtype=torch.float32, seed=0, with_state=False):
    """Random q, k, v, log-decay g (and an initial state) with the requested decay regime."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, Hkv, K, generator=gen)
    v = torch.randn(B, T, Hkv, V, generator=gen)
    x = torch.randn(B, T, Hkv, K, generator=gen)
    if decay == "moderate":  # the model's gate: logsigmoid(.) / 16
        g = F.logsigmoid(2 * x) / 16
    elif decay == "strong":  # ~ -20 per step: the state forgets almost everything each token
        g = -20 + x
    elif decay == "mixed":  # channels from ~0 to ~ -300 per step side by side
        g = F.logsigmoid(3 * x) * 30
    else:
        raise AssertionError(decay)
    state = torch.randn(B, Hkv, K, V, generator=gen) if with_state else None
    cast = [t.to(dtype) for t in (q, k, v, g)]
    return (*cast, None if state is None else state.to(dtype))


def chunk_tol(g: torch.Tensor, chunk_size: int, base: float = FP32_TOL) -> float:
    """``base`` plus the rounding of the in-chunk cumulative log decays (see the module docstring)."""
    T = g.shape[1]
    padded = F.pad(g.double(), (0, 0, 0, 0, 0, (-T) % chunk_size))
    chunks = padded.view(g.shape[0], -1, chunk_size, *g.shape[2:])
    b_max = chunks.cumsum(dim=2).abs().max().item() if T else 0.0
    eps = torch.finfo(g.dtype).eps / 2
    return base + 2 * b_max * eps


def tolerance(kernel, g, kwargs, base: float = FP32_TOL) -> float:
    """The tolerance of one kernel call: ``base``, plus the cumulative-sum term for chunk_gla."""
    return chunk_tol(g, kwargs.get("chunk_size", 64), base) if kernel is chunk_gla else base


def check(o, state, ref_o, ref_state, tol, what):
    assert_close(o, ref_o, tol, f"{what} output")
    if ref_state is not None:
        assert state is not None, f"{what}: no final state returned"
        assert_close(state, ref_state, tol, f"{what} final state")


HEADS = [(6, 2), (3, 3)]


@pytest.mark.parametrize("H,Hkv", HEADS, ids=["gqa6x2", "mha3"])
@pytest.mark.parametrize("T", [1, 7, 64, 100])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
def test_all_kernels_match_the_recurrence(H, Hkv, T, with_state):
    q, k, v, g, s0 = make_inputs(2, T, H, Hkv, with_state=with_state, seed=T)
    ref_o, ref_s, _ = gla_reference(q, k, v, g, initial_state=s0)
    for name, kernel, kwargs in FP32_KERNELS + [
        ("chunk16", chunk_gla, {"chunk_size": 16}),
        ("chunk32", chunk_gla, {"chunk_size": 32}),
        ("chunk64", chunk_gla, {"chunk_size": 64}),
    ]:
        o, s = kernel(q, k, v, g, initial_state=s0, output_final_state=True, **kwargs)
        assert o.dtype == torch.float32 and s.dtype == torch.float32
        check(o, s, ref_o, ref_s, tolerance(kernel, g, kwargs), f"{name} T={T}")


@pytest.mark.parametrize("chunk_size,sub_chunk_size", [(32, 4), (32, 8), (32, 32), (48, 16), (8, 8)])
def test_chunk_and_sub_chunk_sizes(chunk_size, sub_chunk_size):
    q, k, v, g, s0 = make_inputs(1, 77, 6, 2, decay="mixed", with_state=True, seed=chunk_size)
    ref_o, ref_s, _ = gla_reference(q, k, v, g, initial_state=s0)
    o, s = chunk_gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=chunk_size, sub_chunk_size=sub_chunk_size)
    check(o, s, ref_o, ref_s, chunk_tol(g, chunk_size), f"chunk {chunk_size}/{sub_chunk_size}")


@pytest.mark.parametrize("decay", ["strong", "mixed"])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_strong_decays_stay_finite_and_exact(decay, chunk_size):
    q, k, v, g, s0 = make_inputs(2, 100, 6, 2, decay=decay, with_state=True, seed=1)
    if decay == "strong":
        assert g.max() < -15  # really ~ -20 per step
    ref_o, ref_s, _ = gla_reference(q, k, v, g, initial_state=s0)
    for name, kernel, kwargs in FP32_KERNELS + [("chunk", chunk_gla, {"chunk_size": chunk_size})]:
        o, s = kernel(q, k, v, g, initial_state=s0, output_final_state=True, **kwargs)
        check(o, s, ref_o, ref_s, tolerance(kernel, g, kwargs), f"{name} {decay}")


def test_output_is_not_trivially_small_under_strong_decay():
    """With g ~ -20 the output is (almost exactly) scale * (q_t . k_t) v_t: the current token only."""
    q, k, v, g, _ = make_inputs(1, 40, 2, 2, decay="strong", seed=3)
    o, _ = chunk_gla(q, k, v, g, chunk_size=16)
    expected = K**-0.5 * (q.double() * k.double()).sum(-1, keepdim=True) * v.double()
    assert_close(o, expected, 1e-5, "current-token-only output")


@pytest.mark.parametrize("t1", [1, 37, 64, 149])
def test_split_with_carried_state_equals_one_call(t1):
    q, k, v, g, s0 = make_inputs(2, 150, 6, 2, decay="mixed", with_state=True, seed=t1)
    ref_o, ref_s, _ = gla_reference(q, k, v, g, initial_state=s0)
    whole, whole_s = chunk_gla(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=32)
    first, mid = chunk_gla(
        q[:, :t1], k[:, :t1], v[:, :t1], g[:, :t1], initial_state=s0, output_final_state=True, chunk_size=32
    )
    second, last = chunk_gla(
        q[:, t1:], k[:, t1:], v[:, t1:], g[:, t1:], initial_state=mid, output_final_state=True, chunk_size=32
    )
    split = torch.cat((first, second), dim=1)
    tol = chunk_tol(g, 32)
    check(split, last, ref_o, ref_s, tol, f"split at {t1}")
    check(whole, whole_s, ref_o, ref_s, tol, "one call")
    assert_close(split, whole, 2 * tol, "split vs one call")


@pytest.mark.parametrize("decay", ["moderate", "strong", "mixed"])
def test_fp64_inputs_give_fp64_accuracy(decay):
    q, k, v, g, s0 = make_inputs(2, 90, 6, 2, decay=decay, dtype=torch.float64, with_state=True, seed=5)
    ref_o, ref_s, _ = gla_reference(q, k, v, g, initial_state=s0)
    for name, kernel, kwargs in [
        ("naive", naive_gla, {}),
        ("recurrent", recurrent_gla, {}),
        ("chunk", chunk_gla, {"chunk_size": 32}),
    ]:
        o, s = kernel(q, k, v, g, initial_state=s0, output_final_state=True, **kwargs)
        assert o.dtype == torch.float64 and s.dtype == torch.float64, name
        check(o, s, ref_o, ref_s, tolerance(kernel, g, kwargs, FP64_TOL), f"{name} fp64 {decay}")


def test_bf16_inputs_keep_an_fp32_state():
    q, k, v, g, _ = make_inputs(1, 50, 6, 2, seed=7)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ref_o, ref_s, _ = gla_reference(qb, kb, vb, g)  # same (bf16-rounded) inputs, exact arithmetic
    for kernel in (naive_gla, recurrent_gla, chunk_gla):
        o, s = kernel(qb, kb, vb, g, output_final_state=True)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert_close(s, ref_s, FP32_TOL, f"{kernel.__name__} bf16 state")
        assert_close(o, ref_o, 2**-7, f"{kernel.__name__} bf16 output")  # one bf16 rounding of the result


def test_custom_scale_and_no_final_state():
    q, k, v, g, _ = make_inputs(1, 20, 6, 2, seed=8)
    ref_o, _, _ = gla_reference(q, k, v, g, scale=0.3)
    for kernel in (naive_gla, recurrent_gla, chunk_gla, *[f for _, f, _ in FP32_KERNELS[2:]]):
        o, s = kernel(q, k, v, g, scale=0.3)
        assert s is None
        assert_close(o, ref_o, FP32_TOL, f"{kernel.__name__} scale=0.3")


def test_empty_sequence_returns_the_initial_state():
    q, k, v, g, s0 = make_inputs(2, 0, 6, 2, with_state=True)
    for kernel in (naive_gla, recurrent_gla, chunk_gla, prefill_gla):
        o, s = kernel(q, k, v, g, initial_state=s0, output_final_state=True)
        assert o.shape == (2, 0, 6, V), kernel.__name__
        assert torch.equal(s, s0), kernel.__name__


@pytest.mark.parametrize("decay", ["moderate", "mixed", "strong"])
def test_chunk_gradients_match_the_recurrence(decay):
    """Training runs chunk_gla: its gradients must equal autograd through the token loop."""
    q, k, v, g, s0 = make_inputs(1, 40, 6, 2, decay=decay, with_state=True, seed=9)
    weights = torch.randn(1, 40, 6, V, generator=torch.Generator().manual_seed(10))
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, g, s0)]
    o, s = chunk_gla(*inputs[:4], initial_state=inputs[4], output_final_state=True, chunk_size=16)
    ((o * weights).sum() + s.sum()).backward()
    ref_inputs = [t.double().requires_grad_(True) for t in (q, k, v, g, s0)]
    ref_o, ref_s, _ = gla_reference(*ref_inputs[:4], initial_state=ref_inputs[4])
    ((ref_o * weights.double()).sum() + ref_s.sum()).backward()
    for name, ours, ref in zip("q k v g initial_state".split(), inputs, ref_inputs):
        assert_close(ours.grad, ref.grad, 1e-4, f"grad {name} ({decay})")


def test_shape_errors_raise_value_error():
    q, k, v, g, s0 = make_inputs(1, 10, 6, 2, with_state=True)
    bad_calls = {
        "3-d q": lambda f: f(q[0], k, v, g),
        "k length": lambda f: f(q, k[:, :5], v, g),
        "g shape": lambda f: f(q, k, v, g[..., :4]),
        "v heads": lambda f: f(q, k, v[:, :, :1], g),
        "heads not divisible": lambda f: f(q[:, :, :5], k, v, g),
        "key dim": lambda f: f(q[..., :4], k, v, g),
        "initial_state": lambda f: f(q, k, v, g, initial_state=s0[..., :3]),
    }
    for kernel in (naive_gla, recurrent_gla, chunk_gla, prefill_gla):
        for what, call in bad_calls.items():
            with pytest.raises(ValueError):
                call(kernel)
                pytest.fail(f"{kernel.__name__} accepted {what}")
    with pytest.raises(ValueError, match="sub_chunk_size"):
        chunk_gla(q, k, v, g, chunk_size=24, sub_chunk_size=16)


@needs_kernel
@pytest.mark.parametrize("t1", [1, 37, 149])
def test_kernel_split_with_carried_state_equals_one_call(t1):
    """A prefill in pieces (streamed chunks) carries the kernel's final state into the next call."""
    q, k, v, g, s0 = make_inputs(2, 150, 6, 2, decay="mixed", with_state=True, seed=t1)
    ref_o, ref_s, _ = gla_reference(q, k, v, g, initial_state=s0)
    first, mid = kernel_gla(q[:, :t1], k[:, :t1], v[:, :t1], g[:, :t1], initial_state=s0, output_final_state=True)
    second, last = kernel_gla(q[:, t1:], k[:, t1:], v[:, t1:], g[:, t1:], initial_state=mid, output_final_state=True)
    check(torch.cat((first, second), dim=1), last, ref_o, ref_s, FP32_TOL, f"kernel split at {t1}")


@needs_kernel
@pytest.mark.parametrize("K_,V_,H,Hkv", [(64, 64, 9, 3), (16, 40, 4, 1), (5, 33, 2, 2), (128, 16, 10, 2)])
def test_kernel_head_sizes_and_groups(K_, V_, H, Hkv):
    """Value heads not a multiple of the kernel's 32-column blocks, odd key sizes, 1 to 5 query heads per group."""
    gen = torch.Generator().manual_seed(K_ + V_)
    q, k = torch.randn(2, 70, H, K_, generator=gen), torch.randn(2, 70, Hkv, K_, generator=gen)
    v, s0 = torch.randn(2, 70, Hkv, V_, generator=gen), torch.randn(2, Hkv, K_, V_, generator=gen)
    g = F.logsigmoid(2 * torch.randn(2, 70, Hkv, K_, generator=gen)) / 16
    ref_o, ref_s, _ = gla_reference(q, k, v, g, initial_state=s0)
    given = s0.clone()
    o, s = kernel_gla(q, k, v, g, initial_state=s0, output_final_state=True)
    check(o, s, ref_o, ref_s, FP32_TOL, f"kernel K={K_} V={V_} H={H} Hkv={Hkv}")
    assert torch.equal(s0, given)  # the caller's initial state is not overwritten (the kernel writes its own copy)


@needs_kernel
def test_prefill_takes_the_kernel_only_where_it_applies(monkeypatch):
    """fp32 without gradients takes the C recurrence; fp64, gradients and the switch turned off take chunk_gla."""
    calls = []
    monkeypatch.setattr(gla_module, "kernel_gla", lambda *a, **kw: calls.append("kernel") or kernel_gla(*a, **kw))
    monkeypatch.setattr(gla_module, "chunk_gla", lambda *a, **kw: calls.append("chunk") or chunk_gla(*a, **kw))
    q, k, v, g, s0 = make_inputs(1, 30, 6, 2, with_state=True, seed=11)
    with torch.no_grad():
        prefill_gla(q, k, v, g, initial_state=s0)
        prefill_gla(*(t.double() for t in (q, k, v, g)))
        gla_kernel(False)
        try:
            prefill_gla(q, k, v, g)
        finally:
            gla_kernel(True)
    prefill_gla(q.requires_grad_(True), k, v, g)
    assert calls == ["kernel", "chunk", "chunk", "chunk"]
