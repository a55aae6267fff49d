"""Tier 4: backend="onnxruntime" (backends/onnxruntime.py) against the reference (CPU EP): seeded and
explicit noise, inversion, the export cache, a missing onnxruntime; the GPU tier (CUDA EP, IO binding)
is skipped without CUDA. Every parity check uses docs/DESIGN.md's tolerance rule."""

import copy
import sys

import pytest
import torch

import ddim_fast as dd
from ddim_fast import onnx as dox
from ddim_fast.backends.onnxruntime import OnnxRuntimeBackend, host_noise
from ddim_fast.engine import BackendUnavailable
from tests.helpers import assert_close_to_reference

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)


pytestmark = pytest.mark.usefixtures("onnx_cache_env")


def _float64(model):
    return copy.deepcopy(model).double().eval()


# -- the Engine backend ---------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_engine_onnxruntime_equals_reference(onnx_tiny, eta):
    plan = dd.SamplingPlan.build(SCHED, 4, eta=eta)
    fast = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    ref = dd.Engine(onnx_tiny, plan, backend="reference", device="cpu")
    assert fast.backend == "onnxruntime"
    got = fast.sample(3, seed=7, first_index=5)
    want = ref.sample(3, seed=7, first_index=5)
    x_T = dd.rng.initial_noise(7, (3, 3, 16, 16), first_index=5)
    ref64 = dd.sample(_float64(onnx_tiny), x_T.double(), plan, seed=7, first_index=5).clamp(-1, 1)
    assert_close_to_reference(got, want, ref64, torch.float32)
    if eta > 0:  # the seed really drives the noise: another seed, another sample
        assert (fast.sample(3, seed=8, first_index=5) - got).abs().max() > 1e-2
        # sample k of a seed does not depend on the batch it is drawn in
        assert_close_to_reference(fast.sample(1, seed=7, first_index=6)[0], want[1], ref64[1], torch.float32)


def test_engine_explicit_noise(onnx_tiny):
    plan = dd.SamplingPlan.build(SCHED, 3, eta=1.0)
    fast = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(3, 2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    got = fast(x_T, noise=noise)
    want = dd.Engine(onnx_tiny, plan, backend="reference", device="cpu")(x_T, noise=noise)
    ref64 = dd.sample(_float64(onnx_tiny), x_T.double(), plan, noise=noise.double()).clamp(-1, 1)
    assert_close_to_reference(got, want, ref64, torch.float32)


def test_engine_inversion(onnx_tiny):
    plan = dd.SamplingPlan.build(SCHED, 4)
    fast = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    ref = dd.Engine(onnx_tiny, plan, backend="reference", device="cpu")
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    got, want = fast.invert(x0), ref.invert(x0)
    ref64 = dd.invert(_float64(onnx_tiny), x0.double(), plan)
    assert_close_to_reference(got, want, ref64, torch.float32)
    assert set(fast._backend.paths) == {"sample", "invert"}
    assert dox.onnx_metadata(fast._backend.paths["invert"])["plan"]["direction"] == "invert"


def test_second_engine_hits_the_cache(onnx_tiny, onnx_cache_env):
    plan = dd.SamplingPlan.build(SCHED, 5, clip_x0=1.0)
    dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    before = dict(dox.stats)
    files = sorted(onnx_cache_env.iterdir())
    eng = dd.Engine(copy.deepcopy(onnx_tiny), plan, backend="onnxruntime", device="cpu")  # equal, not identical
    assert dox.stats["torch_exports"] == before["torch_exports"]
    assert dox.stats["sampler_builds"] == before["sampler_builds"]
    assert dox.stats["cache_hits"] == before["cache_hits"] + 1
    assert sorted(onnx_cache_env.iterdir()) == files
    assert eng._backend.paths["sample"] in files
    # new weights: a new key (export again); a new plan for the same weights: no new torch export
    changed = copy.deepcopy(onnx_tiny)
    with torch.no_grad():
        changed.conv_out.bias.add_(1e-3)
    assert dox.model_fingerprint(changed) != dox.model_fingerprint(onnx_tiny)
    dd.Engine(onnx_tiny, dd.SamplingPlan.build(SCHED, 5, clip_x0=0.9), backend="onnxruntime", device="cpu")
    assert dox.stats["torch_exports"] == before["torch_exports"]
    assert dox.stats["sampler_builds"] == before["sampler_builds"] + 1


def test_missing_onnxruntime_names_the_extra(onnx_tiny, onnx_tiny_eps, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ImportError, match=r"ddim-fast\[onnx\]"):
        dox.OrtRunner(onnx_tiny_eps)
    with pytest.raises(ValueError, match=r"ddim-fast\[gpu\]"):
        OnnxRuntimeBackend(onnx_tiny, dd.SamplingPlan.build(SCHED, 3), device="cpu", dtype=torch.float32,
                              shape=(3, 16, 16))
    with pytest.raises(BackendUnavailable, match=r"ddim-fast\[onnx\]"):
        dd.Engine(onnx_tiny, dd.SamplingPlan.build(SCHED, 3), backend="onnxruntime", device="cpu")
    eng = dd.Engine(onnx_tiny, dd.SamplingPlan.build(SCHED, 3), backend="auto", device="cpu")
    assert eng.backend == "reference" and "onnxruntime" in eng.backend_reason


def test_damaged_cache_entry_is_rebuilt(onnx_tiny, onnx_cache_env):
    plan = dd.SamplingPlan.build(SCHED, 2)
    first = OnnxRuntimeBackend(onnx_tiny, plan, device="cpu", dtype=torch.float32, shape=(3, 16, 16))
    path = first.paths["sample"]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="damaged cache entry"):
        again = OnnxRuntimeBackend(onnx_tiny, plan, device="cpu", dtype=torch.float32, shape=(3, 16, 16))
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(again.run(x, plan, seed=0, noise=None, first_index=0),
                               first.run(x, plan, seed=0, noise=None, first_index=0))


