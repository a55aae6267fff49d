"""The Engine: backend choice and errors, and every backend against the reference sampler."""

import copy

import pytest
import torch
from conftest import assert_close_to_reference

import ddim_fast as dd
from ddim_fast.engine import BackendUnavailable
from ddim_fast.models.analytic import GaussianEps

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def analytic():
    return GaussianEps(SCHED)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = dd.UNet(dd.UNetConfig.tiny())
    m.schedule = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
    return m


def _plan(S=10, **kw):
    return dd.SamplingPlan.build(SCHED, S, **kw)


# -- choice and errors --------------------------------------------------------------------------------
def test_auto_on_cpu_picks_onnxruntime_when_installed(analytic, monkeypatch):
    import ddim_fast.engine as engine

    monkeypatch.setattr(engine, "onnxruntime_status", lambda device: None)
    backend, reason = engine._choose_backend("auto", torch.device("cpu"))
    assert backend == "onnxruntime" and "ONNX Runtime" in reason
    monkeypatch.setattr(engine, "onnxruntime_status", lambda device: "onnxruntime is not installed")
    eng = dd.Engine(analytic, _plan(), shape=SHAPE, device="cpu")
    assert eng.backend == "reference" and "without onnxruntime" in eng.backend_reason


def test_explicit_backends_that_cannot_run_say_what_is_missing(analytic, monkeypatch):
    with pytest.raises(BackendUnavailable, match="cuda_graph backend needs a CUDA device"):
        dd.Engine(analytic, _plan(), backend="cuda_graph", shape=SHAPE, device="cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match=r"needs a CUDA device, or TRITON_INTERPRET=1|Triton is not installed"):
        dd.Engine(analytic, _plan(), backend="triton", shape=SHAPE, device="cpu")
    import ddim_fast.engine as engine

    monkeypatch.setattr(engine, "onnxruntime_status", lambda d: "onnxruntime is not installed: pip install x")
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


# -- triton (interpreter on CPU) against the reference ---------------------------------------------------
def _truth_and_low(model, plan, x_T, seed, dtype):
    truth = dd.sample(copy.deepcopy(model).double(), x_T.double(), plan, seed=seed).clamp(-1, 1)
    low = dd.Engine(model, plan, backend="reference", dtype=dtype, device=x_T.device)(x_T, seed=seed)
    return truth, low


@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_triton_backend_matches_reference(tiny, eta):
    """Issue 4's end-to-end check: fused ops + fused step (in-kernel noise) vs the reference."""
    pytest.importorskip("triton")
    plan = dd.SamplingPlan.build(tiny.schedule, 2, eta=eta)  # the interpreter is slow: 2 steps
    x_T = dd.rng.initial_noise(4, (2, 3, 16, 16))
    eng = dd.Engine(tiny, plan, backend="triton", device="cpu")
    got = eng.sample(2, seed=4) if eta else eng(x_T, seed=4)  # sample(): x_T drawn in-kernel
    truth, low = _truth_and_low(tiny, plan, x_T, 4, torch.float32)
    assert_close_to_reference(got, low, truth, torch.float32, f"triton eta={eta}")


def test_triton_backend_inverts_like_reference(analytic):
    pytest.importorskip("triton")
    plan = _plan(5)
    x0 = 0.3 + 0.2 * torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    got = dd.Engine(analytic, plan, shape=SHAPE, backend="triton", device="cpu").invert(x0)
    low = dd.Engine(analytic, plan, shape=SHAPE, backend="reference", device="cpu").invert(x0)
    truth = dd.invert(analytic, x0.double(), plan)
    assert_close_to_reference(got, low, truth, torch.float32, "triton invert")


# -- GPU tier ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_replay_matches_eager_triton_and_reference(tiny, dtype):
    plan = dd.SamplingPlan.build(tiny.schedule, 10, eta=0.5)
    x_T = dd.rng.initial_noise(1, (3, 3, 16, 16), device="cuda")
    graph = dd.Engine(tiny, plan, backend="cuda_graph", device="cuda", dtype=dtype)
    eager = dd.Engine(tiny, plan, backend="triton", device="cuda", dtype=dtype)
    g, e = graph(x_T, seed=1), eager(x_T, seed=1)
    truth, low = _truth_and_low(tiny, plan, x_T, 1, dtype)
    assert_close_to_reference(g, low, truth, dtype, "cuda_graph")
    assert_close_to_reference(e, low, truth, dtype, "triton eager")
    assert (g - e).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_graph_cache_seeds_batches_and_held_results(tiny):
    plan = dd.SamplingPlan.build(tiny.schedule, 5, eta=1.0)
    eng = dd.Engine(tiny, plan, backend="cuda_graph", device="cuda")
    a = eng.sample(2, seed=1)
    held = a.clone()
    b = eng.sample(2, seed=2)
    assert eng.graph_captures == 1  # a new seed replays the same graph ...
    assert (a - b).abs().max() > 1e-2  # ... and gives another sample
    assert torch.equal(a, held)  # the replay did not overwrite the result the caller holds
    c = eng.sample(2, seed=1, first_index=7)
    assert eng.graph_captures == 1  # first_index lives in device memory too
    eager = dd.Engine(tiny, plan, backend="triton", device="cuda").sample(2, seed=1, first_index=7)
    torch.testing.assert_close(c, eager, rtol=0, atol=1e-5)
    eng.sample(3, seed=1)
    assert eng.graph_captures == 2  # a new batch size captures a new graph
    eng(dd.rng.initial_noise(1, (2, 3, 16, 16), device="cuda"), seed=1)
    assert eng.graph_captures == 3  # so does a given x_T (its own start)
    assert torch.equal(eng.sample(2, seed=1), held)  # replays are deterministic


@pytest.mark.gpu
def test_graph_inversion_matches_reference(tiny):
    plan = dd.SamplingPlan.build(tiny.schedule, 8)
    x0 = torch.rand(2, 3, 16, 16, device="cuda") * 2 - 1
    got = dd.Engine(tiny, plan, backend="cuda_graph", device="cuda").invert(x0)
    low = dd.Engine(tiny, plan, backend="reference", device="cuda").invert(x0)
    truth = dd.invert(copy.deepcopy(tiny).double().cuda(), x0.double(), plan)
    assert_close_to_reference(got, low, truth, torch.float32, "cuda_graph invert")


@pytest.mark.gpu
def test_fp16_sampling_psnr_against_fp32():
    """fp16 network, fp32 state: within 40 dB PSNR of fp32 after 50 steps (the bundled model)."""
    model = dd.load_model("digits")
    plan = dd.SamplingPlan.build(model.schedule, 50, prediction=model.prediction)
    a = dd.Engine(model, plan, backend="cuda_graph", device="cuda", dtype=torch.float32).sample(16, seed=0)
    b = dd.Engine(model, plan, backend="cuda_graph", device="cuda", dtype=torch.float16).sample(16, seed=0)
    mse = (a - b).pow(2).mean().item()
    psnr = 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-20))).item()  # peak-to-peak range 2
    assert psnr >= 40, psnr


