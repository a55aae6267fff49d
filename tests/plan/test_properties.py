"""Property-based tests (hypothesis): plans from random valid inputs, random invalid inputs."""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddim_fast as dd
from ddim_fast.models.analytic import GaussianEps
from ddim_fast.sampling import step

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def schedules(draw):
    T = draw(st.integers(2, 1200))
    kind = draw(st.sampled_from(["linear", "scaled_linear", "cosine", "betas"]))
    if kind == "cosine":
        return dd.NoiseSchedule.cosine(T)
    if kind == "betas":
        betas = draw(st.lists(st.floats(1e-5, 0.5), min_size=T, max_size=T)) if T <= 50 else None
        if betas is not None:
            return dd.NoiseSchedule.from_betas(betas)
        kind = "linear"
    b0 = draw(st.floats(1e-5, 1e-2))
    b1 = draw(st.floats(b0, 0.05))
    return getattr(dd.NoiseSchedule, kind)(T, b0, b1)


@st.composite
def plans(draw, eta=None):
    sched = draw(schedules())
    steps = draw(st.integers(1, sched.T))
    spacing = draw(st.sampled_from(["uniform", "quad", "leading", "trailing", "linspace"]))
    variance = draw(st.sampled_from(["ddim", "large"]))
    if eta is None:
        eta = draw(st.floats(0, 2)) if variance == "ddim" else 1.0
    prediction = draw(st.sampled_from(["eps", "x0", "v"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quad's duplicate warning
        return sched, dd.SamplingPlan.build(sched, steps, eta=eta, spacing=spacing, variance=variance,
                                            prediction=prediction)


@SETTINGS
@given(plans())
def test_every_coefficient_is_finite_and_timesteps_are_valid(sp):
    sched, plan = sp
    assert torch.isfinite(plan.coef).all()
    assert (plan.column("sigma") >= 0).all()
    ts = plan.timesteps
    assert (ts[:-1] > ts[1:]).all() and ts.min() >= 0 and ts.max() < sched.T
    assert plan.alpha_next[-1] == 1.0 and plan.column("sigma")[-1] == 0
    if plan.eta == 0 or (plan.variance == "ddim" and plan.eta == 0):
        assert not plan.needs_noise


@SETTINGS
@given(plans(eta=0.0))
def test_eta0_sampling_is_deterministic(sp):
    sched, plan = sp
    if plan.variance != "ddim":
        return
    model = GaussianEps(sched, prediction=plan.prediction)
    x = dd.rng.initial_noise(0, (2, 1, 4, 4)).double()
    a = dd.sample(model, x, plan, seed=1)
    b = dd.sample(model, x, plan, seed=2)
    assert torch.equal(a, b) and torch.isfinite(a).all()


@SETTINGS
@given(schedules())
def test_full_chain_eta1_is_the_ddpm_posterior(sched):
    plan = dd.SamplingPlan.build(sched, sched.T, eta=1.0)
    ac, betas = sched.alphas_cumprod, sched.betas
    x, e, z = (torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(3))
    for i in (0, sched.T // 2, sched.T - 1):
        t = int(plan.timesteps[i])
        a, a_prev, b = ac[t].item(), (ac[t - 1].item() if t else 1.0), betas[t].item()
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        mean = math.sqrt(a_prev) * b / (1 - a) * x0 + math.sqrt(1 - b) * (1 - a_prev) / (1 - a) * x
        var = b * (1 - a_prev) / (1 - a)
        got = step(x, e, plan.coef[i], plan, z)[0]
        torch.testing.assert_close(got, mean + math.sqrt(var) * z, rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(st.floats(-0.5, 0.5), st.floats(0.1, 1.0), st.sampled_from(["eps", "v", "x0"]))
def test_invert_then_sample_is_the_identity_to_first_order(mu, std, prediction):
    sched = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
    model = GaussianEps(sched, mu=mu, std=std, prediction=prediction)
    x0 = mu + std * torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errs = []
    for S in (25, 50, 100):
        plan = dd.SamplingPlan.build(sched, S, prediction=prediction)
        errs.append((dd.sample(model, dd.invert(model, x0, plan), plan) - x0).abs().max().item())
    # first order: the error roughly halves when S doubles
    assert errs[1] < 0.75 * errs[0] and errs[2] < 0.75 * errs[1], errs


# -- random invalid input raises ValueError, never anything else ------------------------------------
SCHED = dd.NoiseSchedule.linear(100)
junk = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(-5, 200), max_size=6))


@SETTINGS
@given(steps=junk, eta=junk, spacing=junk, variance=junk, prediction=junk)
def test_random_build_arguments_raise_value_error_or_build(steps, eta, spacing, variance, prediction):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = dd.SamplingPlan.build(SCHED, steps, eta=eta, spacing=spacing, variance=variance,
                                         prediction=prediction)
    except ValueError:
        return
    assert torch.isfinite(plan.coef).all()  # whatever was accepted is a valid plan


@SETTINGS
@given(st.lists(st.integers(-5, 105), max_size=8))
def test_random_timestep_lists(ts):
    try:
        out = dd.timesteps(100, None, ts)
    except ValueError:
        assert not ts or len(set(ts)) != len(ts) or min(ts) < 0 or max(ts) >= 100 or (
            ts != sorted(ts) and ts != sorted(ts, reverse=True))
        return
    assert out.tolist() == sorted(ts, reverse=True)


@SETTINGS
@given(st.one_of(st.integers(-3, 3), st.floats(allow_nan=True), st.none(), st.text(max_size=3)),
       st.sampled_from([torch.float16, torch.int64, torch.float32]))
def test_random_sampler_inputs(seed, dtype):
    plan = dd.SamplingPlan.build(SCHED, 3, eta=0.5)
    x = torch.ones(1, 1, 2, 2).to(dtype)
    try:
        out = dd.sample(GaussianEps(SCHED), x, plan, seed=seed)
    except ValueError:
        return
    assert dtype == torch.float32 and (seed is None or isinstance(seed, int) and seed >= 0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("T", [1, 2, 3])
def test_smallest_schedules(T):
    sched = dd.NoiseSchedule.linear(T, 0.1, 0.2)
    for S in range(1, T + 1):
        plan = dd.SamplingPlan.build(sched, S, eta=1.0)
        assert torch.isfinite(plan.coef).all() and plan.steps == S
