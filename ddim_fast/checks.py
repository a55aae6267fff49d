"""Small checks shared across the library: what counts as an int, and optional dependencies."""

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
