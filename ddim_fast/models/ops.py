"""The seam between the UNet and its fusable operations.

The network code calls `self.ops.group_norm(...)` and `self.ops.attention(...)`; which
implementation runs is chosen by `UNet.set_ops("reference" | "triton")` without touching the
network. Convolutions and linear layers always stay PyTorch (cuDNN / cuBLAS).

Contract (both implementations):
  group_norm(x, weight, bias, num_groups, eps, *, add=None, silu=False)
      x (B, C, H, W); add (B, C) or None, added per (batch, channel) BEFORE normalising (the
      ResBlock's time-embedding add, fused); then GroupNorm with fp32 statistics, the affine
      weight/bias, and SiLU when silu=True. Returns x's dtype and shape.
  attention(q, k, v)
      q, k, v (B, C, N): single-head attention over N tokens with head_dim C,
      out[b, :, i] = sum_j softmax_j(q[b, :, i] . k[b, :, j] / sqrt(C)) v[b, :, j]. Returns (B, C, N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ReferenceOps:
    """Eager PyTorch; the truth every other implementation is tested against."""

    name = "reference"

    @staticmethod
    def group_norm(x, weight, bias, num_groups, eps, *, add=None, silu=False):
        if add is not None:
            x = x + add[:, :, None, None].to(x.dtype)  # (B, C, 1, 1)
        ct = _compute_dtype(x)
        y = F.group_norm(x.to(ct), num_groups, weight.to(ct), bias.to(ct), eps).to(x.dtype)
        return F.silu(y) if silu else y

    @staticmethod
    def attention(q, k, v):
        C, ct = q.shape[1], _compute_dtype(q)
        w = torch.bmm(q.transpose(1, 2).to(ct), k.to(ct)) * C**-0.5  # (B, N, N): [query, key]
        w = torch.softmax(w, dim=2)
        return torch.bmm(v.to(ct), w.transpose(1, 2)).to(q.dtype)  # (B, C, N)


def _compute_dtype(x):
    """fp32 for half inputs (fp32 statistics and softmax), float64 kept for float64 truths."""
    return torch.promote_types(x.dtype, torch.float32)


def get_ops(name: str):
    """The ops implementation called `name`."""
    if name == "reference":
        return ReferenceOps()
    if name == "triton":
        from ..checks import require

        require("triton", "gpu", "the triton ops")
        from .triton_ops import TritonOps  # imports Triton; kept out of the reference path

        return TritonOps()
    raise ValueError(f"unknown ops {name!r}; expected 'reference' or 'triton'")
