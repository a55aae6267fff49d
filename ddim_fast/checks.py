"""Small checks shared across the library, so a function's first lines say what it checks.

    check(ok, message)              raise ValueError(message) unless ok
    is_int(v), is_number(v)         an integer (numpy's too) / an int or float, never a bool
    positive_int(name, v)           v as an int, or "NAME must be a positive int, got V"
    sample_shape(model, shape)      (C, H, W) of one sample, given or read from model.config
    require(module, extra, purpose) an optional dependency, or one line naming the extra to install
"""

from __future__ import annotations

import importlib.util
import numbers

# The pip name of each optional module, for the install line.
PIP_NAMES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "triton": "triton",
             "onnxruntime": "onnxruntime", "onnx": "onnx", "onnxscript": "onnxscript", "diffusers": "diffusers"}


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed; the message names the extra that installs it.
    A ValueError too, so the CLI prints it as one line (exit 2)."""


def is_int(value) -> bool:
    """True for an integer: a Python int or a numpy integer (anything registered as
    numbers.Integral), never a bool. Callers convert with int(value) after the check, so a
    numpy integer never reaches JSON or a file name."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for a Python int or float (numpy's float64 is one), never a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless `ok`: one line per rule in a validating function."""
    if not ok:
        raise ValueError(message)


def positive_int(name: str, value, hint: str = "") -> int:
    """`value` as an int when it is a positive integer (numpy's too), else ValueError
    "NAME must be a positive intHINT, got VALUE"."""
    check(is_int(value) and value >= 1, f"{name} must be a positive int{hint}, got {value!r}")
    return int(value)


def sample_shape(model, shape=None) -> tuple:
    """(C, H, W) of one sample: `shape` checked, or read from model.config (a UNet: resolution; a
    diffusers UNet, or the adapter of one: sample_size)."""
    if shape is None:
        cfg = getattr(getattr(model, "unet", None), "config", None) or getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "in_channels"):
            raise ValueError("cannot tell the sample shape from this model: pass shape=(C, H, W)")
        size = getattr(cfg, "resolution", None) or getattr(cfg, "sample_size", None)  # ours / diffusers'
        if size is None:
            raise ValueError("cannot tell the sample shape from this model (no sample_size): pass shape=(C, H, W)")
        h, w = (size, size) if not isinstance(size, (list, tuple)) else size
        shape = (cfg.in_channels, h, w)
    shape = tuple(int(s) for s in shape)
    check(len(shape) == 3 and min(shape) >= 1, f"shape must be (C, H, W) with positive sizes, got {shape}")
    return shape


def require(module: str, extra: str, purpose: str) -> None:
    """Raise MissingExtra, naming `extra`, unless `module` can be imported. Call it before the work
    that needs the module starts. Looks the module up without importing it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module stubbed out as None
        found = False
    if not found:
        top = module.split(".")[0]
        raise MissingExtra(f"{purpose} needs {PIP_NAMES.get(top, top)}, which is not installed: "
                           f"pip install 'ddim-fast[{extra}]'")
