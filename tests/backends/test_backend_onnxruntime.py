"""Tier 4: backend="onnxruntime" (backends/onnxruntime.py) against the reference (CPU EP). On a CPU it runs the
reference loop with the network in one ONNX Runtime session: every kind of plan (eta > 0 with seeded and
explicit noise, clipping, thresholding, each multistep sampler, eps / x0 / v models, a hand-made table,
inversion) on fresh random inputs and odd shapes; a new plan on a warm model costs no export and no session;
the CUDA path's whole-sampler graphs are built per direction on first use; a missing onnxruntime. The GPU
tier (CUDA EP, IO binding) is skipped without CUDA. Every parity check uses docs/DESIGN.md's tolerance rule."""

import copy
import dataclasses
import sys

import pytest
import torch

import ddim_fast as dd
from ddim_fast import onnx as dox
from ddim_fast.backends.onnxruntime import OnnxRuntimeBackend
from ddim_fast.engine import BackendUnavailable
from ddim_fast.onnx.session import SamplerGraphs, host_noise
from tests.helpers import assert_close_to_reference

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)


pytestmark = pytest.mark.usefixtures("onnx_cache_env")


def _float64(model):
    return copy.deepcopy(model).double().eval()


def _truth(model, x_T, plan, **kw):
    return dd.sample(_float64(model), x_T.double(), plan, **kw).clamp(-1, 1)


def _check(fast, ref, model, plan, batch, seed, first_index=0, what=""):
    """fast.sample against ref.sample (the reference backend) and the float64 reference, with `plan` per call."""
    got = fast.sample(batch, seed=seed, first_index=first_index, plan=plan)
    want = ref.sample(batch, seed=seed, first_index=first_index, plan=plan)
    x_T = dd.rng.initial_noise(seed, (batch, *fast.shape), first_index=first_index)
    assert_close_to_reference(got, want, _truth(model, x_T, plan, seed=seed, first_index=first_index), torch.float32,
                              what)
    return got


