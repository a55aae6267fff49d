import json
import math
import warnings

import numpy as np
import pytest
import torch

import ddim_fast as dd
from ddim_fast.plan import ALL_COLUMNS, COEF_COLUMNS, COL, MAX_HISTORY, SAMPLER_ROWS, SAMPLERS, SamplingPlan
from ddim_fast.sampling import step

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _apply(plan, i, x, m, z):
    return step(x, m, plan.coef[i], plan, z)[0]


@pytest.mark.parametrize("eta", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["uniform", "quad", "trailing"])
def test_coefficients_equal_eq12_written_out(eta, spacing):
    plan = SamplingPlan.build(SCHED, 20, eta=eta, spacing=spacing)
    ac = SCHED.alphas_cumprod
    ts = plan.timesteps.tolist()
    x, e, z = _rand(2, 5, seed=1), _rand(2, 5, seed=2), _rand(2, 5, seed=3)
    for i, t in enumerate(ts):
        a = ac[t].item()
        a_prev = ac[ts[i + 1]].item() if i + 1 < len(ts) else 1.0  # alpha_0 = 1 after the last step
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)  # Eq. 16
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        expect = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * e + sigma * z  # Eq. 12
        torch.testing.assert_close(_apply(plan, i, x, e, z), expect, rtol=0, atol=1e-12)
        assert plan.alpha[i].item() == a and plan.alpha_next[i].item() == a_prev


def _ddpm_posterior(x, eps, t, ac, betas):
    """Ho et al. Eq. 7: the posterior mean and the "fixed small" variance, from eps."""
    a, a_prev, beta = ac[t].item(), (ac[t - 1].item() if t > 0 else 1.0), betas[t].item()
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
    var = beta * (1 - a_prev) / (1 - a)
    return mean, var


