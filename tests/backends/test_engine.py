"""The Engine: backend choice and errors, inputs, the reference backend, batches in chunks (each other
backend has its own test file: test_backend_*.py)."""

import copy

import pytest
import torch

import ddim_fast as dd
from ddim_fast.engine import BackendUnavailable, batch_chunks
from tests.helpers import assert_close_to_reference

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
SHAPE = (3, 8, 8)


def _plan(S=10, **kw):
    return dd.SamplingPlan.build(SCHED, S, **kw)


# -- choice and errors --------------------------------------------------------------------------------
def test_auto_on_cpu_picks_onnxruntime_when_installed(analytic, monkeypatch):
    import ddim_fast.engine as engine
    from ddim_fast.backends.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setattr(OnnxRuntimeBackend, "unavailable", classmethod(lambda cls, device: None))
    backend, reason = engine.choose_backend("auto", torch.device("cpu"))
    assert backend == "onnxruntime" and "ONNX Runtime" in reason
    monkeypatch.setattr(OnnxRuntimeBackend, "unavailable",
                        classmethod(lambda cls, device: "onnxruntime is not installed"))
    eng = dd.Engine(analytic, _plan(), shape=SHAPE, device="cpu")
    assert eng.backend == "reference" and "without onnxruntime" in eng.backend_reason


def test_explicit_backends_that_cannot_run_say_what_is_missing(analytic, monkeypatch):
    with pytest.raises(BackendUnavailable, match="cuda_graph backend needs a CUDA device"):
        dd.Engine(analytic, _plan(), backend="cuda_graph", shape=SHAPE, device="cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match=r"needs a CUDA device, or TRITON_INTERPRET=1|Triton is not installed"):
        dd.Engine(analytic, _plan(), backend="triton", shape=SHAPE, device="cpu")
    from ddim_fast.backends.onnxruntime import OnnxRuntimeBackend

    monkeypatch.setattr(OnnxRuntimeBackend, "unavailable",
                        classmethod(lambda cls, d: "onnxruntime is not installed: pip install x"))
    with pytest.raises(BackendUnavailable, match="pip install"):
        dd.Engine(analytic, _plan(), backend="onnxruntime", shape=SHAPE, device="cpu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="tensorrt"), "unknown backend"),
        (dict(dtype=torch.float64), "dtype must be"),
        (dict(max_graphs=0), "max_graphs must be"),
        (dict(shape=None), "pass shape="),
        (dict(shape=(3, 8)), r"shape must be \(C, H, W\)"),
    ],
)
def test_bad_construction(analytic, kwargs, match):
    kw = dict(shape=SHAPE, device="cpu", backend="reference") | kwargs
    with pytest.raises(ValueError, match=match):
        dd.Engine(analytic, _plan(), **kw)


def test_plan_must_match_the_model(analytic, tiny):
    with pytest.raises(ValueError, match="inversion plan"):
        dd.Engine(analytic, _plan().inverse(), shape=SHAPE, backend="reference")
    with pytest.raises(ValueError, match="build the plan with prediction='eps'"):
        dd.Engine(tiny, _plan(prediction="v"), backend="reference")


def test_bad_inputs(analytic):
    eng = dd.Engine(analytic, _plan(eta=0.5), shape=SHAPE, backend="reference", device="cpu")
    with pytest.raises(ValueError, match=r"x_T must have shape \(B, 3, 8, 8\)"):
        eng(torch.zeros(2, 3, 8, 9))
    with pytest.raises(ValueError, match="NaN or inf"):
        eng(torch.full((1, *SHAPE), float("nan")))
    with pytest.raises(ValueError, match="not both"):
        eng(torch.zeros(1, *SHAPE), seed=1, noise=torch.zeros(10, 1, *SHAPE))
    with pytest.raises(ValueError, match=r"noise must have shape \(steps, \*x_T.shape\)"):
        eng(torch.zeros(1, *SHAPE), noise=torch.zeros(9, 1, *SHAPE))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        eng.sample(0)
    with pytest.raises(ValueError, match="first_index must be"):
        eng.sample(1, first_index=-1)
    with pytest.raises(ValueError, match="seed must be an int"):
        eng.sample(1, seed=-3)


