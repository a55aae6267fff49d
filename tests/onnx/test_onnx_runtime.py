"""ONNX Runtime sessions (onnx/runtime.py): clear errors for a CUDA EP that is missing or cannot load,
and for damaged, truncated or missing files; whether the CPU EP's threads spin, and torch's threads while
an export runs on a busy machine."""

import pytest

from ddim_fast import onnx as dox

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def tiny_eps(onnx_tiny_eps):
    return onnx_tiny_eps


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_provider_that_cannot_load(tiny_eps, monkeypatch):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA EP")
    with pytest.raises(ValueError, match=r"no CUDAExecutionProvider.*ddim-fast\[gpu\]"):
        dox.OrtRunner(tiny_eps, device="cuda")
    # listed (onnxruntime-gpu installed) but its CUDA libraries do not load: ORT falls back to the CPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ValueError, match="could not load its CUDAExecutionProvider"):
        dox.OrtRunner(tiny_eps, device="cuda")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_onnx_file(tiny_eps, tmp_path, damage):
    data = tiny_eps.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not an onnx model" * 10, "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"bad\.onnx.*damaged or truncated.*re-export"):
        dox.OrtRunner(bad)
    with pytest.raises(ValueError, match=r"bad\.onnx.*re-export"):
        dox.onnx_metadata(bad)
    with pytest.raises(FileNotFoundError, match="export"):
        dox.OrtRunner(tmp_path / "missing.onnx")


def test_spinning_follows_the_load_unless_told(monkeypatch):
    from ddim_fast.onnx import runtime

    monkeypatch.delenv("DDIM_FAST_ORT_SPIN", raising=False)
    monkeypatch.setattr(runtime, "physical_cores", lambda: 2)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.7, 1.0, 1.0))
    assert runtime.spinning_default() is True  # cores to spare: ONNX Runtime's default
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (2.0, 1.0, 1.0))
    assert runtime.spinning_default() is False  # others' work is running
    so = runtime.session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.setenv("DDIM_FAST_ORT_SPIN", "1")
    assert runtime.spinning_default() is True
    monkeypatch.setenv("DDIM_FAST_ORT_SPIN", "yes")
    with pytest.raises(ValueError, match="DDIM_FAST_ORT_SPIN must be 1"):
        runtime.spinning_default()


def test_one_torch_thread_while_busy(monkeypatch):
    import torch

    from ddim_fast.onnx import runtime

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for busy, inside in ((True, 1), (False, 2)):
            monkeypatch.setattr(runtime, "busy", lambda busy=busy: busy)
            with runtime.one_torch_thread_when_busy():
                assert torch.get_num_threads() == inside
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
