"""The Engine: backend choice and errors, and every backend against the reference sampler."""

import copy

import pytest
import torch
from conftest import assert_close_to_reference

import ddim_fast as dd
from ddim_fast.engine import BackendUnavailable, batch_chunks
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


# -- triton (interpreter on CPU) against the reference ---------------------------------------------------
def _truth_and_low(model, plan, x_T, seed, dtype):
    """The float64 truth and the reference in `dtype`, both on x_T's device (the model may be on the CPU)."""
    truth = dd.sample(copy.deepcopy(model).double().to(x_T.device), x_T.double(), plan, seed=seed).clamp(-1, 1)
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


# -- cuDNN / TF32 settings are the caller's ----------------------------------------------------------------
class _FakeStream:
    def wait_stream(self, other):
        pass


@pytest.mark.parametrize("deterministic", [False, True])
def test_graph_warm_up_leaves_cudnn_and_tf32_settings_alone(analytic, monkeypatch, deterministic):
    """Warm-up turns on cuDNN's algorithm search for itself only (not at all under determinism);
    TF32, deterministic and enabled stay what the caller set (cudnn.flags() reset them)."""
    import contextlib

    from ddim_fast.backends import cuda_graph

    b = torch.backends
    saved = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark)
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark = (
        False, True, deterministic, False)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    seen = {}

    def body():
        seen.update(benchmark=b.cudnn.benchmark, conv_tf32=b.cudnn.allow_tf32, matmul_tf32=b.cuda.matmul.allow_tf32,
                    deterministic=b.cudnn.deterministic, enabled=b.cudnn.enabled)

    try:
        cuda_graph.warm_up(body, torch.device("cpu"))
        after = (b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic)
    finally:
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark = saved
    assert seen == dict(benchmark=not deterministic, conv_tf32=False, matmul_tf32=True, deterministic=deterministic,
                        enabled=b.cudnn.enabled)
    assert after == (False, False, True, deterministic)  # benchmark restored, the rest never touched


# -- GPU tier ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_replay_matches_eager_triton_and_reference(tiny, dtype, exact_cuda):
    plan = dd.SamplingPlan.build(tiny.schedule, 10, eta=0.5)
    x_T = dd.rng.initial_noise(1, (3, 3, 16, 16), device="cuda")
    graph = dd.Engine(tiny, plan, backend="cuda_graph", device="cuda", dtype=dtype)
    eager = dd.Engine(tiny, plan, backend="triton", device="cuda", dtype=dtype)
    g, e = graph(x_T, seed=1), eager(x_T, seed=1)
    truth, low = _truth_and_low(tiny, plan, x_T, 1, dtype)
    assert_close_to_reference(g, low, truth, dtype, "cuda_graph")
    assert_close_to_reference(e, low, truth, dtype, "triton eager")
    assert (g - e).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)  # same kernels, same algorithms
    assert torch.equal(graph(x_T, seed=1), g) and graph.graph_captures == 1  # a replay repeats itself


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_captures_dynamic_thresholding(tiny, dtype, exact_cuda):
    """A threshold plan (a per-sample quantile of |x0| every step, from the order-statistics
    kernel: no sort in the graph) captured and replayed: equal to the eager triton run, within the
    rule of the reference, and the thresholding really bites (s > 1 on the early steps)."""
    plan = dd.SamplingPlan.build(tiny.schedule, 8, eta=0.5, threshold=0.9, threshold_max=1.5)
    x_T = dd.rng.initial_noise(5, (3, 3, 16, 16), device="cuda")
    graph = dd.Engine(tiny, plan, backend="cuda_graph", device="cuda", dtype=dtype)
    eager = dd.Engine(tiny, plan, backend="triton", device="cuda", dtype=dtype)
    g, e = graph(x_T, seed=2), eager(x_T, seed=2)
    truth, low = _truth_and_low(tiny, plan, x_T, 2, dtype)
    assert_close_to_reference(g, low, truth, dtype, "cuda_graph threshold")
    assert_close_to_reference(e, low, truth, dtype, "triton threshold")
    assert (g - e).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)
    unclipped = dd.sample(copy.deepcopy(tiny).double().cuda(), x_T.double(),
                          dd.SamplingPlan.build(tiny.schedule, 8, eta=0.5), seed=2).clamp(-1, 1)
    assert (unclipped - truth).abs().max() > 1e-2  # the threshold changed the result
    b = graph.sample(3, seed=7)  # the graph started from the seed (x_T drawn in it)
    assert graph.graph_captures == 2 and torch.equal(graph.sample(3, seed=7), b)
    assert (b - eager.sample(3, seed=7)).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_graph_cache_seeds_batches_and_held_results(tiny, exact_cuda):
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
def test_graph_inversion_matches_reference(tiny, exact_cuda):
    plan = dd.SamplingPlan.build(tiny.schedule, 8)
    x0 = torch.rand(2, 3, 16, 16, device="cuda") * 2 - 1
    got = dd.Engine(tiny, plan, backend="cuda_graph", device="cuda").invert(x0)
    low = dd.Engine(tiny, plan, backend="reference", device="cuda").invert(x0)
    truth = dd.invert(copy.deepcopy(tiny).double().cuda(), x0.double(), plan)
    assert_close_to_reference(got, low, truth, torch.float32, "cuda_graph invert")