# -- the reference backend ------------------------------------------------------------------------------
def test_reference_engine_is_the_reference_sampler(analytic):
    plan = _plan(eta=0.7, clip_x0=1.0)
    eng = dd.Engine(analytic, plan, shape=SHAPE, backend="reference", device="cpu")
    got = eng.sample(4, seed=9, first_index=3)
    x_T = dd.rng.initial_noise(9, (4, *SHAPE), first_index=3)
    want = dd.sample(analytic, x_T, plan, seed=9, first_index=3).clamp(-1, 1)
    assert torch.equal(got, want)
    assert got.dtype == torch.float32 and got.abs().max() <= 1


def test_engine_is_batch_invariant(tiny):
    eng = dd.Engine(tiny, dd.SamplingPlan.build(tiny.schedule, 3, eta=1.0), backend="reference", device="cpu")
    full = eng.sample(3, seed=5)
    for k in range(3):  # same noise exactly; the convolutions round differently per batch size
        torch.testing.assert_close(eng.sample(1, seed=5, first_index=k)[0], full[k], rtol=0, atol=1e-4)


def test_engine_leaves_the_callers_model_alone(tiny):
    before = copy.deepcopy(tiny.state_dict())
    dd.Engine(tiny, dd.SamplingPlan.build(tiny.schedule, 2), backend="reference", dtype=torch.bfloat16,
              channels_last=True).sample(1)
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())
    assert next(tiny.parameters()).dtype == torch.float32 and tiny.ops.name == "reference"


def test_invert_then_sample_reconstructs(analytic):
    eng = dd.Engine(analytic, _plan(200), shape=SHAPE, backend="reference", device="cpu")
    x0 = 0.3 + 0.2 * torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    x_T = eng.invert(x0)
    assert x_T.abs().max() > 1  # latents are not clamped
    assert (eng(x_T) - x0).pow(2).mean() < 1e-4


def test_bf16_network_keeps_an_fp32_state(tiny):
    plan = dd.SamplingPlan.build(tiny.schedule, 3)
    out32 = dd.Engine(tiny, plan, backend="reference").sample(2)
    out16 = dd.Engine(tiny, plan, backend="reference", dtype=torch.bfloat16, channels_last=True).sample(2)
    assert out16.dtype == torch.float32
    assert 0 < (out16 - out32).abs().max() < 0.25


