"""The launchers' input checks, shared so each launcher's `_check` reads as a list of rules. Every
failure is one ValueError naming the problem and the fix. Like every kernel file, this imports
nothing from the rest of ddim_fast."""

from __future__ import annotations

import torch
import triton


def check(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless `ok`."""
    if not ok:
        raise ValueError(message)


def is_int(value) -> bool:
    """A Python int, never a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def float_tensor(t, dtypes, ndim=None) -> bool:
    """`t` is a tensor of one of `dtypes` (and `ndim` dimensions when given)."""
    return isinstance(t, torch.Tensor) and t.dtype in dtypes and (ndim is None or t.ndim == ndim)


def device_scalar(t, dtype, device) -> bool:
    """`t` is a (1,) tensor of `dtype` on `device`: a value the kernel reads on the device."""
    return isinstance(t, torch.Tensor) and t.dtype == dtype and t.numel() == 1 and t.device == device


def runnable(t, kernel, op: str, otherwise: str = "", tensors: str = "a CUDA tensor") -> None:
    """A compiled kernel needs CUDA tensors; on a CPU only the interpreter (TRITON_INTERPRET=1, set
    before the kernels are imported, which makes `kernel` an interpreter object) runs it."""
    check(t.device.type == "cuda" or not isinstance(kernel, triton.runtime.JITFunction),
          f"{op} needs {tensors} (got {t.device}); on CPU set TRITON_INTERPRET=1 before the kernels are "
          f"imported{', ' + otherwise if otherwise else ''}")


def batch_fits(batch: int, limit: int, what: str = "a batch") -> None:
    """The batch is a CUDA grid axis, whose size is capped at `limit` programs."""
    check(batch <= limit, f"{what} of {batch} samples is more than one launch takes: the batch is a CUDA grid axis of "
                          f"at most {limit} programs; run it in chunks of at most {limit} (Engine does this)")
