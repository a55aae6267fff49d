"""The seam between the UNet and its fusable operations: a registry of implementations.

The network code calls `self.ops.group_norm(...)` and `self.ops.attention(...)`; which
implementation runs is chosen by `UNet.set_ops("reference" | "triton")` without touching the
network. Convolutions and linear layers always stay PyTorch (cuDNN / cuBLAS).

    reference.py   ReferenceOps: eager PyTorch, the truth
    triton.py      TritonOps: the fused Triton kernels (imported only when asked for)

Contract (every implementation):
  group_norm(x, weight, bias, num_groups, eps, *, add=None, silu=False)
      x (B, C, H, W); add (B, C) or None, added per (batch, channel) BEFORE normalising (the
      ResBlock's time-embedding add, fused); then GroupNorm with fp32 statistics, the affine
      weight/bias, and SiLU when silu=True. Returns x's dtype and shape.
  attention(q, k, v)
      q, k, v (B, C, N): single-head attention over N tokens with head_dim C,
      out[b, :, i] = sum_j softmax_j(q[b, :, i] . k[b, :, j] / sqrt(C)) v[b, :, j]. Returns (B, C, N).
"""

from __future__ import annotations

from .reference import ReferenceOps


def get_ops(name: str):
    """The ops implementation called `name`."""
    if name == "reference":
        return ReferenceOps()
    if name == "triton":
        from ...checks import require

        require("triton", "gpu", "the triton ops")
        from .triton import TritonOps  # imports Triton; kept out of the reference path

        return TritonOps()
    raise ValueError(f"unknown ops {name!r}; expected 'reference' or 'triton'")
