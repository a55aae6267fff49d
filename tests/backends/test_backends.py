"""The backend registry (backends/__init__.py) and `auto`: every registered backend is one class with
the interface the Engine uses, and `auto` picks the first that can run, saying what it skipped."""

import importlib.util

import pytest
import torch

from ddim_fast import engine
from ddim_fast.backends import AUTO, BACKENDS, REGISTRY, BackendUnavailable, backend_class
from ddim_fast.backends.base import Backend
from ddim_fast.backends.cuda_graph import CudaGraphBackend
from ddim_fast.backends.onnxruntime import OnnxRuntimeBackend
from ddim_fast.backends.triton import TritonBackend


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_backend_has_the_interface(name):
    cls = backend_class(name)
    assert issubclass(cls, Backend) and cls.name == name and cls.summary
    for method in ("unavailable", "run", "sample"):
        assert callable(getattr(cls, method))
    why = cls.unavailable(torch.device("cpu"))
    assert why is None or (isinstance(why, str) and why)
    assert BACKENDS == ("auto", *REGISTRY) and all(n in REGISTRY for names in AUTO.values() for n in names)
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        backend_class("tensorrt")


def test_auto_on_cuda_without_triton_picks_what_runs_and_says_why(monkeypatch):
    """No device needed: the choice reads only the device type and what is installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    cuda = torch.device("cuda")
    assert "Triton is not installed" in CudaGraphBackend.unavailable(cuda)  # an explicit cuda_graph says so
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda_graph' cannot run: Triton is not installed"):
        engine.choose_backend("cuda_graph", cuda)
    monkeypatch.setattr(OnnxRuntimeBackend, "unavailable", classmethod(lambda cls, device: None))
    name, reason = engine.choose_backend("auto", cuda)
    assert name == "onnxruntime" and "without cuda_graph: Triton is not installed" in reason
    monkeypatch.setattr(OnnxRuntimeBackend, "unavailable", classmethod(lambda cls, device: "no CUDA EP"))
    name, reason = engine.choose_backend("auto", cuda)
    assert name == "reference" and "without cuda_graph" in reason and "without onnxruntime: no CUDA EP" in reason


def test_auto_on_cuda_with_triton_picks_the_graph(monkeypatch):
    monkeypatch.setattr(TritonBackend, "unavailable", classmethod(lambda cls, device: None))
    name, reason = engine.choose_backend("auto", torch.device("cuda"))
    assert name == "cuda_graph"
    assert reason == "auto: CUDA device -> cuda_graph, whole-loop CUDA graph with Triton kernels"