def test_host_noise_is_the_seeded_stream():
    plan = dd.SamplingPlan.build(SCHED, 4, variance="large")  # no noise on the last step
    z = host_noise(plan, 11, (2, 1, 4, 4), first_index=3)
    for i in range(3):
        assert torch.equal(z[i], dd.rng.step_noise(11, i, (2, 1, 4, 4), first_index=3))
    assert torch.equal(z[3], torch.zeros(2, 1, 4, 4))


# -- GPU tier (skipped without CUDA) ------------------------------------------------------------------
def _cuda_ep():
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ep(), reason="needs CUDA and onnxruntime-gpu")
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_ep_parity_without_host_copies(onnx_tiny, monkeypatch, cuda_graph, dtype):
    plan = dd.SamplingPlan.build(SCHED, 4, eta=0.5)
    backend = OnnxRuntimeBackend(onnx_tiny, plan, device="cuda", dtype=dtype, shape=(3, 16, 16), cuda_graph=cuda_graph)
    runner = backend.runner(plan)
    monkeypatch.setattr(runner.session, "run", lambda *a, **k: pytest.fail("host path used on CUDA"))
    monkeypatch.setattr(torch.Tensor, "numpy", lambda *a, **k: pytest.fail("host copy on CUDA"))
    x_T = dd.rng.initial_noise(3, (2, 3, 16, 16), device="cuda")
    for _ in range(2):  # the second call replays ORT's CUDA graph when enabled
        got = backend.run(x_T, plan, seed=3, noise=None, first_index=0)
    assert got.device.type == "cuda"
    monkeypatch.undo()
    ref = dd.Engine(onnx_tiny, plan, backend="reference", device="cuda", dtype=dtype)._backend.run(
        x_T, plan, seed=3, noise=None, first_index=0)
    ref64 = dd.sample(_float64(onnx_tiny).cuda(), x_T.double(), plan, seed=3)
    assert_close_to_reference(got, ref, ref64, dtype)