# -- batches above the kernels' grid limit ---------------------------------------------------------------
def test_batch_chunks_are_near_equal_and_cover_the_batch():
    assert batch_chunks(5, None) == [(0, 5)] and batch_chunks(5, 5) == [(0, 5)]
    assert batch_chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert batch_chunks(70000, 65535) == [(0, 35000), (35000, 70000)]  # one graph serves both halves
    for n in range(1, 30):
        for limit in range(1, 9):
            chunks = batch_chunks(n, limit)
            assert chunks[0][0] == 0 and chunks[-1][1] == n and len(chunks) == -(-n // limit)
            assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
            sizes = [hi - lo for lo, hi in chunks]
            assert max(sizes) <= limit and all(s == sizes[0] for s in sizes[:-1]) and 0 < sizes[-1] <= sizes[0]


def test_engine_runs_batches_above_the_kernel_limit_in_chunks(analytic, monkeypatch):
    """With the step kernel's limit lowered to 2 samples (its launcher refuses 3), every entry point
    of the triton backend still takes 5 samples: in chunks, with the same images as one batch."""
    from ddim_fast.kernels import ddim_step as step_mod

    monkeypatch.setattr(step_mod, "MAX_BATCH", 2)
    plan = _plan(4, eta=0.6)
    eng = dd.Engine(analytic, plan, shape=SHAPE, backend="triton", device="cpu")
    ref = dd.Engine(analytic, plan, shape=SHAPE, backend="reference", device="cpu")
    assert eng.max_batch == 2 and ref.max_batch is None
    x_T = dd.rng.initial_noise(3, (5, *SHAPE), first_index=1)
    truth = dd.sample(copy.deepcopy(analytic).double(), x_T.double(), plan, seed=3, first_index=1).clamp(-1, 1)
    got = eng.sample(5, seed=3, first_index=1)
    assert_close_to_reference(got, ref.sample(5, seed=3, first_index=1), truth, torch.float32, "sample in chunks")
    torch.testing.assert_close(eng(x_T, seed=3, first_index=1), got, rtol=0, atol=1e-6)
    noise = torch.randn(4, 5, *SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eng(x_T, noise=noise), ref(x_T, noise=noise), rtol=0, atol=1e-5)
    inv_plan = _plan(4)
    x0 = 0.3 + 0.2 * torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    inv = dd.Engine(analytic, inv_plan, shape=SHAPE, backend="triton", device="cpu").invert(x0)
    want = dd.Engine(analytic, inv_plan, shape=SHAPE, backend="reference", device="cpu").invert(x0)
    torch.testing.assert_close(inv, want, rtol=0, atol=1e-5)


def test_onnx_options_only_with_onnxruntime(analytic):
    with pytest.raises(ValueError, match="onnx_options apply to the onnxruntime backend only"):
        dd.Engine(analytic, _plan(), shape=SHAPE, backend="reference", onnx_options={"threads": 1})
    with pytest.raises(ValueError, match=r"unknown onnx_options 'log'; the onnxruntime backend takes opset, threads"):
        dd.Engine(analytic, _plan(), shape=SHAPE, backend="reference", onnx_options={"log": print})
    with pytest.raises(ValueError, match="onnx_options must be a dict"):
        dd.Engine(analytic, _plan(), shape=SHAPE, onnx_options=["threads"])
    # auto may pick another backend (here bfloat16 rules onnxruntime out): its options are then unused
    eng = dd.Engine(analytic, _plan(), shape=SHAPE, device="cpu", dtype=torch.bfloat16, onnx_options={"threads": 1})
    assert eng.backend == "reference"


# -- a plan per call --------------------------------------------------------------------------------------
def test_a_plan_per_call_is_that_plans_sampler(analytic):
    """sample / __call__ / invert with plan=: the same numbers as an Engine built with that plan."""
    eng = dd.Engine(analytic, _plan(10), shape=SHAPE, backend="reference", device="cpu")
    for plan in (_plan(4, eta=0.7), _plan(6, spacing="quad", clip_x0=1.0), _plan(5, sampler="unipc")):
        own = dd.Engine(analytic, plan, shape=SHAPE, backend="reference", device="cpu")
        assert torch.equal(eng.sample(3, seed=2, first_index=1, plan=plan), own.sample(3, seed=2, first_index=1))
        x_T = dd.rng.initial_noise(5, (2, *SHAPE))
        noise = torch.randn(plan.steps, 2, *SHAPE, generator=torch.Generator().manual_seed(0))
        assert torch.equal(eng(x_T, noise=noise, plan=plan), own(x_T, noise=noise))  # noise of the call's plan
    x0 = 0.3 + 0.2 * torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    inv = _plan(7)
    assert torch.equal(eng.invert(x0, plan=inv, eps_at="target"),
                       dd.Engine(analytic, inv, shape=SHAPE, backend="reference").invert(x0, eps_at="target"))
    assert torch.equal(eng.sample(2, seed=1), dd.Engine(analytic, _plan(10), shape=SHAPE, backend="reference",
                                                        device="cpu").sample(2, seed=1))  # the engine's own plan
    with pytest.raises(ValueError, match=r"noise must have shape \(steps, \*x_T.shape\) = \(4,"):
        eng(x_T, noise=torch.zeros(10, 2, *SHAPE), plan=_plan(4))


def test_a_plan_per_call_is_checked(analytic):
    eng = dd.Engine(analytic, _plan(), shape=SHAPE, backend="reference", device="cpu")
    with pytest.raises(ValueError, match="plan= must be a sampling SamplingPlan"):
        eng.sample(1, plan=_plan().inverse())
    with pytest.raises(ValueError, match="plan= must be a sampling SamplingPlan"):
        eng.sample(1, plan={"steps": 10})
    with pytest.raises(ValueError, match="build the plan with prediction='eps'"):
        eng(torch.zeros(1, *SHAPE), plan=_plan(prediction="v"))
    with pytest.raises(ValueError, match="plan= must be a sampling SamplingPlan"):
        eng.invert(torch.zeros(1, *SHAPE), plan=_plan().inverse())
