"""The tuner (ddim_fast/tune.py) on small models, and a tuned plan on every backend.

The tuner's runs here are tiny (a dozen noise samples, a 24-40 step teacher): they check what it does and
records, not how good the bundled plans are (their recorded held-out scores are checked in
test_plan_files.py, the measured quality on docs/benchmarks.md). Every backend runs a tuned plan, one whose
timesteps are explicit and whose table is clearly not any sampler's analytic table, under docs/DESIGN.md's
tolerance rule, batch-invariant as tests/test_determinism.py checks the untuned ones."""

import copy
from dataclasses import replace

import pytest
import torch

import ddim_fast as dd
from ddim_fast import tune
from ddim_fast.fingerprint import model_fingerprint
from ddim_fast.models.analytic import GaussianEps
from ddim_fast.onnx.graph import structure
from tests.helpers import assert_close_to_reference

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
GSHAPE = (1, 4, 4)


def _bitwise(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# -- the tuner ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian_tuned():
    model = GaussianEps(SCHED)
    plan = dd.tune_plan(model, 4, samples=12, held_out=12, seed=5, teacher_steps=40, grid=12, iterations=12,
                        check_every=3, shape=GSHAPE, progress=False)
    return model, plan


def test_tuned_plan_records_how_it_was_made_and_scores_what_it_says(gaussian_tuned):
    model, plan = gaussian_tuned
    rec = plan.describe()["tuned"]
    assert rec["model"]["fingerprint"] == model_fingerprint(model)
    assert (rec["sampler"], rec["steps"], rec["samples"], rec["held_out"], rec["seed"]) == ("unipc", 4, 12, 12, 5)
    assert rec["teacher"] == {"sampler": "unipc", "steps": 40, "spacing": "trailing"}
    assert set(rec["held_out_mse"]) == {"untuned", "timesteps", "table"} and rec["grid"] <= 12
    assert rec["seconds"]["total"] >= rec["seconds"]["timesteps"] > 0
    # the exact denoiser's ODE: the searched timesteps are far better than trailing ones
    assert rec["kept"][:1] == ["timesteps"] and rec["held_out_mse"]["timesteps"] < 0.05 * rec["held_out_mse"]["untuned"]
    assert plan.spacing == "explicit" and plan.timesteps.tolist()[0] == 999
    assert (plan.timesteps[1:] < plan.timesteps[:-1]).all() and plan.timesteps.tolist() == rec["stage1_timesteps"]
    # the recorded held-out score is the plan's distance to an independent teacher from the held-out noise
    x_T = dd.rng.initial_noise(5, (24, *GSHAPE))[12:]
    teacher = dd.sample(model, x_T, dd.SamplingPlan.build(SCHED, 40, sampler="unipc", spacing="trailing"))
    final = rec["kept"][-1]
    got = float(((dd.sample(model, x_T, plan) - teacher) ** 2).mean())
    assert got == pytest.approx(rec["held_out_mse"][final], rel=1e-4)
    assert structure(plan) == structure(dd.SamplingPlan.build(SCHED, 4, sampler="unipc", spacing="trailing"))


def test_search_finds_the_best_path_of_a_small_grid():
    """DDIM on the exact Gaussian denoiser, a grid of 7 candidates, 3 steps: the search's path (one sample: no
    median) is the best of all 15 paths by final distance, found by trying every one."""
    import itertools

    model = GaussianEps(SCHED, mu=0.2, std=0.7)
    x_T = dd.rng.initial_noise(2, (1, *GSHAPE))
    teacher = tune.run_teacher(model, x_T, SCHED, 60)
    base = dd.SamplingPlan.build(SCHED, 3, spacing="trailing")
    nodes = tune.grid_nodes(teacher, 7, 3)
    found = tune.search_timesteps(model, base, SCHED, teacher, nodes, slice(0, 1))

    def final(ts):
        return float(((dd.sample(model, x_T, tune.build_like(base, SCHED, ts)) - teacher.states[-1]) ** 2).mean())

    paths = [[teacher.timesteps[0]] + [teacher.timesteps[nodes[g]] for g in c]
             for c in itertools.combinations(range(1, len(nodes)), 2)]
    assert len(paths) == 15 and found in paths
    assert final(found) == min(final(p) for p in paths)


def test_refinement_scores_whole_runs_and_never_ends_worse_than_its_best_start():
    """The polish after the search starts from the better of its starts by the training error of whole runs,
    reports that error, and only ever lowers it."""
    model = GaussianEps(SCHED, mu=0.2, std=0.7)
    x_T = dd.rng.initial_noise(3, (6, *GSHAPE))
    teacher = tune.run_teacher(model, x_T, SCHED, 40)
    base = dd.SamplingPlan.build(SCHED, 4, sampler="unipc", spacing="trailing")
    bad = [999, 990, 980, 970]  # all four evaluations at the noise end

    def final(ts):
        return float(((dd.sample(model, x_T, tune.build_like(base, SCHED, ts)) - teacher.states[-1]) ** 2).mean())

    ts, info = tune.refine_timesteps(model, base, SCHED, teacher, [bad, base.timesteps.tolist()], slice(0, 6),
                                     stride=25)
    assert info["start"] == "untuned" and info["moves"] >= 1 and ts[0] == 999 and ts == sorted(ts, reverse=True)
    assert final(ts) == pytest.approx(info["train_mse"], rel=1e-4) and final(ts) < final(base.timesteps.tolist())
    assert len(set(ts)) == 4


def test_table_calibration_fixes_what_timesteps_cannot_and_touches_only_its_entries():
    """DDIM in 3 steps on the exact Gaussian denoiser: every step is linear in (x, m), so per-step corrections of
    the x0 estimate's and the update's weights can all but remove the error the timesteps leave; they change
    only non-zero entries of the calibrated columns, and the best held-out check is what is kept."""
    model = GaussianEps(SCHED, mu=0.2, std=0.7)
    plan = dd.tune_plan(model, 3, sampler="ddim", samples=12, held_out=12, seed=1, teacher_steps=40, grid=12,
                        iterations=30, check_every=3, patience=3, shape=GSHAPE, progress=False)
    rec = plan.meta["tuned"]
    mse, fit = rec["held_out_mse"], rec["fit"]
    assert rec["kept"] == ["timesteps", "table"] and mse["table"] < 0.01 * mse["timesteps"] < 0.01 * mse["untuned"]
    assert fit["history"][0] == {"iteration": 0, "train": None, "held_out": mse["timesteps"]}
    assert mse["table"] == min(h["held_out"] for h in fit["history"])  # the best check is kept
    assert fit["best_iteration"] in [h["iteration"] for h in fit["history"]] and fit["iterations"] <= 30
    before = tune.build_like(plan, SCHED, plan.timesteps.tolist())  # the analytic table of these timesteps
    changed = plan.coef != before.coef
    names = dd.plan.COEF_COLUMNS
    assert bool(changed.any()) and not bool((changed & (before.coef == 0)).any())  # zeros stay zeros
    assert {names[j] for j in changed.nonzero()[:, 1].tolist()} <= set(tune.CALIBRATED) == set(rec["calibrated"]) | {
        "dx", "h1", "h2", "h3"}  # DDIM at eta 0 with an eps model: dx and the history are zero
    x_T = dd.rng.initial_noise(1, (24, *GSHAPE))[12:]
    teacher = dd.sample(model, x_T, dd.SamplingPlan.build(SCHED, 40, sampler="unipc", spacing="trailing"))
    assert float(((dd.sample(model, x_T, plan) - teacher) ** 2).mean()) == pytest.approx(mse["table"], rel=1e-4)


def test_guided_tuning_uses_labels_per_sample_and_records_them():
    torch.manual_seed(0)
    cm = dd.UNet(replace(dd.UNetConfig.tiny(), num_classes=3))
    cm.schedule = SCHED
    plan = dd.tune_plan(cm, 3, guidance=2.0, samples=6, held_out=6, teacher_steps=16, grid=6, stages=1,
                        progress=False)
    rec = plan.meta["tuned"]
    assert rec["guidance"] == 2.0 and rec["cond"] == {"class_labels": "i % 3"} and "table" not in rec["held_out_mse"]
    with pytest.raises(ValueError, match="guidance needs cond"):
        dd.tune_plan(GaussianEps(SCHED), 3, guidance=2.0, shape=GSHAPE, progress=False)


@pytest.mark.parametrize("kw, msg", [
    ({"sampler": "plms"}, "deterministic samplers"), ({"sampler": "dpmpp_2m_sde"}, "deterministic samplers"),
    ({"teacher_steps": 10}, "teacher_steps >= 4 \\* steps"), ({"grid": 4}, "more candidate timesteps"),
    ({"stages": 3}, "stages must be 1"), ({"samples": 1}, ">= 2"), ({"lr": -1.0}, "lr must be > 0"),
])
def test_bad_arguments_are_refused_before_any_work(kw, msg):
    with pytest.raises(ValueError, match=msg):
        dd.tune_plan(GaussianEps(SCHED), 5, shape=GSHAPE, progress=False, **kw)


def test_a_teacher_from_other_noise_is_refused():
    model = GaussianEps(SCHED)
    teacher = tune.run_teacher(model, dd.rng.initial_noise(9, (8, *GSHAPE)), SCHED, 16)
    with pytest.raises(ValueError, match="other noise"):
        dd.tune_plan(model, 3, samples=4, held_out=4, seed=8, teacher_steps=16, grid=6, teacher=teacher,
                     shape=GSHAPE, progress=False)


# -- a tuned plan on every backend -------------------------------------------------------------------------
def tuned_like(schedule, steps=4):
    """A plan as the tuner makes them: explicit timesteps, every calibrated entry of the table moved by a few
    percent (so it is no sampler's analytic table), and a record."""
    base = dd.SamplingPlan.build(schedule, spacing=[999, 610, 240, 60][:steps], sampler="unipc")
    mask = tune.calibration_mask(base).double()
    wiggle = 1 + 0.05 * mask * torch.linspace(-1, 1, base.coef.numel()).reshape(base.coef.shape).double()
    return replace(base, coef=base.coef * wiggle, meta={"tuned": {"steps": steps, "kept": ["timesteps", "table"]}})


def _truth(model, plan, x_T):
    return dd.sample(copy.deepcopy(model).double(), x_T.double(), plan).clamp(-1, 1)


def test_the_fixture_plan_is_not_analytic():
    plan = tuned_like(SCHED)
    analytic = dd.SamplingPlan.build(SCHED, spacing=plan.timesteps.tolist(), sampler="unipc")
    assert (plan.coef - analytic.coef).abs().max() > 1e-3 and plan.describe()["tuned"]["steps"] == 4


def test_reference_backend_runs_a_tuned_plan_batch_invariantly(analytic):
    plan = tuned_like(SCHED)
    shape = (3, 8, 8)
    eng = dd.Engine(analytic, plan, backend="reference", device="cpu", shape=shape)
    full = eng.sample(4, seed=3)
    parts = torch.cat([eng.sample(1, seed=3, first_index=k) for k in range(4)])
    assert _bitwise(parts, full)  # an elementwise network: bitwise at any batch size
    x_T = dd.rng.initial_noise(3, (4, *shape))
    assert_close_to_reference(full, dd.sample(analytic, x_T, plan).clamp(-1, 1), _truth(analytic, plan, x_T),
                              torch.float32, "reference, tuned plan")
    untuned = dd.Engine(analytic, dd.SamplingPlan.build(SCHED, spacing=plan.timesteps.tolist(), sampler="unipc"),
                        backend="reference", device="cpu", shape=shape).sample(4, seed=3)
    assert (untuned - full).abs().max() > 1e-3  # the table is used, not rebuilt


def test_triton_backend_runs_a_tuned_plan(analytic):
    pytest.importorskip("triton")
    plan, shape = tuned_like(SCHED), (3, 8, 8)
    eng = dd.Engine(analytic, plan, backend="triton", device="cpu", shape=shape)
    full = eng.sample(3, seed=2)  # x_T drawn in-kernel, the fused step with its history
    assert _bitwise(torch.cat([eng.sample(2, seed=2), eng.sample(1, seed=2, first_index=2)]), full)
    x_T = dd.rng.initial_noise(2, (3, *shape))
    low = dd.Engine(analytic, plan, backend="reference", device="cpu", shape=shape).sample(3, seed=2)
    assert_close_to_reference(full, low, _truth(analytic, plan, x_T), torch.float32, "triton, tuned plan")


def test_cuda_graph_body_runs_a_tuned_plan_on_cpu(analytic, monkeypatch):
    """The captured loop with capture replaced by replaying its body (benchmarks/fake_cuda.py, as the GPU suite's
    dry run does): the tuned table and timesteps live in the graph's device tensors like any plan's."""
    pytest.importorskip("triton")
    from benchmarks import fake_cuda
    from ddim_fast.backends.cuda_graph import CudaGraphBackend

    fake_cuda.replay_graphs(monkeypatch.setattr)
    plan, shape = tuned_like(SCHED), (3, 8, 8)
    runner = CudaGraphBackend(analytic, plan, device=torch.device("cpu"), dtype=torch.float32, shape=shape)
    a = runner.sample(3, plan, seed=4, first_index=1)
    assert torch.equal(runner.sample(3, plan, seed=4, first_index=1), a) and runner.captures == 1
    x_T = dd.rng.initial_noise(4, (3, *shape), first_index=1)
    want = dd.Engine(analytic, plan, shape=shape, backend="reference", device="cpu").sample(3, seed=4, first_index=1)
    assert_close_to_reference(a.clamp(-1, 1), want, _truth(analytic, plan, x_T), torch.float32, "graph body, tuned")
    one = runner.sample(1, plan, seed=4, first_index=2)[0]
    assert_close_to_reference(one.clamp(-1, 1), want[1], _truth(analytic, plan, x_T)[1], torch.float32, "batch 1")


@pytest.mark.gpu
def test_cuda_graph_runs_a_tuned_plan_on_gpu(tiny, exact_cuda):
    plan = tuned_like(tiny.schedule)
    x_T = dd.rng.initial_noise(3, (3, 3, 16, 16), device="cuda")
    graph = dd.Engine(tiny, plan, backend="cuda_graph", device="cuda")
    eager = dd.Engine(tiny, plan, backend="triton", device="cuda")
    g, e = graph(x_T), eager(x_T)
    truth = dd.sample(copy.deepcopy(tiny).double().cuda(), x_T.double(), plan).clamp(-1, 1)
    low = dd.Engine(tiny, plan, backend="reference", device="cuda")(x_T)
    assert_close_to_reference(g, low, truth, torch.float32, "cuda_graph, tuned plan")
    assert (g - e).abs().max() <= 1e-5 and torch.equal(graph(x_T), g)
    b = graph.sample(3, seed=9)
    assert (graph.sample(1, seed=9, first_index=2)[0] - b[2]).abs().max() <= 1e-5


@pytest.mark.usefixtures("onnx_cache_env")
def test_onnxruntime_takes_a_tuned_plan_without_a_new_export(onnx_tiny):
    """The table graph of an untuned unipc plan of the same layout serves the tuned one: no torch export, no new
    sampler graph, and in one backend not even a new session; within the rule of the reference; bitwise batch
    invariant (unrolled graph)."""
    pytest.importorskip("onnxruntime")
    from ddim_fast.onnx import export as dox

    plan = tuned_like(onnx_tiny.schedule)
    untuned = dd.SamplingPlan.build(onnx_tiny.schedule, 4, sampler="unipc", spacing="trailing")
    first = dd.Engine(onnx_tiny, untuned, backend="onnxruntime", device="cpu")
    before = dict(dox.stats)
    eng = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    assert dox.stats["torch_exports"] == before["torch_exports"]
    assert dox.stats["sampler_builds"] == before["sampler_builds"]
    x_T = dd.rng.initial_noise(6, (4, 3, 16, 16))
    got = eng(x_T)
    low = dd.Engine(onnx_tiny, plan, backend="reference", device="cpu")(x_T)
    assert_close_to_reference(got, low, _truth(onnx_tiny, plan, x_T), torch.float32, "onnxruntime, tuned plan")
    assert _bitwise(torch.cat([eng(x_T[:1]), eng(x_T[1:3]), eng(x_T[3:])]), got)
    # the untuned plan's own backend runs the tuned plan on its existing session
    again = first._backend.run(x_T, plan, seed=0, noise=None, first_index=0).clamp(-1, 1)
    assert len(first._backend.networks) == 1 and _bitwise(again, got)
    assert dox.stats["sampler_builds"] == before["sampler_builds"]