def test_eta1_full_chain_is_ddpm_posterior():
    T = 50
    sched = dd.NoiseSchedule.linear(T, 1e-3, 0.2)
    plan = SamplingPlan.build(sched, T, eta=1.0)
    assert plan.timesteps.tolist() == list(range(T - 1, -1, -1))
    x, e, z = _rand(3, 4, seed=4), _rand(3, 4, seed=5), _rand(3, 4, seed=6)
    for i, t in enumerate(plan.timesteps.tolist()):
        mean, var = _ddpm_posterior(x, e, t, sched.alphas_cumprod, sched.betas)
        torch.testing.assert_close(plan.column("sigma")[i].item() ** 2, var, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(_apply(plan, i, x, e, z), mean + math.sqrt(var) * z, rtol=0, atol=1e-12)
    assert plan.column("sigma")[-1] == 0  # the last step (to alpha = 1) draws no noise


def test_large_variance_is_posterior_mean_plus_sqrt_beta():
    T = 50
    sched = dd.NoiseSchedule.linear(T, 1e-3, 0.2)
    plan = SamplingPlan.build(sched, T, variance="large")
    x, e, z = _rand(3, 4, seed=7), _rand(3, 4, seed=8), _rand(3, 4, seed=9)
    for i, t in enumerate(plan.timesteps.tolist()):
        mean, _ = _ddpm_posterior(x, e, t, sched.alphas_cumprod, sched.betas)
        sd = 0.0 if t == 0 else math.sqrt(sched.betas[t].item())  # sigma-hat; none on the last step
        assert plan.column("sigma")[i].item() == pytest.approx(sd, rel=1e-12, abs=0)
        torch.testing.assert_close(_apply(plan, i, x, e, z), mean + sd * z, rtol=0, atol=1e-12)


def test_large_variance_with_skips_uses_skip_beta():
    plan = SamplingPlan.build(SCHED, 10, variance="large")
    a, an = plan.alpha, plan.alpha_next
    torch.testing.assert_close(plan.column("sigma")[:-1], (1 - a / an)[:-1].sqrt(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="leave eta at 0 or 1"):
        SamplingPlan.build(SCHED, 10, variance="large", eta=0.5)


def test_eta0_draws_no_noise():
    plan = SamplingPlan.build(SCHED, 50, eta=0.0)
    assert not plan.needs_noise and (plan.column("sigma") == 0).all()
    assert SamplingPlan.build(SCHED, 50, eta=0.3).needs_noise


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_prediction_types_agree_with_eps(prediction, eta):
    # Convert an eps prediction into x0 / v by hand; the step must land on the same x'.
    plan_e = SamplingPlan.build(SCHED, 25, eta=eta, clip_x0=1.0)
    plan_p = SamplingPlan.build(SCHED, 25, eta=eta, clip_x0=1.0, prediction=prediction)
    x, e, z = _rand(2, 6, seed=10), _rand(2, 6, seed=11), _rand(2, 6, seed=12)
    for i in range(plan_e.steps):
        a = plan_e.alpha[i].item()
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        m = x0 if prediction == "x0" else math.sqrt(a) * e - math.sqrt(1 - a) * x0
        torch.testing.assert_close(_apply(plan_p, i, x, m, z), _apply(plan_e, i, x, e, z), rtol=0, atol=1e-10)


def test_inverse_plan_timesteps_and_coefficients():
    plan = SamplingPlan.build(SCHED, 10)
    inv = plan.inverse()
    up = list(range(0, 1000, 100))
    assert inv.direction == "invert" and inv.eps_at == "current"
    assert inv.timesteps.tolist() == [0] + up[:-1]  # eps at the state's own timestep
    assert plan.inverse("target").timesteps.tolist() == up
    assert inv.alpha[0].item() == 1.0 and inv.alpha_next[-1].item() == SCHED.alphas_cumprod[900].item()
    # x_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps (Eq. 13 run upward), no noise, no clip
    x, e = _rand(2, 3, seed=13), _rand(2, 3, seed=14)
    for i in range(inv.steps):
        a, an = inv.alpha[i].item(), inv.alpha_next[i].item()
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        torch.testing.assert_close(
            _apply(inv, i, x, e, None), math.sqrt(an) * x0 + math.sqrt(1 - an) * e, rtol=0, atol=1e-12
        )
    assert (inv.column("sigma") == 0).all()


def test_inverse_drops_clipping_and_refuses_stochastic_plans():
    assert SamplingPlan.build(SCHED, 10, clip_x0=1.0).inverse().clip_x0 is None
    with pytest.raises(ValueError, match="eta=0"):
        SamplingPlan.build(SCHED, 10, eta=0.5).inverse()
    with pytest.raises(ValueError, match="eps_at"):
        SamplingPlan.build(SCHED, 10).inverse("middle")
    with pytest.raises(ValueError, match="already an inversion plan"):
        SamplingPlan.build(SCHED, 10).inverse().inverse()


def test_to_device_dtype_and_describe():
    plan = SamplingPlan.build(SCHED, 10, eta=0.5, clip_x0=(-1, 1))
    p32 = plan.to("cpu", torch.float32)
    assert p32.coef.dtype == torch.float32 and p32.timesteps.dtype == torch.long
    assert p32.coef.shape == (10, len(COEF_COLUMNS)) and p32.coef.is_contiguous()
    torch.testing.assert_close(p32.coef.double(), plan.coef, rtol=1e-6, atol=1e-7)
    d = plan.describe()
    assert d["steps"] == 10 and d["eta"] == 0.5 and d["clip_x0"] == [-1.0, 1.0]
    assert "steps=10" in repr(plan)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), r"steps must be an int in \[1, T=1000\]"),
        (dict(steps=1001), r"steps must be an int in \[1, T=1000\]"),
        (dict(steps=10, eta=-0.1), "eta must be finite and >= 0"),
        (dict(steps=10, eta=float("nan")), "eta must be finite and >= 0"),
        (dict(steps=10, eta="x"), "eta must be a number"),
        (dict(steps=10, spacing="cubic"), "unknown spacing"),
        (dict(steps=10, variance="fixed"), "unknown variance"),
        (dict(steps=10, prediction="score"), "unknown prediction"),
        (dict(steps=10, clip_x0=(1, -1)), "finite lo < hi"),
        (dict(steps=10, clip_x0="yes"), "clip_x0 must be"),
        (dict(steps=10, threshold=1.5), r"quantile in \(0, 1\]"),
        (dict(steps=10, threshold=0.9, clip_x0=1.0), "either clip_x0 or threshold"),
        (dict(steps=3, spacing=[0, 5]), "explicit timestep list has 2"),
        (dict(steps=None, spacing=[5, 0, 9]), "sorted"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingPlan.build(SCHED, **kwargs)


def test_schedule_type_checked():
    with pytest.raises(ValueError, match="NoiseSchedule"):
        SamplingPlan.build(SCHED.alphas_cumprod, 10)


def test_a_timestep_list_names_its_entry_outside_the_schedule():
    """A list given as steps is the timestep list: an entry outside [0, T-1] is named with T (not "steps
    must be an int in [1, T]"), and a valid list builds the plan spacing=[...] builds."""
    for kwargs in (dict(steps=[1200, 500, 0]), dict(steps=None, spacing=[1200, 500, 0])):
        with pytest.raises(ValueError, match=r"^timesteps \[1200, 500, 0\] has 1200 outside \[0, T-1\] = \[0, 999\]"):
            SamplingPlan.build(SCHED, **kwargs)
    with pytest.raises(ValueError, match=r"has 1000, -3 outside \[0, T-1\] = \[0, 999\]"):
        dd.timesteps(1000, [1000, 500, -3])
    as_steps = SamplingPlan.build(SCHED, [900, 500, 0])
    as_spacing = SamplingPlan.build(SCHED, None, spacing=[900, 500, 0])
    assert as_steps.timesteps.tolist() == [900, 500, 0] and as_steps.spacing == "explicit"
    assert torch.equal(as_steps.coef, as_spacing.coef)
    with pytest.raises(ValueError, match="give the timesteps once"):
        SamplingPlan.build(SCHED, [900, 500, 0], spacing="trailing")


# -- the official ddpm_noisy, far starts, final_alpha, clip bounds, numpy integers ----------------------
def _official_ddpm_noisy_step(x, e, z, a, a_next):
    """One step of the official code's ddpm_steps (ermongroup/ddim, functions/denoising.py), written
    out: x0 clamped to [-1, 1], the posterior mean over the skip, noise std sqrt(1 - a/a')
    (none when the step lands on alpha_bar = 1)."""
    beta = 1 - a / a_next
    x0 = ((x - math.sqrt(1 - a) * e) / math.sqrt(a)).clamp(-1, 1)
    mean = (math.sqrt(a_next) * beta * x0 + math.sqrt(1 - beta) * (1 - a_next) * x) / (1 - a)
    return mean + (0.0 if a_next == 1.0 else math.sqrt(beta)) * z


def test_large_with_clip_is_the_official_ddpm_noisy_and_without_it_is_not():
    clipped = SamplingPlan.build(SCHED, 10, variance="large", clip_x0=1)
    plain = SamplingPlan.build(SCHED, 10, variance="large")
    x, e, z = _rand(2, 8, seed=20) * 3, _rand(2, 8, seed=21), _rand(2, 8, seed=22)  # x0 estimates beyond [-1, 1]
    differs = False
    for i in range(clipped.steps):
        want = _official_ddpm_noisy_step(x, e, z, clipped.alpha[i].item(), clipped.alpha_next[i].item())
        torch.testing.assert_close(_apply(clipped, i, x, e, z), want, rtol=0, atol=1e-12)
        differs |= not torch.allclose(_apply(plain, i, x, e, z), want, rtol=0, atol=1e-6)
    assert differs


@pytest.mark.parametrize(
    "S, spacing, warns",
    [
        (600, "uniform", True),  # starts at 599, sqrt(alpha_bar) 0.16 (docs/DESIGN.md's table)
        (501, "uniform", True),
        (3, "uniform", True),  # [666, 333, 0]
        (1, "uniform", True),  # [0]
        (600, "trailing", False),
        (600, "linspace", False),
        (10, "uniform", False),  # the paper's own settings: uniform S dividing T starts at T - T/S
        (50, "uniform", False),
        (4, "uniform", False),
        (7, "uniform", False),  # starts at 852
        (100, "quad", False),  # the official CIFAR-10 setting, starts at 800
        (10, "quad", False),
        (10, "leading", False),
    ],
)
def test_a_start_far_from_the_end_warns(S, spacing, warns):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plan = SamplingPlan.build(SCHED, S, spacing=spacing)
    far = [str(w.message) for w in seen if "starts at timestep" in str(w.message)]
    assert bool(far) == warns, far
    if warns:
        assert f"starts at timestep {int(plan.timesteps[0])} of T=1000" in far[0]
        assert "'trailing' or 'linspace'" in far[0]


def test_an_explicit_list_that_starts_low_warns():
    with pytest.warns(UserWarning, match="this timestep list starts at timestep 500 of T=1000"):
        SamplingPlan.build(SCHED, spacing=[500, 250, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SamplingPlan.build(SCHED, spacing=[999, 500, 0])


def test_a_noisy_schedule_end_does_not_make_every_plan_warn():
    """linear(100, 1e-3, 0.05) keeps 0.27 of the image even at T-1: only starts well below that warn."""
    sched = dd.NoiseSchedule.linear(100, 1e-3, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SamplingPlan.build(sched, 10)
        SamplingPlan.build(sched, 10, spacing="trailing")
    with pytest.warns(UserWarning, match="starts at timestep 59"):
        SamplingPlan.build(sched, 60)  # T // S = 1: timesteps 59..0


def test_final_alpha_is_the_last_steps_target_and_the_inversions_start():
    a0 = SCHED.alphas_cumprod[0].item()
    plan = SamplingPlan.build(SCHED, 10, eta=0.5, final_alpha=a0)
    assert plan.alpha_next[-1].item() == a0 and plan.final_alpha == a0 and plan.describe()["final_alpha"] == a0
    x, e, z = _rand(2, 5, seed=23), _rand(2, 5, seed=24), _rand(2, 5, seed=25)
    a = plan.alpha[-1].item()
    sigma = 0.5 * math.sqrt((1 - a0) / (1 - a)) * math.sqrt(1 - a / a0)
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    want = math.sqrt(a0) * x0 + math.sqrt(1 - a0 - sigma**2) * e + sigma * z
    torch.testing.assert_close(_apply(plan, 9, x, e, z), want, rtol=0, atol=1e-12)
    inv = SamplingPlan.build(SCHED, 10, final_alpha=a0).inverse()
    assert inv.alpha[0].item() == a0 and inv.final_alpha == a0
    assert SamplingPlan.build(SCHED, 10).final_alpha == 1.0
    for bad in (1.5, SCHED.alphas_cumprod[0].item() / 2, "x"):
        with pytest.raises(ValueError, match="final_alpha"):
            SamplingPlan.build(SCHED, 10, final_alpha=bad)


@pytest.mark.parametrize("c", [-1, -1.0, 0])
def test_a_negative_or_zero_clip_is_refused(c):
    with pytest.raises(ValueError, match="c must be > 0"):
        SamplingPlan.build(SCHED, 10, clip_x0=c)


def test_numpy_integers_are_ints():
    plan = SamplingPlan.build(dd.NoiseSchedule.linear(np.int64(1000)), np.int64(10), steps_offset=np.int32(1),
                              spacing="leading", clip_x0=np.float32(1.0))
    assert plan.steps == 10 and plan.T == 1000 and type(plan.T) is int
    json.dumps(plan.describe())
    assert plan.timesteps.tolist() == list(range(901, 0, -100))
    with pytest.raises(ValueError, match="steps must be an int"):
        SamplingPlan.build(SCHED, np.bool_(True))


# -- the table, row by row: exact values from the formulas (a refactor must not move a bit) ------------
def _lam(a):
    return 0.5 * (math.log(a) - math.log1p(-a))


def _x0_of(a, prediction):
    """(cx, ce) of x0 = cx x + ce m, and (ex, ee) of eps, as the module docstring writes them."""
    sa, s1a = math.sqrt(a), math.sqrt(1.0 - a)
    return {"eps": (1.0 / sa, -s1a / sa, 0.0, 1.0), "x0": (0.0, 1.0, 1.0 / s1a, -sa / s1a),
            "v": (sa, -s1a, s1a, sa)}[prediction]


def _rows(plan):
    return [dict(zip(ALL_COLUMNS, r)) for r in plan.coef.tolist()]


def test_columns_have_one_index_each_and_every_sampler_has_rows():
    assert ALL_COLUMNS[: len(COEF_COLUMNS)] == COEF_COLUMNS and len(ALL_COLUMNS) == 13 and MAX_HISTORY == 3
    assert [COL[name] for name in ALL_COLUMNS] == list(range(13))
    assert set(SAMPLER_ROWS) == set(SAMPLERS)
    plan = SamplingPlan.build(SCHED, 6, sampler="unipc")
    for name in ALL_COLUMNS:
        assert torch.equal(plan.column(name), plan.coef[:, COL[name]])


def test_kernel_column_offsets_are_plans():
    pytest.importorskip("triton")
    from ddim_fast.kernels import ddim_step as kernel

    offsets = {name[4:].lower(): v.value for name, v in vars(kernel).items() if name.startswith("COL_")}
    assert offsets == {name: ALL_COLUMNS.index(name) for name in ALL_COLUMNS}
    assert (kernel.NUM_COEF, kernel.NUM_COEF_HIST, kernel.MAX_HISTORY) == (len(COEF_COLUMNS), len(ALL_COLUMNS),
                                                                          MAX_HISTORY)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_eta0_rows_are_the_formula(prediction):
    plan = SamplingPlan.build(SCHED, 5, prediction=prediction)
    assert plan.coef.shape == (5, 6) and plan.history == 0
    for i, (a, an) in enumerate(zip(plan.alpha.tolist(), plan.alpha_next.tolist())):
        cx, ce, ex, ee = _x0_of(a, prediction)
        c = math.sqrt(1 - an)  # sigma = 0: x' = sqrt(a') x0 + sqrt(1 - a') eps
        assert plan.coef[i].tolist() == [cx, ce, math.sqrt(an), c * ex, c * ee, 0.0]
    if prediction == "eps":  # the textbook form, no prediction conversion in between
        a, an = plan.alpha[0].item(), plan.alpha_next[0].item()
        assert plan.coef[0].tolist() == [1 / math.sqrt(a), -math.sqrt(1 - a) / math.sqrt(a), math.sqrt(an), 0.0,
                                         math.sqrt(1 - an), 0.0]


def test_ddim_eta_and_sigma_hat_rows_are_the_formula():
    plan = SamplingPlan.build(SCHED, 4, eta=0.5)
    large = SamplingPlan.build(SCHED, 4, variance="large")
    for i, (a, an) in enumerate(zip(plan.alpha.tolist(), plan.alpha_next.tolist())):
        cx, ce, _, _ = _x0_of(a, "eps")
        sigma = 0.5 * math.sqrt((1 - an) / (1 - a)) * math.sqrt(1 - a / an)  # Eq. 16
        c = math.sqrt(1 - an - sigma**2)
        assert plan.coef[i].tolist() == [cx, ce, math.sqrt(an), 0.0, c, sigma]
        beta = 1 - a / an
        assert large.coef[i].tolist() == [cx, ce, math.sqrt(an) * beta / (1 - a),
                                          math.sqrt(a / an) * (1 - an) / (1 - a), 0.0,
                                          0.0 if i == 3 else math.sqrt(beta)]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_multistep_first_and_last_rows_are_ddim_and_x0(sampler):
    """Step 0 is first order (DDIM at eta 0 in DPM-Solver++'s form) for both; the step onto alpha_bar = 1
    is x' = x0. Both push x0 and carry no noise."""
    plan = SamplingPlan.build(SCHED, 5, sampler=sampler, prediction="v")
    rows = _rows(plan)
    a, an = plan.alpha[0].item(), plan.alpha_next[0].item()
    h = _lam(an) - _lam(a)
    cx, ce, _, _ = _x0_of(a, "v")
    d0, dx = -math.sqrt(an) * math.expm1(-h), math.sqrt(1 - an) / math.sqrt(1 - a)  # alpha_t (1 - e^-h), sig_t/sig_s
    assert list(rows[0].values()) == [cx, ce, d0, dx, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    cx, ce, _, _ = _x0_of(plan.alpha[-1].item(), "v")
    assert plan.alpha_next[-1] == 1.0
    # unipc too: x' = rho x^c + ..., rho = 0 there, so the step before's corrector drops out
    assert rows[-1] == {**dict.fromkeys(ALL_COLUMNS, 0.0), "cx": cx, "ce": ce, "d0": 1.0, "pu": 1.0, "push": 1.0}


def test_dpmpp_2m_rows_are_the_midpoint_formula():
    """dpmpp_2m, 6 steps (lower_order_final: the last one first order): rows 1..4 are DPM-Solver++(2M),
    x' = rho x - alpha_t phi_1 (x0 + D1 / 2) with D1 = (x0 - H1) / r0."""
    plan = SamplingPlan.build(SCHED, 6, sampler="dpmpp_2m", spacing="trailing")
    rows, a, an = _rows(plan), plan.alpha.tolist(), plan.alpha_next.tolist()
    assert plan.history == 1
    for i in range(1, 5):
        h = _lam(an[i]) - _lam(a[i])
        c0 = -math.sqrt(an[i]) * math.expm1(-h)
        r0 = (_lam(a[i]) - _lam(a[i - 1])) / h
        cx, ce, _, _ = _x0_of(a[i], "eps")
        assert list(rows[i].values()) == [cx, ce, c0 + c0 * 0.5 * (1 / r0), math.sqrt(1 - an[i]) / math.sqrt(1 - a[i]),
                                          0.0, 0.0, c0 * 0.5 * (-1 / r0), 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    sde = _rows(SamplingPlan.build(SCHED, 6, sampler="dpmpp_2m_sde", spacing="trailing"))
    h = _lam(an[0]) - _lam(a[0])  # SDE-DPM-Solver++ step 0: the x0 weight with h doubled, x damped, noise
    assert (sde[0]["d0"], sde[0]["dx"], sde[0]["sigma"]) == (
        -math.sqrt(an[0]) * math.expm1(-2 * h), math.sqrt(1 - an[0]) / math.sqrt(1 - a[0]) * math.exp(-h),
        math.sqrt(1 - an[0]) * math.sqrt(-math.expm1(-2 * h)))


def test_dpmpp_3m_rows_are_the_third_order_formula():
    """dpmpp_3m, 8 steps: rows 2..5 are third order, x' = rho x - alpha_t phi_1 x0 + alpha_t phi_2 D1
    - alpha_t phi_3 D2 (the authors' names) with D1, D2 from (x0, H1, H2) over the step ratios r0, r1."""
    plan = SamplingPlan.build(SCHED, 8, sampler="dpmpp_3m", spacing="trailing")
    rows, a, an, lam = _rows(plan), plan.alpha.tolist(), plan.alpha_next.tolist(), [_lam(v) for v in plan.alpha]
    assert plan.history == 2
    for i in range(2, 6):
        al_t, h = math.sqrt(an[i]), _lam(an[i]) - lam[i]
        r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
        d1_0, d1_1 = [1 / r0, -1 / r0, 0.0], [0.0, 1 / r1, -1 / r1]  # over (x0, H1, H2)
        diff = [p - q for p, q in zip(d1_0, d1_1)]
        d1 = [p + r0 / (r0 + r1) * q for p, q in zip(d1_0, diff)]
        d2 = [q / (r0 + r1) for q in diff]
        phi_1 = math.expm1(-h)
        phi_2 = phi_1 / h + 1.0
        phi_3 = (phi_1 + h) / h**2 - 0.5  # plan.py's form of phi_2 / h - 1/2 (the authors' code)
        assert phi_3 == pytest.approx(phi_2 / h - 0.5, rel=1e-9)
        w = [(-al_t * phi_1 if j == 0 else 0.0) + al_t * phi_2 * d1[j] + -al_t * phi_3 * d2[j] for j in range(3)]
        cx, ce, _, _ = _x0_of(a[i], "eps")
        assert list(rows[i].values()) == [cx, ce, w[0], math.sqrt(1 - an[i]) / math.sqrt(1 - a[i]), 0.0, 0.0,
                                          w[1], w[2], 0.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("start", ["heun", "euler"])
def test_plms_rows_are_adams_bashforth_on_the_ddim_transfer(start):
    plan = SamplingPlan.build(SCHED, 5, sampler="plms", plms_start=start)
    rows, a, an = _rows(plan), plan.alpha.tolist(), plan.alpha_next.tolist()
    ab = [(1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24)]
    heun = start == "heun"
    assert len(rows) == 5 + heun and plan.history == 3
    if heun:  # the repeated first timestep: x1' = x1 + B0 (m1 - m0) / 2, nothing pushed
        B0 = rows[0]["de"]
        assert plan.timesteps[1] == plan.timesteps[2] and a[1] == an[1]
        cx, ce, _, _ = _x0_of(a[1], "eps")
        assert list(rows[1].values()) == [cx, ce, 0.0, 1.0, B0 / 2, 0.0, -B0 / 2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    k = 0  # outputs pushed so far
    for i, r in enumerate(rows):
        if heun and i == 1:
            continue
        cx, ce, ex, ee = _x0_of(a[i], "eps")
        A = math.sqrt(an[i]) * cx + math.sqrt(1 - an[i]) * ex  # DDIM (eta 0): x' = A x + B m
        B = math.sqrt(an[i]) * ce + math.sqrt(1 - an[i]) * ee
        c = ab[min(k, 3)]
        hs = [B * v for v in c[1:]] + [0.0] * (4 - len(c))
        assert list(r.values()) == [cx, ce, 0.0, A, B * c[0], 0.0, *hs, 0.0, 0.0, 1.0, 1.0]
        k += 1