class Wobble(torch.nn.Module):
    """A small non-linear conv model(x, t) of any (C, H, W), predicting eps, x0 or v (its `prediction`)."""

    def __init__(self, C, prediction="eps", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(C, generator=g) * 0.1)
        self.prediction = prediction
        self.schedule = SCHED

    def forward(self, x, t):
        tt = (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        return torch.tanh(self.conv(x)) * (0.5 + tt) + 0.3 * x * tt


# -- every kind of plan on one warm engine --------------------------------------------------------------------
PLANS = {
    "ddim": dict(steps=4),
    "eta": dict(steps=4, eta=0.6),
    "sigma-hat, clip": dict(steps=5, variance="large", clip_x0=1.0),
    "threshold": dict(steps=4, threshold=0.9, spacing="quad"),
    "plms": dict(steps=4, sampler="plms"),
    "dpmpp_2m": dict(steps=5, sampler="dpmpp_2m", spacing="trailing"),
    "dpmpp_3m": dict(steps=5, sampler="dpmpp_3m", spacing="trailing", threshold=0.95),
    "dpmpp_2m_sde": dict(steps=5, sampler="dpmpp_2m_sde", spacing="trailing", clip_x0=1.0),
    "unipc": dict(steps=5, sampler="unipc", order=3, spacing="trailing"),
}


def test_every_plan_on_one_warm_engine_matches_the_reference_with_no_new_export(onnx_tiny):
    """One Engine, one export, one session: each plan (steps, spacing, eta, clipping, thresholding, every
    multistep sampler, a hand-made table) per call, at odd batch sizes and offsets."""
    fast = dd.Engine(onnx_tiny, dd.SamplingPlan.build(SCHED, 3), backend="onnxruntime", device="cpu")
    ref = dd.Engine(onnx_tiny, dd.SamplingPlan.build(SCHED, 3), backend="reference", device="cpu")
    assert fast.backend == "onnxruntime" and len(fast._backend.networks) == 1
    before = dict(dox.stats)
    for i, (name, kw) in enumerate(PLANS.items()):
        plan = dd.SamplingPlan.build(SCHED, **kw)
        _check(fast, ref, onnx_tiny, plan, batch=1 + 2 * (i % 3), seed=7 + i, first_index=i, what=name)
    base = dd.SamplingPlan.build(SCHED, 6, eta=0.3)
    g = torch.Generator().manual_seed(5)
    table = dataclasses.replace(base, coef=base.coef * (1 + 0.05 * torch.randn(base.coef.shape, generator=g,
                                                                                   dtype=torch.float64)))
    got = _check(fast, ref, onnx_tiny, table, batch=3, seed=1, what="a hand-perturbed table")
    assert (got - fast.sample(3, seed=1, plan=base)).abs().max() > 1e-4  # the table is what ran
    assert {k: dox.stats[k] - before[k] for k in ("torch_exports", "sampler_builds", "sessions")} == \
        {"torch_exports": 0, "sampler_builds": 0, "sessions": 0}


def test_seeded_noise_is_the_reference_noise(onnx_tiny):
    plan = dd.SamplingPlan.build(SCHED, 4, eta=1.0)
    fast = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    want = dd.Engine(onnx_tiny, plan, backend="reference", device="cpu").sample(3, seed=7, first_index=5)
    got = fast.sample(3, seed=7, first_index=5)
    x_T = dd.rng.initial_noise(7, (3, 3, 16, 16), first_index=5)
    assert_close_to_reference(got, want, _truth(onnx_tiny, x_T, plan, seed=7, first_index=5), torch.float32)
    assert (fast.sample(3, seed=8, first_index=5) - got).abs().max() > 1e-2  # another seed, another sample
    torch.testing.assert_close(fast.sample(1, seed=7, first_index=6)[0], got[1], rtol=0, atol=0)  # any batch


def test_engine_explicit_noise(onnx_tiny):
    plan = dd.SamplingPlan.build(SCHED, 3, eta=1.0)
    fast = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(3, 2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    got = fast(x_T, noise=noise)
    want = dd.Engine(onnx_tiny, plan, backend="reference", device="cpu")(x_T, noise=noise)
    assert_close_to_reference(got, want, _truth(onnx_tiny, x_T, plan, noise=noise.double()), torch.float32)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_predictions_on_an_odd_shape(prediction):
    model = Wobble(2, prediction)
    shape = (2, 5, 7)
    plan = dd.SamplingPlan.build(SCHED, 5, eta=0.4, prediction=prediction, clip_x0=1.5)
    fast = dd.Engine(model, plan, backend="onnxruntime", device="cpu", shape=shape)
    ref = dd.Engine(model, plan, backend="reference", device="cpu", shape=shape)
    _check(fast, ref, model, plan, batch=3, seed=2, first_index=1, what=prediction)
    x0 = torch.rand(3, *shape, generator=torch.Generator().manual_seed(4)) * 2 - 1  # and the inversion
    inv = dd.SamplingPlan.build(SCHED, 5, prediction=prediction)
    truth = dd.invert(_float64(model), x0.double(), inv)
    assert_close_to_reference(fast.invert(x0, plan=inv), ref.invert(x0, plan=inv), truth, torch.float32)


def test_inversion_builds_no_sampler_graph(onnx_tiny):
    plan = dd.SamplingPlan.build(SCHED, 4)
    fast = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    ref = dd.Engine(onnx_tiny, plan, backend="reference", device="cpu")
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    before = dict(dox.stats)
    for eps_at in ("current", "target"):
        truth = dd.invert(_float64(onnx_tiny), x0.double(), plan.inverse(eps_at))
        assert_close_to_reference(fast.invert(x0, eps_at=eps_at), ref.invert(x0, eps_at=eps_at), truth, torch.float32)
    assert dox.stats == before  # the same network session: no export, no graph, no session


def test_a_second_engine_reuses_the_session(onnx_tiny, onnx_cache_env):
    """A new Engine on the same weights (an equal copy) with another plan: the process's session."""
    first = dd.Engine(onnx_tiny, dd.SamplingPlan.build(SCHED, 5, clip_x0=1.0), backend="onnxruntime", device="cpu")
    before = dict(dox.stats)
    files = sorted(onnx_cache_env.iterdir())
    again = dd.Engine(copy.deepcopy(onnx_tiny), dd.SamplingPlan.build(SCHED, 9, eta=0.5, spacing="quad"),
                      backend="onnxruntime", device="cpu")
    assert again._backend.networks[None].runner is first._backend.networks[None].runner
    assert dox.stats == before and sorted(onnx_cache_env.iterdir()) == files
    assert "cached" in dd.Engine(onnx_tiny, dd.SamplingPlan.build(SCHED, 2), device="cpu").backend_reason
    changed = copy.deepcopy(onnx_tiny)  # new weights: a new key, so a new export
    with torch.no_grad():
        changed.conv_out.bias.add_(1e-3)
    assert dox.model_fingerprint(changed) != dox.model_fingerprint(onnx_tiny)
    dd.Engine(changed, dd.SamplingPlan.build(SCHED, 2), backend="onnxruntime", device="cpu")
    assert dox.stats["torch_exports"] == before["torch_exports"] + 1


def test_whole_sampler_options_are_refused_on_a_cpu(onnx_tiny):
    plan = dd.SamplingPlan.build(SCHED, 3)
    for options in ({"unroll": False}, {"unroll": True}, {"cuda_graph": True}):
        with pytest.raises(ValueError, match=r"whole-sampler graphs of the CUDA path; on a CPU .* drop it"):
            dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu", onnx_options=options)
    with pytest.raises(ValueError, match=r"unknown onnx_options 'table_inputs'.* takes opset, threads, unroll"):
        dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu", onnx_options={"table_inputs": True})
    eng = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu", onnx_options={"threads": 1})
    assert eng._backend.networks[None].threads == 1


# -- the CUDA path's whole-sampler graphs (run here on the CPU EP) ------------------------------------------
def test_whole_sampler_graphs_are_built_per_direction_on_first_use(onnx_tiny):
    """An encode builds the inversion graph only, never a sampling graph it would not use."""
    plan = dd.SamplingPlan.build(SCHED, 3)
    graphs = SamplerGraphs(onnx_tiny, torch.float32, shape=(3, 16, 16), device="cpu")
    assert graphs.paths == {} and not graphs._runners  # nothing built on construction
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    inv = plan.inverse()
    got = graphs.run(x0, inv, seed=0, noise=None, first_index=0)
    assert set(graphs.paths) == {"invert"} and len(graphs._runners) == 1
    assert dox.onnx_metadata(graphs.paths["invert"])["plan"]["direction"] == "invert"
    truth = dd.invert(_float64(onnx_tiny), x0.double(), inv)
    assert_close_to_reference(got, dd.invert(onnx_tiny, x0, inv), truth, torch.float32, "whole-sampler inversion")
    noisy = dd.SamplingPlan.build(SCHED, 3, eta=0.5)
    x_T = dd.rng.initial_noise(4, (2, 3, 16, 16))
    got = graphs.run(x_T, noisy, seed=4, noise=None, first_index=0)
    assert set(graphs.paths) == {"invert", "sample"}
    assert_close_to_reference(got, dd.sample(onnx_tiny, x_T, noisy, seed=4), _truth(onnx_tiny, x_T, noisy, seed=4),
                              torch.float32, "whole-sampler graph, host noise")


def test_host_noise_is_the_seeded_stream():
    plan = dd.SamplingPlan.build(SCHED, 4, variance="large")  # no noise on the last step
    z = host_noise(plan, 11, (2, 1, 4, 4), first_index=3)
    for i in range(3):
        assert torch.equal(z[i], dd.rng.step_noise(11, i, (2, 1, 4, 4), first_index=3))
    assert torch.equal(z[3], torch.zeros(2, 1, 4, 4))


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
    runner = backend.graphs.runner(plan)
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
