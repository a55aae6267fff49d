"""The Engine's backends: one file per backend, each a class with the interface of base.Backend,
gathered in one registry.

    reference.py     ReferenceBackend     eager PyTorch (ddim_fast.sampling) on any device: the truth
    triton.py        TritonBackend        the UNet with fused Triton ops + the fused step kernel, eager
    cuda_graph.py    CudaGraphBackend     the triton backend's whole S-step loop in one CUDA graph
    onnxruntime.py   OnnxRuntimeBackend   the exported whole sampler in ONNX Runtime

A backend's module is imported only when it is chosen (`backend_class`), so `import ddim_fast`
pulls in neither Triton nor ONNX. Adding a backend: copy one of the files, change the class, and
add one line to REGISTRY (and its name to AUTO where `auto` should consider it).
"""

from __future__ import annotations

from importlib import import_module

# name -> (module in this package, class)
REGISTRY = {
    "reference": ("reference", "ReferenceBackend"),
    "triton": ("triton", "TritonBackend"),
    "cuda_graph": ("cuda_graph", "CudaGraphBackend"),
    "onnxruntime": ("onnxruntime", "OnnxRuntimeBackend"),
}
BACKENDS = ("auto", *REGISTRY)
# What `auto` tries, fastest first, per device type: the first backend that can run is chosen.
AUTO = {"cuda": ("cuda_graph", "onnxruntime", "reference"), "cpu": ("onnxruntime", "reference")}


class BackendUnavailable(ValueError):
    """An explicitly requested backend cannot run here; the message says what is missing."""


def backend_class(name: str) -> type:
    """The class of backend `name` (a REGISTRY key), its module imported on first use."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    module, cls = REGISTRY[name]
    return getattr(import_module(f".{module}", __name__), cls)