@pytest.mark.gpu
def test_fp16_sampling_psnr_against_fp32(exact_cuda):
    """fp16 network, fp32 state: within 40 dB PSNR of fp32 (TF32 off) after 50 steps (the bundled
    model). NOTE: the reference backend on the CPU gives 67.9 dB for fp16 (45.5 for bf16)."""
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
    from ddim_fast.backends.cuda_graph import CudaGraphBackend

    monkeypatch.setattr(CudaGraphBackend, "_warm_up", lambda self, body: body())
    monkeypatch.setattr(CudaGraphBackend, "_record", lambda self, body: _ReplayBody(body))
    plan = _plan(4, eta=1.0)
    runner = CudaGraphBackend(analytic, plan, device=torch.device("cpu"), dtype=torch.float32, shape=SHAPE,
                              max_graphs=2)
    ref = dd.Engine(analytic, plan, shape=SHAPE, backend="reference", device="cpu")
    a = runner.sample(2, plan, seed=1, first_index=0)
    held = a.clone()
    b = runner.sample(2, plan, seed=2, first_index=3)
    assert runner.captures == 1 and torch.equal(a, held)  # new seed / first_index: same graph
    torch.testing.assert_close(b.clamp(-1, 1), ref.sample(2, seed=2, first_index=3), rtol=0, atol=1e-5)
    runner.sample(3, plan, seed=1, first_index=0)
    runner.run(a, plan, seed=1, noise=None, first_index=0)
    assert runner.captures == 3 and len(runner.graphs) == 2  # new batch, new start; LRU cap of 2
    assert torch.equal(runner.sample(2, plan, seed=1, first_index=0), held)


def test_graph_engine_with_chunks_and_thresholding_on_cpu(analytic, monkeypatch):
    """The cuda_graph Engine on a CPU (capture replaced by replaying the body, as the GPU suite's
    dry run does): a threshold plan runs through the captured body, 5 samples above a limit of 2
    run as 2 + 2 + 1 with one graph for both 2s, and the result is the reference's."""
    from ddim_fast import engine
    from ddim_fast.backends.cuda_graph import CudaGraphBackend
    from ddim_fast.kernels import ddim_step as step_mod

    monkeypatch.setattr(step_mod, "MAX_BATCH", 2)
    monkeypatch.setattr(engine, "choose_backend", lambda backend, device: ("cuda_graph", "test: replayed body"))
    monkeypatch.setattr(CudaGraphBackend, "_warm_up", lambda self, body: body())
    monkeypatch.setattr(CudaGraphBackend, "_record", lambda self, body: _ReplayBody(body))
    plan = _plan(4, eta=0.5, threshold=0.8, threshold_max=1.3)
    eng = dd.Engine(GaussianEps(SCHED, mu=0.8, std=1.5), plan, shape=SHAPE, device="cpu")  # wide: s > 1
    got = eng.sample(5, seed=4)
    assert eng.graph_captures == 2 and eng.max_batch == 2
    model = GaussianEps(SCHED, mu=0.8, std=1.5)
    x_T = dd.rng.initial_noise(4, (5, *SHAPE))
    low = dd.sample(model, x_T, plan, seed=4).clamp(-1, 1)
    truth = dd.sample(model.double(), x_T.double(), plan, seed=4).clamp(-1, 1)
    assert_close_to_reference(got, low, truth, torch.float32, "graph body, threshold, chunks")
    plain = dd.sample(model.double(), x_T.double(), _plan(4, eta=0.5), seed=4).clamp(-1, 1)
    assert (plain - truth).abs().max() > 1e-2  # the thresholding bit


def test_onnx_options_only_with_onnxruntime(analytic):
    with pytest.raises(ValueError, match="onnx_options apply to the onnxruntime backend only"):
        dd.Engine(analytic, _plan(), shape=SHAPE, backend="reference", onnx_options={"threads": 1})
