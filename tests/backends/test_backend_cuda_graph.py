"""backend="cuda_graph" (backends/cuda_graph.py): the captured loop against eager triton and the
reference (GPU tier), and on a CPU its bookkeeping (graph cache, static buffers, chunks) with the capture
replaced by replaying the body, and its warm-up leaving the caller's cuDNN / TF32 settings alone."""

import copy

import pytest
import torch

import ddim_fast as dd
from benchmarks import fake_cuda
from ddim_fast.models.analytic import GaussianEps
from tests.helpers import assert_close_to_reference, truth_and_low

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
SHAPE = (3, 8, 8)


def _plan(S=10, **kw):
    return dd.SamplingPlan.build(SCHED, S, **kw)


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
    truth, low = truth_and_low(tiny, plan, x_T, 1, dtype)
    assert_close_to_reference(g, low, truth, dtype, "cuda_graph")
    assert_close_to_reference(e, low, truth, dtype, "triton eager")
    assert (g - e).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)  # same kernels, same algorithms
    assert torch.equal(graph(x_T, seed=1), g) and graph.graph_captures == 1  # a replay repeats itself


@pytest.mark.gpu
@pytest.mark.parametrize("sampler, kw", [("plms", {}), ("dpmpp_3m", {"threshold": 0.9}), ("unipc", {"order": 3}),
                                         ("dpmpp_2m_sde", {})])
def test_graph_captures_multistep_history(tiny, sampler, kw, exact_cuda):
    """A multistep plan: the whole loop with its history buffer captured; equal to the eager
    triton run and within the rule of the reference, from a given x_T and from the seed, at odd batches;
    a sample does not depend on the batch it is drawn in."""
    plan = dd.SamplingPlan.build(tiny.schedule, 6, spacing="trailing", sampler=sampler, **kw)
    x_T = dd.rng.initial_noise(3, (3, 3, 16, 16), device="cuda")
    graph = dd.Engine(tiny, plan, backend="cuda_graph", device="cuda")
    eager = dd.Engine(tiny, plan, backend="triton", device="cuda")
    g, e = graph(x_T, seed=3), eager(x_T, seed=3)
    truth, low = truth_and_low(tiny, plan, x_T, 3, torch.float32)
    assert_close_to_reference(g, low, truth, torch.float32, f"cuda_graph {sampler}")
    assert (g - e).abs().max() <= 1e-5
    assert torch.equal(graph(x_T, seed=3), g)  # the replay starts from a zeroed history again
    b = graph.sample(3, seed=9)
    assert (b - eager.sample(3, seed=9)).abs().max() <= 1e-5
    assert (graph.sample(1, seed=9, first_index=2)[0] - b[2]).abs().max() <= 1e-5


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
    truth, low = truth_and_low(tiny, plan, x_T, 2, dtype)
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


# -- the graph runner's bookkeeping on CPU, with the dry run's stand-in for the CUDA graph ------------------
def test_graph_runner_bookkeeping(analytic, monkeypatch):
    pytest.importorskip("triton")  # the runner's fused step kernel (in the interpreter here)
    from ddim_fast.backends.cuda_graph import CudaGraphBackend

    fake_cuda.replay_graphs(monkeypatch.setattr)
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


def test_per_call_plans_capture_once_per_plan_content(analytic, monkeypatch):
    """Engine.sample(plan=...): a graph per plan, keyed by the plan's content (an equal plan built again
    replays; plans are made per request), at most max_graphs kept; each replay is its plan's samples."""
    pytest.importorskip("triton")
    fake_cuda.cuda_graph_on_cpu(monkeypatch.setattr)
    fake_cuda.replay_graphs(monkeypatch.setattr)
    eng = dd.Engine(analytic, _plan(4), shape=SHAPE, backend="cuda_graph", device="cpu", max_graphs=2)
    ref = dd.Engine(analytic, _plan(4), shape=SHAPE, backend="reference", device="cpu")
    plans = [_plan(4), _plan(3, eta=0.5), _plan(5, spacing="quad", clip_x0=1.0)]
    for plan in plans + [_plan(3, eta=0.5)]:  # the last: equal to plans[1], a new object
        got = eng.sample(2, seed=3, plan=plan)
        torch.testing.assert_close(got, ref.sample(2, seed=3, plan=plan), rtol=0, atol=1e-5)
    assert eng.graph_captures == 3 and len(eng._backend.graphs) == 2
    assert len(eng._backend._tables) <= 3  # device tables per plan content, not per object


