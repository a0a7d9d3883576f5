"""``RMSNorm`` against the reference formula of tests/reference_impl.py (fp64) and, in fp32, against the same formula
computed op by op: ``F.rms_norm``, which fp32 inputs take, must give its values and gradients bit for bit."""

from __future__ import annotations

import pytest
import torch

from reference_impl import _rms_norm, assert_close
from spikingbrain.model.layers import RMSNorm


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 64), (1, 2048, 576)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_fp32_rms_norm_is_the_formula_bit_for_bit(shape, eps):
    gen = torch.Generator().manual_seed(shape[1])
    norm = RMSNorm(shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
    x = (torch.randn(*shape, generator=gen) * torch.logspace(-3, 3, shape[1])[None, :, None]).requires_grad_()
    by_ops = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    got = norm(x)
    assert torch.equal(got, by_ops)
    assert torch.equal(*(torch.autograd.grad(y.square().sum(), x)[0] for y in (got, by_ops)))
    assert_close(got, _rms_norm(x.double(), norm.weight.double(), eps), 1e-6, "against the fp64 reference")


def test_bf16_inputs_normalise_in_fp32_and_come_back_in_the_weights_dtype():
    norm = RMSNorm(64)
    x = torch.randn(2, 3, 64).bfloat16()
    got = norm(x)
    xf = x.float()
    assert got.dtype == torch.float32
    assert torch.equal(got, norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).bfloat16())
