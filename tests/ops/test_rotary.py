"""Rotary embedding against complex-number rotation of the pairs (x_i, x_{i+D/2}).

Tolerance: the kernel forms angles ``pos * inv_freq`` in fp32 (as Llama/Qwen2 do), so an
angle carries an absolute error of about ``pos * 2^-23`` (rounding of the product and of
inv_freq); cos and sin inherit it. We allow ``1e-6 + 4 * max_pos * 2^-23`` times |x|max.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_impl import assert_close, rope_reference
from spikingbrain.ops import apply_rotary, rotary_cos_sin, rotary_inv_freq


def rotate(x, positions, theta):
    cos, sin = rotary_cos_sin(positions, rotary_inv_freq(x.shape[-1], theta))
    return apply_rotary(x, cos, sin)


def tol(max_pos: int) -> float:
    return 1e-6 + 4 * max_pos * 2**-23


@pytest.mark.parametrize("theta", [10000.0, 1e6])
@pytest.mark.parametrize("max_pos", [16, 4096])
def test_matches_complex_rotation(theta, max_pos):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, 16, generator=gen)
    positions = torch.randint(0, max_pos, (2, 9), generator=gen)
    out = rotate(x, positions, theta)
    scale = x.abs().max().item()
    assert_close(out, rope_reference(x, positions, theta), tol(max_pos) * scale, f"theta={theta} pos<{max_pos}")


def test_hand_computed_values():
    # D = 2: one pair, frequency theta^0 = 1, so position p rotates (1, 0) to (cos p, sin p).
    x = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = rotate(x, torch.tensor([[0, 1, 2]]), 10000.0)
    expected = torch.tensor([[1.0, 0.0], [math.cos(1), math.sin(1)], [math.cos(2), math.sin(2)]]).view(1, 3, 1, 2)
    assert_close(out, expected, 1e-6, "D=2")
    # D = 4, theta = 100: the second pair (x_1, x_3) turns by p * 100^(-1/2) = p / 10.
    y = torch.tensor([0.0, 2.0, 0.0, 0.0]).view(1, 1, 1, 4)
    out = rotate(y, torch.tensor([[5]]), 100.0)
    expected = torch.tensor([0.0, 2 * math.cos(0.5), 0.0, 2 * math.sin(0.5)]).view(1, 1, 1, 4)
    assert_close(out, expected, 1e-6, "D=4")


def test_position_zero_is_identity_and_norm_is_kept():
    x = torch.randn(1, 5, 2, 8, generator=torch.Generator().manual_seed(1))
    assert_close(rotate(x, torch.zeros(1, 5, dtype=torch.long), 1e4), x, 1e-7, "position 0")
    out = rotate(x, torch.arange(100, 105).view(1, 5), 1e4)
    assert_close(out.norm(dim=-1), x.norm(dim=-1), 1e-5, "norm")


def test_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 4, 32, generator=gen)
    k = torch.randn(1, 1, 4, 32, generator=gen)
    theta = 10000.0

    def score(m, n):
        qr = rotate(q, torch.tensor([[m]]), theta)
        kr = rotate(k, torch.tensor([[n]]), theta)
        return (qr * kr).sum(-1)

    for m, n in [(5, 2), (17, 0), (30, 30)]:
        base = score(m, n)
        for shift in (1, 100, 1000):
            assert_close(score(m + shift, n + shift), base, tol(m + shift) * 32, f"shift {shift}")
    # and it does depend on the offset
    assert (score(5, 2) - score(5, 3)).abs().max() > 1e-2


def test_odd_head_dim_is_rejected():
    with pytest.raises(ValueError, match="head_dim"):
        rotary_inv_freq(7, 10000.0)


@pytest.mark.parametrize("T", [1, 5])
def test_rotate_query_key_equals_apply_rotary_bit_for_bit(monkeypatch, T):
    """Queries and keys of one decode position go through the C kernel (two calls), more positions through one
    ``apply_rotary``; either way each equals ``apply_rotary`` of it alone, bit for bit, also for strided views."""
    from spikingbrain.ops import rotary

    calls = []
    kernel = rotary._kernel_rotate
    monkeypatch.setattr(rotary, "_kernel_rotate", lambda *a: calls.append(a[0].shape) or kernel(*a))
    g = torch.Generator().manual_seed(T)
    product = torch.randn(1, T, 9 * 64 + 3 * 64 + 3 * 64, generator=g)  # q, k, v side by side, as a shared product
    q, k = product[..., : 9 * 64].view(1, T, 9, 64), product[..., 9 * 64 : 12 * 64].view(1, T, 3, 64)
    cos, sin = rotary_cos_sin(torch.arange(100, 100 + T).view(1, T), rotary_inv_freq(64, 10000.0))
    with torch.inference_mode():
        got_q, got_k = rotary.rotate_query_key(q, k, cos, sin)
    assert torch.equal(got_q, apply_rotary(q, cos, sin)) and torch.equal(got_k, apply_rotary(k, cos, sin))
    used = rotary._rotary_library() is not None and T == 1
    assert calls == ([q.shape, k.shape] if used else [])
