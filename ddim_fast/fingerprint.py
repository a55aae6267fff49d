"""Content fingerprints of models: what keys the ONNX cache (ddim_fast/onnx/cache.py) and ties a saved
plan to the model it was made for (ddim_fast/plan_files.py).

A low module (torch, hashlib and json only), so that plan files need not import the onnx package.
"""

from __future__ import annotations

import hashlib
import json

import torch


def _plain(value):
    """A JSON-able stand-in for a model attribute, or None to leave it out of the fingerprint."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    if callable(getattr(value, "to_dict", None)):
        return value.to_dict()
    return None


def model_fingerprint(model) -> str:
    """sha256 of what decides a model's output: class, parameters and buffers (non-persistent ones
    too), and the plain attributes of every submodule (numbers, strings, configs with to_dict)."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())  # the buffer itself: no copy
    attrs = {}
    for mod_name, mod in model.named_modules():
        for k, v in vars(mod).items():
            if k.startswith("_") or k == "training":
                continue
            plain = _plain(v)
            if plain is not None:
                attrs[f"{mod_name}.{k}"] = plain
    h.update(json.dumps(attrs, sort_keys=True, default=str).encode())
    return h.hexdigest()
