"""ReferenceOps: the UNet's fusable operations in eager PyTorch (the contract is in __init__.py)."""

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
