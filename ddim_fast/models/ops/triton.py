"""The UNet's fusable ops on the fused Triton kernels (`model.set_ops("triton")`).

Implements the contract of ops/__init__.py with ddim_fast.kernels: GroupNorm (+ the time-embedding add)
(+ SiLU) in one kernel, attention in one flash-style kernel. Convolutions and linear layers stay
PyTorch (cuDNN / cuBLAS). The kernels need CUDA tensors, or TRITON_INTERPRET=1 set before they
are imported (the slow CPU interpreter used by the tests); anything else is refused with a
message that says so. The reference path never imports this module.
"""

from __future__ import annotations

import torch
import triton

from ...kernels import attention as _attention
from ...kernels import group_norm as _group_norm
from .reference import ReferenceOps

MAX_HEAD_DIM = 512  # the attention kernel's limit (LSUN-256: 512 channels at 16x16)


def interpreted() -> bool:
    """True when the kernels were imported under TRITON_INTERPRET=1 (CPU interpreter)."""
    return not isinstance(_group_norm._group_norm_kernel, triton.runtime.JITFunction)


def _require_device(t, op):
    if t.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"the triton backend needs CUDA or TRITON_INTERPRET=1: {op} got a tensor on {t.device}. "
            "Move the model and inputs to a CUDA device, or set TRITON_INTERPRET=1 before importing "
            "ddim_fast (slow; for tests), or use set_ops('reference')"
        )


class TritonOps:
    """Fused GroupNorm(+add)(+SiLU) and attention; same signatures and results as ReferenceOps."""

    name = "triton"

    @staticmethod
    def group_norm(x, weight, bias, num_groups, eps, *, add=None, silu=False):
        """x (B, C, H, W) NCHW or channels_last, fp32/fp16/bf16; add (B, C) or None. Returns x's
        dtype, shape and memory format (ddim_fast.kernels.group_norm.group_norm). A tensor above
        the kernel's MAX_NUMEL (LSUN-256 at batch 128 and up) runs in batch chunks that fit."""
        _require_device(x, "group_norm")
        per_sample = max(x[:1].numel(), 1)
        step = max(_group_norm.MAX_NUMEL // per_sample, 1)  # a sample above the limit is refused by the kernel
        if x.shape[0] <= step:
            return _group_norm.group_norm(x, weight, bias, num_groups, eps, add=add, silu=silu)
        out = torch.empty_like(x)  # x's memory format; every batch slice keeps x's strides
        for lo in range(0, x.shape[0], step):
            hi = min(lo + step, x.shape[0])
            _group_norm.group_norm(x[lo:hi], weight, bias, num_groups, eps, add=None if add is None else add[lo:hi],
                                   silu=silu, out=out[lo:hi])
        return out

    @staticmethod
    def attention(q, k, v):
        """q, k, v (B, C, N), any strides; returns (B, C, N) contiguous. Head dims above
        MAX_HEAD_DIM (no shipped model has one) fall back to the reference implementation."""
        _require_device(q, "attention")
        if q.shape[1] > MAX_HEAD_DIM:
            return ReferenceOps.attention(q, k, v)
        return _attention.attention(q, k, v)