def test_graph_engine_with_chunks_and_thresholding_on_cpu(analytic, monkeypatch):
    """The cuda_graph Engine on a CPU (capture replaced by replaying the body, as the GPU suite's
    dry run does): a threshold plan runs through the captured body, 5 samples above a limit of 2
    run as 2 + 2 + 1 with one graph for both 2s, and the result is the reference's."""
    from ddim_fast.kernels import ddim_step as step_mod

    monkeypatch.setattr(step_mod, "MAX_BATCH", 2)
    fake_cuda.cuda_graph_on_cpu(monkeypatch.setattr)
    fake_cuda.replay_graphs(monkeypatch.setattr)
    plan = _plan(4, eta=0.5, threshold=0.8, threshold_max=1.3)
    eng = dd.Engine(GaussianEps(SCHED, mu=0.8, std=1.5), plan, shape=SHAPE, backend="cuda_graph",
                    device="cpu")  # wide: s > 1
    got = eng.sample(5, seed=4)
    assert eng.graph_captures == 2 and eng.max_batch == 2
    model = GaussianEps(SCHED, mu=0.8, std=1.5)
    x_T = dd.rng.initial_noise(4, (5, *SHAPE))
    low = dd.sample(model, x_T, plan, seed=4).clamp(-1, 1)
    truth = dd.sample(model.double(), x_T.double(), plan, seed=4).clamp(-1, 1)
    assert_close_to_reference(got, low, truth, torch.float32, "graph body, threshold, chunks")
    plain = dd.sample(model.double(), x_T.double(), _plan(4, eta=0.5), seed=4).clamp(-1, 1)
    assert (plain - truth).abs().max() > 1e-2  # the thresholding bit


@pytest.mark.parametrize("sampler, kw", [("unipc", {"order": 3}), ("plms", {})])
def test_graph_body_with_multistep_history_on_cpu(analytic, monkeypatch, sampler, kw):
    """A multistep plan's captured body on a CPU (capture replaced by replaying the body, as the GPU suite's
    dry run does): every replay starts from a zeroed history (a second replay of one graph gives the same
    samples), at an odd batch, equal to the reference under the tolerance rule; batch-invariant."""
    pytest.importorskip("triton")
    from ddim_fast.backends.cuda_graph import CudaGraphBackend

    fake_cuda.replay_graphs(monkeypatch.setattr)
    plan = _plan(5, spacing="trailing", sampler=sampler, **kw)
    runner = CudaGraphBackend(analytic, plan, device=torch.device("cpu"), dtype=torch.float32, shape=SHAPE)
    a = runner.sample(3, plan, seed=4, first_index=1)
    assert torch.equal(runner.sample(3, plan, seed=4, first_index=1), a) and runner.captures == 1
    want = dd.Engine(analytic, plan, shape=SHAPE, backend="reference", device="cpu").sample(3, seed=4, first_index=1)
    x_T = dd.rng.initial_noise(4, (3, *SHAPE), first_index=1)
    truth = dd.sample(analytic, x_T.double(), plan).clamp(-1, 1)
    assert_close_to_reference(a.clamp(-1, 1), want, truth, torch.float32, f"graph body {sampler}")
    one = runner.sample(1, plan, seed=4, first_index=2)[0]
    assert_close_to_reference(one.clamp(-1, 1), want[1], truth[1], torch.float32, "batch of one")
