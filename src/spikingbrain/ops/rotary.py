"""Rotary position embedding (rotate-half convention, as in Llama and Qwen2)."""

from __future__ import annotations

import ctypes
import functools

import torch

from .native import load_kernel

__all__ = ["rotary_inv_freq", "rotary_cos_sin", "apply_rotary", "rotate_query_key"]


def rotary_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/head_dim)`` for ``i < head_dim / 2`` (fp32)."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos and sin tables ``[B, T, head_dim]`` for integer ``positions`` ``[B, T]``."""
    angles = positions.float().unsqueeze(-1) * inv_freq.float()
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by the tables from :func:`rotary_cos_sin`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotated * sin


def rotate_query_key(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rotary` of queries ``q`` ``[B, T, H, D]`` and keys ``k`` ``[B, T, Hkv, D]`` at the same positions:
    a decode step's one position on CPU through our C kernel (two calls, the same values bit for bit), else q and k
    rotated as one tensor (half the small operations of rotating each)."""
    if q.shape[0] * q.shape[1] == 1 and _kernel_rotates(q, k, cos, sin):
        return _kernel_rotate(q, cos, sin), _kernel_rotate(k, cos, sin)
    heads = q.shape[2]
    rotated = apply_rotary(torch.cat((q, k), 2), cos, sin)
    return rotated[:, :, :heads], rotated[:, :, heads:]


@functools.cache
def _rotary_library() -> ctypes.CDLL | None:
    lib = load_kernel("rotary")
    if lib is not None:
        lib.sb_rotate_half.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p]
        lib.sb_rotate_half.restype = None
    return lib


def _kernel_rotates(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel takes these: fp32 CPU tensors, each head's values contiguous, even head_dim, contiguous tables,
    no gradient, and the kernel built."""
    tensors = (q, k, cos, sin)
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)
            and cos.is_contiguous() and sin.is_contiguous() and q.shape[-1] % 2 == 0
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and _rotary_library() is not None)


def _kernel_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One position's heads ``x`` ``[1, 1, H, D]`` rotated by the kernel (a new contiguous tensor)."""
    out = torch.empty(x.shape, dtype=x.dtype)
    _rotary_library().sb_rotate_half(x.data_ptr(), x.shape[2], x.shape[3], x.stride(2), cos.data_ptr(), sin.data_ptr(), out.data_ptr())
    return out