# -- the graph runner's bookkeeping on CPU, with a stand-in for the CUDA graph -------------------------
class _ReplayBody:
    """Stands in for torch.cuda.CUDAGraph: replay() re-runs the captured body eagerly. It checks
    the runner's cache, static buffers and copies on a CPU; the real capture is the GPU tier."""

    def __init__(self, body):
        self.replay = body


def test_graph_runner_bookkeeping(analytic, monkeypatch):
    pytest.importorskip("triton")  # the runner's fused step kernel (in the interpreter here)
    from ddim_fast import engine

    monkeypatch.setattr(engine._GraphRunner, "_warm_up", lambda self, body: body())
    monkeypatch.setattr(engine._GraphRunner, "_record", lambda self, body: _ReplayBody(body))
    plan = _plan(4, eta=1.0)
    runner = engine._GraphRunner(copy.deepcopy(analytic), torch.device("cpu"), torch.float32, False,
                                 fused=True, max_graphs=2)
    ref = dd.Engine(analytic, plan, shape=SHAPE, backend="reference", device="cpu")
    a = runner.sample(2, SHAPE, plan, seed=1, first_index=0)
    held = a.clone()
    b = runner.sample(2, SHAPE, plan, seed=2, first_index=3)
    assert runner.captures == 1 and torch.equal(a, held)  # new seed / first_index: same graph
    torch.testing.assert_close(b.clamp(-1, 1), ref.sample(2, seed=2, first_index=3), rtol=0, atol=1e-5)
    runner.sample(3, SHAPE, plan, seed=1, first_index=0)
    runner.run(a, plan, seed=1, noise=None, first_index=0)
    assert runner.captures == 3 and len(runner.graphs) == 2  # new batch, new start; LRU cap of 2
    assert torch.equal(runner.sample(2, SHAPE, plan, seed=1, first_index=0), held)


def test_onnx_options_only_with_onnxruntime(analytic):
    with pytest.raises(ValueError, match="onnx_options apply to the onnxruntime backend only"):
        dd.Engine(analytic, _plan(), shape=SHAPE, backend="reference", onnx_options={"threads": 1})
