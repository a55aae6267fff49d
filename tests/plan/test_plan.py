import json
import math
import warnings

import numpy as np
import pytest
import torch

import ddim_fast as dd
from ddim_fast.plan import COEF_COLUMNS, SamplingPlan
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
        torch.testing.assert_close(plan.coef[i, 5].item() ** 2, var, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(_apply(plan, i, x, e, z), mean + math.sqrt(var) * z, rtol=0, atol=1e-12)
    assert plan.coef[-1, 5] == 0  # the last step (to alpha = 1) draws no noise


def test_large_variance_is_posterior_mean_plus_sqrt_beta():
    T = 50
    sched = dd.NoiseSchedule.linear(T, 1e-3, 0.2)
    plan = SamplingPlan.build(sched, T, variance="large")
    x, e, z = _rand(3, 4, seed=7), _rand(3, 4, seed=8), _rand(3, 4, seed=9)
    for i, t in enumerate(plan.timesteps.tolist()):
        mean, _ = _ddpm_posterior(x, e, t, sched.alphas_cumprod, sched.betas)
        sd = 0.0 if t == 0 else math.sqrt(sched.betas[t].item())  # sigma-hat; none on the last step
        assert plan.coef[i, 5].item() == pytest.approx(sd, rel=1e-12, abs=0)
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
