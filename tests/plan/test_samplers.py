"""Multistep samplers: plms, dpmpp_2m/3m, dpmpp_2m_sde and unipc as plans of the one update
(**) of plan.py. Exactness against diffusers' schedulers (float32 under the tolerance rule; float64 with
their tables patched to float64, to ~1e-12), DDIM as the first-order member, the errors, and every
backend against the reference (the interpreter for triton, the CPU EP for onnxruntime)."""

import copy
import math
import warnings

import pytest
import torch

import ddim_fast as dd
from ddim_fast.models.analytic import GaussianEps
from ddim_fast.plan import COL
from ddim_fast.precision import atol
from ddim_fast.sampling import sample
from tests.helpers import ToyNet, assert_close_to_reference
from tests.helpers import toy_x as _x

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
MULTISTEP = ("plms", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")


# -- diffusers ----------------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")


class _Float64Torch:
    """`torch` as diffusers' DPM-Solver module sees it in the float64 check: its step casts the sample to
    torch.float32 ('upcast'); here that name means float64, everything else is torch itself."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def _to_float64(s, ac):
    """Patch a scheduler's tables (set_timesteps made them float32) to float64 from alphas_cumprod ac."""
    s.alphas_cumprod = ac
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if float(s.final_alpha_cumprod) == 1 else ac[0]
    if hasattr(s, "sigmas"):
        sig = ((1 - ac[s.timesteps]) / ac[s.timesteps]).sqrt()
        last = 0.0 if float(s.sigmas[-1]) == 0 else float(((1 - ac[0]) / ac[0]).sqrt())
        s.sigmas = torch.cat([sig, torch.tensor([last], dtype=torch.float64)])
        assert s.sigmas.dtype == torch.float64


def _scheduler(sampler, S, spacing, prediction, threshold, lof, final_min):
    """(diffusers scheduler after set_timesteps, our build kwargs) for the same sampler."""
    pred = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[prediction]
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type=pred, timestep_spacing=spacing)
    ours = dict(sampler=sampler, prediction=prediction)
    if sampler == "plms":
        s = diffusers.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=not final_min, **common)
    else:
        extra = dict(lower_order_final=lof, final_sigmas_type="sigma_min" if final_min else "zero")
        if threshold:
            extra.update(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
            ours.update(threshold=0.9, threshold_max=1.5)
        if sampler == "unipc":
            s = diffusers.UniPCMultistepScheduler(solver_order=2, solver_type="bh2", **common, **extra)
        else:
            algo = "sde-dpmsolver++" if sampler == "dpmpp_2m_sde" else "dpmsolver++"
            s = diffusers.DPMSolverMultistepScheduler(solver_order=3 if sampler == "dpmpp_3m" else 2,
                                                      algorithm_type=algo, **common, **extra)
        ours["lower_order_final"] = lof
    if final_min:
        ours["final_alpha"] = float(SCHED.alphas_cumprod[0])
    s.set_timesteps(S)
    return s, ours


def _diffusers_loop(s, model, x, noise=None):
    x = x.clone()
    for i, t in enumerate(s.timesteps):
        m = model(x, t.expand(x.shape[0]))
        kw = {} if noise is None else {"variance_noise": noise[i]}
        x = s.step(m, t, x, **kw).prev_sample
    return x


def _our_plan(s, ours):
    ts = sorted(set(s.timesteps.tolist()), reverse=True) if ours["sampler"] == "plms" else s.timesteps.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # leading spacing's far-start note
        plan = dd.SamplingPlan.build(SCHED, spacing=ts, **ours)
    assert plan.timesteps.tolist() == s.timesteps.tolist()  # plms' repeated first timestep included
    return plan


CASES = [  # sampler, S, spacing, prediction, threshold, lower_order_final, final alpha_bar = alpha_bar[0]
    ("plms", 7, "leading", "eps", False, True, False),
    ("plms", 5, "leading", "v", False, True, True),  # PNDM steps to t - T // S: leading keeps to the list
    ("dpmpp_2m", 6, "trailing", "eps", False, True, False),
    ("dpmpp_2m", 16, "linspace", "v", True, True, False),
    ("dpmpp_2m", 7, "leading", "x0", False, False, True),
    ("dpmpp_3m", 8, "linspace", "eps", True, True, False),
    ("dpmpp_3m", 16, "trailing", "eps", False, True, True),
    ("dpmpp_3m", 6, "trailing", "v", False, False, False),
    ("dpmpp_2m_sde", 7, "trailing", "eps", False, True, False),
    ("unipc", 6, "trailing", "eps", False, True, False),
    ("unipc", 16, "linspace", "x0", True, True, True),
    ("unipc", 9, "leading", "v", False, True, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_equals_diffusers(case, monkeypatch):
    """The final sample of diffusers' scheduler loop, same model and timesteps: float32 under the tolerance
    rule (the truth is diffusers in float64), and float64 to 1e-12 relative (a wrong coefficient shows
    at 1e-3 or more)."""
    sampler, S, spacing, prediction, threshold, lof, final_min = case
    model = ToyNet()
    s32, ours = _scheduler(*case)
    plan = _our_plan(s32, ours)
    x = _x()
    noise = _x(B=plan.steps * 2, seed=5).reshape(plan.steps, *x.shape) if plan.needs_noise else None
    theirs32 = _diffusers_loop(s32, model, x.float(), None if noise is None else noise.float())

    s64, _ = _scheduler(*case)
    _to_float64(s64, SCHED.alphas_cumprod.double())
    from diffusers.schedulers import scheduling_dpmsolver_multistep as dpm_module

    monkeypatch.setattr(dpm_module, "torch", _Float64Torch())
    theirs64 = _diffusers_loop(s64, model, x, noise)
    monkeypatch.undo()
    assert theirs64.dtype == torch.float64

    ours64 = sample(model, x, plan, noise=noise)
    scale = theirs64.abs().max()
    assert (ours64 - theirs64).abs().max() <= 1e-12 * scale, f"float64: {(ours64 - theirs64).abs().max() / scale:.3g}"
    ours32 = sample(model, x.float(), plan, noise=noise)
    # float32 against another implementation, not a fast path against the reference: within 4x diffusers'
    # own float32 error (measured up to 3.2x on trailing spacing; docs/DESIGN.md, the tolerance rule)
    err, theirs = ((y.double() - theirs64).abs().max().item() for y in (ours32, theirs32))
    assert err <= 4 * theirs + atol(torch.float32), f"{case} float32: {err:.3g} > 4 x diffusers' {theirs:.3g} + atol"


def test_float64_check_catches_a_wrong_coefficient():
    """The float64 check above has teeth: a 1e-6 relative change of one history coefficient shows."""
    model, x = ToyNet(), _x()
    plan = dd.SamplingPlan.build(SCHED, 8, sampler="unipc")
    coef = plan.coef.clone()
    coef[4, COL["h1"]] *= 1 + 1e-6
    bent = dd.SamplingPlan(**{**plan.__dict__, "coef": coef})
    a, b = sample(model, x, plan), sample(model, x, bent)
    assert (a - b).abs().max() > 1e-12 * a.abs().max()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_is_the_first_order_member(prediction):
    """dpmpp_2m restricted to order 1 is DDIM at eta = 0, to rounding (float64)."""
    model, x = ToyNet(), _x()
    for S, spacing in ((10, "uniform"), (7, "trailing")):
        ddim = dd.SamplingPlan.build(SCHED, S, spacing=spacing, prediction=prediction)
        dpm1 = dd.SamplingPlan.build(SCHED, S, spacing=spacing, prediction=prediction, sampler="dpmpp_2m", order=1)
        assert dpm1.history == 0 and dpm1.steps == ddim.steps
        a, b = sample(model, x, ddim), sample(model, x, dpm1)
        assert (a - b).abs().max() <= 1e-13 * a.abs().max()


def test_plms_euler_start_is_adams_bashforth():
    """plms_start='euler': S evaluations, orders 1, 2, 3, 4, 4, ...; restated here as a plain loop on eps."""
    model, x = ToyNet(), _x()
    S = 7
    plan = dd.SamplingPlan.build(SCHED, S, sampler="plms", plms_start="euler")
    heun = dd.SamplingPlan.build(SCHED, S, sampler="plms")
    assert plan.steps == S and heun.steps == S + 1
    ab = [[1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]
    ts = plan.timesteps.tolist()
    ac = SCHED.alphas_cumprod.double()
    y, eps = x.clone(), []
    for i, t in enumerate(ts):
        eps.insert(0, model(y, torch.full((2,), t)))
        c = ab[min(i, 3)]
        e = sum(ci * ei for ci, ei in zip(c, eps))
        a, an = float(ac[t]), float(ac[ts[i + 1]]) if i + 1 < S else 1.0
        x0 = (y - math.sqrt(1 - a) * e) / math.sqrt(a)
        y = math.sqrt(an) * x0 + math.sqrt(1 - an) * e
    got = sample(model, x, plan)
    assert (got - y).abs().max() <= 1e-12 * y.abs().max()
    assert (sample(model, x, heun) - got).abs().max() > 1e-4  # the two starts differ


@pytest.mark.parametrize("sampler, S", [("unipc", 10), ("dpmpp_2m", 20), ("dpmpp_3m", 20), ("dpmpp_2m_sde", 20),
                                        ("dpmpp_2m", 10)])
def test_a_last_step_onto_its_own_alpha_bar_is_the_identity(sampler, S):
    """final_alpha = alphas_cumprod[0] with a list ending at t = 0 makes the last step go nowhere (h = 0): it
    builds (it divided by zero before) and that step leaves the state as it is (dpmpp), or as the previous
    step's corrector leaves it (unipc), exactly."""
    plan = dd.SamplingPlan.build(SCHED, S, sampler=sampler, spacing="uniform",
                                 final_alpha=float(SCHED.alphas_cumprod[0]))
    last = plan.coef[-1]
    assert plan.timesteps[-1] == 0 and last[COL["dx"]] == 1.0 and last[COL["de"]] == 0.0
    assert last[COL["sigma"]] == 0.0 and torch.isfinite(plan.coef).all()
    model, x = ToyNet(), _x()
    states = []
    out = sample(model, x, plan, seed=0, callback=lambda i, t, y, x0: states.append(y.clone()))
    if sampler == "unipc":
        assert last[COL["d0"]] != 0.0  # the corrector of the step before is folded in
    else:
        assert last[COL["d0"]] == 0.0 and torch.equal(out, states[-2])


def test_describe_names_the_sampler():
    d = dd.SamplingPlan.build(SCHED, 8, sampler="unipc", order=3, lower_order_final=False).describe()
    assert (d["sampler"], d["order"], d["lower_order_final"], d["history"]) == ("unipc", 3, False, 3)
    assert dd.SamplingPlan.build(SCHED, 8).describe()["sampler"] == "ddim"
    assert dd.SamplingPlan.build(SCHED, 8, sampler="plms", plms_start="euler").describe()["plms_start"] == "euler"
    p = dd.SamplingPlan.build(SCHED, 8, sampler="dpmpp_3m")
    assert p.coef.shape == (8, 13) and p.history == 2 and p.column("push").eq(1).all()


@pytest.mark.parametrize("kw, match", [
    (dict(sampler="euler_a"), "unknown sampler"),
    (dict(sampler="dpmpp_2m", order=3), "takes order 1..2"),
    (dict(sampler="unipc", order=0), "takes order 1..3"),
    (dict(sampler="plms", clip_x0=1.0), "plms combines model outputs"),
    (dict(sampler="plms", threshold=0.99), "plms combines model outputs"),
    (dict(sampler="dpmpp_2m", eta=0.5), "DDIM options"),
    (dict(sampler="unipc", variance="large"), "DDIM options"),
    (dict(sampler="plms", plms_start="rk4"), "plms_start"),
    (dict(sampler="ddim", order=2), "takes order 1..1"),
])
def test_bad_sampler_options(kw, match):
    with pytest.raises(ValueError, match=match):
        dd.SamplingPlan.build(SCHED, 8, **kw)


def test_order_above_the_steps_and_inversion_are_refused():
    with pytest.raises(ValueError, match="needs at least 3 steps"):
        dd.SamplingPlan.build(SCHED, 2, sampler="dpmpp_3m", order=3)
    assert dd.SamplingPlan.build(SCHED, 2, sampler="dpmpp_3m").steps == 2  # the default order just warms up
    with pytest.raises(ValueError, match="build the plan to invert with sampler='ddim'"):
        dd.SamplingPlan.build(SCHED, 5, sampler="unipc").inverse()


# -- backends against the reference ---------------------------------------------------------------
def _engine_check(backend, plan, model, shape, B=3, seed=11, first_index=2, **opts):
    fast = dd.Engine(model, plan, backend=backend, device="cpu", shape=shape, **opts)
    ref = dd.Engine(model, plan, backend="reference", device="cpu", shape=shape)
    got, want = fast.sample(B, seed=seed, first_index=first_index), ref.sample(B, seed=seed, first_index=first_index)
    x_T = dd.rng.initial_noise(seed, (B, *shape), first_index=first_index)
    truth = dd.sample(copy.deepcopy(model).double(), x_T.double(), plan, seed=seed, first_index=first_index)
    assert_close_to_reference(got, want, truth.clamp(-1, 1), torch.float32, f"{backend} {plan.sampler}")
    # batch invariance: sample k of a seed is the same drawn alone
    one = fast.sample(1, seed=seed, first_index=first_index + 1)[0]
    assert_close_to_reference(one, want[1], truth[1].clamp(-1, 1), torch.float32, f"{backend} batch of one")


@pytest.mark.parametrize("sampler, kw", [("plms", {}), ("dpmpp_3m", {"threshold": 0.95}),
                                         ("unipc", {"order": 3, "clip_x0": 1.0}), ("dpmpp_2m_sde", {})])
def test_triton_backend_multistep(sampler, kw):
    pytest.importorskip("triton")
    model = GaussianEps(SCHED)
    plan = dd.SamplingPlan.build(SCHED, 5, spacing="trailing", sampler=sampler, **kw)
    _engine_check("triton", plan, model, (3, 8, 8))


@pytest.mark.parametrize("sampler, kw", [("plms", {}), ("dpmpp_3m", {"threshold": 0.95}),
                                         ("unipc", {"order": 3}), ("dpmpp_2m_sde", {"clip_x0": 1.0})])
def test_onnxruntime_backend_multistep(sampler, kw, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("DDIM_FAST_CACHE", str(tmp_path))
    model = ToyNet()
    model.schedule = SCHED
    plan = dd.SamplingPlan.build(SCHED, 5, spacing="trailing", sampler=sampler, **kw)
    _engine_check("onnxruntime", plan, model, (3, 4, 4))
