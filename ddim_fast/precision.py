"""Network precisions by name, and docs/DESIGN.md's tolerance rule for fast paths (one definition,
used by the ONNX export check, the Engine, the CLI and the tests' assert_close_to_reference).

Tolerance rule: a fast path's max-abs error against a float64 reference may be at most twice the
error of the reference run in the same low precision, plus an absolute slack per precision:

    err(fast) <= 2 * err(reference in the same precision) + ATOL[precision]
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the network's precisions
NAMES = {dtype: name for name, dtype in DTYPES.items()}  # torch.float16 -> "fp16"
ATOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}  # docs/DESIGN.md's absolute slack per precision


def atol(dtype) -> float:
    """The rule's absolute slack for a precision given as a torch dtype or a name ("fp16")."""
    return ATOL[NAMES[dtype] if isinstance(dtype, torch.dtype) else dtype]


def tolerance_ok(err_fast: float, err_low: float, dtype) -> bool:
    """docs/DESIGN.md: error vs float64 <= 2 x the reference's error in the same precision + atol."""
    return err_fast <= 2 * err_low + atol(dtype)
