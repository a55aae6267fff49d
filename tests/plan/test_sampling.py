import math

import pytest
import torch

import ddim_fast as dd
from ddim_fast.models.analytic import GaussianEps
from ddim_fast.sampling import NonFiniteError, dynamic_threshold

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
SHAPE = (4, 3, 8, 8)


@pytest.fixture(scope="module")
def model():
    return GaussianEps(SCHED, mu=0.3, std=0.5)


def _xT(shape=SHAPE, seed=0):
    return dd.rng.initial_noise(seed, shape).double()


def test_eta0_is_deterministic(model):
    plan = dd.SamplingPlan.build(SCHED, 20)
    a = dd.sample(model, _xT(), plan, seed=1)
    b = dd.sample(model, _xT(), plan, seed=2)
    assert torch.equal(a, b)


def test_ddim_converges_to_the_exact_ode_solution_at_first_order(model):
    # For Gaussian data the probability-flow ODE is solved in closed form; DDIM is its Euler
    # discretisation (Section 4.3), so the error must halve when the step count doubles.
    xT = _xT()
    errs = {}
    for S in (50, 100, 200):
        plan = dd.SamplingPlan.build(SCHED, S)
        exact = model.ode_solution(xT, plan.alpha[0].item(), 1.0)
        errs[S] = (dd.sample(model, xT, plan) - exact).abs().max().item()
    assert errs[200] < 0.03
    for S in (50, 100):
        assert 1.7 < errs[S] / errs[2 * S] < 2.6, errs


def test_stochastic_samples_have_the_data_distribution(model):
    # The full 1000-step chains: with fewer steps the discretisation shows (at S=100, eta=1
    # gives std 0.47 and sigma-hat 0.51 here), which is the paper's point, not a bug.
    xT = dd.rng.initial_noise(3, (32, 1, 16, 16)).double()
    noise = torch.randn(1000, *xT.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for plan in (dd.SamplingPlan.build(SCHED, 1000, eta=1.0), dd.SamplingPlan.build(SCHED, 1000, variance="large")):
        x0 = dd.sample(model, xT, plan, noise=noise)
        assert x0.mean().item() == pytest.approx(0.3, abs=0.015)
        assert x0.std().item() == pytest.approx(0.5, abs=0.015)


def test_full_chain_ancestral_sampling_equals_explicit_ddpm_loop(model):
    T = 100
    sched = dd.NoiseSchedule.linear(T, 1e-3, 0.1)
    m = GaussianEps(sched)
    plan = dd.SamplingPlan.build(sched, T, eta=1.0)
    xT = _xT((2, 1, 4, 4))
    noise = torch.randn(T, *xT.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = dd.sample(m, xT, plan, noise=noise)
    # Ho et al. Algorithm 2 with sigma_t^2 = beta~_t (the posterior variance)
    x, ac, b = xT.clone(), sched.alphas_cumprod, sched.betas
    for i, t in enumerate(range(T - 1, -1, -1)):
        a, a_prev = ac[t].item(), (ac[t - 1].item() if t else 1.0)
        eps = m(x, torch.full((2,), t))
        mean = (x - b[t].item() / math.sqrt(1 - a) * eps) / math.sqrt(1 - b[t].item())
        x = mean + math.sqrt(b[t].item() * (1 - a_prev) / (1 - a)) * noise[i]
    torch.testing.assert_close(got, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_seeded_sampling_is_batch_invariant(model, eta):
    plan = dd.SamplingPlan.build(SCHED, 10, eta=eta)
    full = dd.sample(model, _xT(), plan, seed=11)
    for b in range(SHAPE[0]):
        one = dd.sample(model, _xT()[b : b + 1], plan, seed=11, first_index=b)
        assert torch.equal(one[0], full[b])


def test_seed_and_noise_paths_agree(model):
    plan = dd.SamplingPlan.build(SCHED, 10, eta=0.5)
    noise = torch.stack([dd.rng.step_noise(7, i, SHAPE) for i in range(10)]).double()
    a = dd.sample(model, _xT(), plan, seed=7)
    b = dd.sample(model, _xT(), plan, noise=noise)
    assert torch.equal(a, b)
    c = dd.sample(model, _xT(), plan, seed=8)
    assert (a - c).abs().max() > 0.01


def test_unseeded_stochastic_sampling_follows_torch_manual_seed(model):
    plan = dd.SamplingPlan.build(SCHED, 10, eta=1.0)
    torch.manual_seed(0)
    a = dd.sample(model, _xT(), plan)
    torch.manual_seed(0)
    b = dd.sample(model, _xT(), plan)
    assert torch.equal(a, b)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_prediction_types_sample_the_same(prediction):
    plan_e = dd.SamplingPlan.build(SCHED, 20, eta=0.5, clip_x0=1.0)
    plan_p = dd.SamplingPlan.build(SCHED, 20, eta=0.5, clip_x0=1.0, prediction=prediction)
    a = dd.sample(GaussianEps(SCHED), _xT(), plan_e, seed=3)
    b = dd.sample(GaussianEps(SCHED, prediction=prediction), _xT(), plan_p, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def _round_trip_mse(model, x0, S, eps_at="current"):
    plan = dd.SamplingPlan.build(SCHED, S)
    return (dd.sample(model, dd.invert(model, x0, plan, eps_at=eps_at), plan) - x0).pow(2).mean().item()


@pytest.mark.parametrize("eps_at", ["current", "target"])
def test_inversion_round_trip_error_falls_with_steps(model, eps_at):
    x0 = (0.3 + 0.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    errs = [_round_trip_mse(model, x0, S, eps_at) for S in (10, 20, 50, 100, 200)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 5e-4 and errs[0] > 10 * errs[-1]


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_inversion_works_for_every_prediction(prediction):
    m = GaussianEps(SCHED, prediction=prediction)
    x0 = 0.3 + 0.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert _round_trip_mse(m, x0, 200) < 1e-3


def test_inversion_maps_data_to_the_ode_start(model):
    x0 = 0.3 + 0.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plan = dd.SamplingPlan.build(SCHED, 500)
    xT = dd.invert(model, x0, plan)
    exact = model.ode_solution(x0, 1.0, plan.alpha[0].item())
    assert (xT - exact).abs().max().item() < 0.02


def test_invert_refuses_a_stochastic_plan(model):
    with pytest.raises(ValueError, match="eta=0"):
        dd.invert(model, _xT(), dd.SamplingPlan.build(SCHED, 10, eta=1.0))
    with pytest.raises(ValueError, match="inversion plan"):
        dd.sample(model, _xT(), dd.SamplingPlan.build(SCHED, 10).inverse())


def test_clip_and_dynamic_threshold_bound_x0(model):
    seen = []
    plan = dd.SamplingPlan.build(SCHED, 10, threshold=0.9)
    dd.sample(model, 3 * _xT(), plan, callback=lambda i, t, x, x0: seen.append(x0.abs().max().item()))
    assert len(seen) == 10 and max(seen) <= 1.0 + 1e-12
    x0 = torch.tensor([[0.5, -2.0, 4.0, 1.0], [0.1, 0.2, -0.3, 0.4]], dtype=torch.float64)
    out = dynamic_threshold(x0, 0.5)
    s = torch.quantile(x0[0].abs(), 0.5).item()  # 1.5: the first row is clipped to +-1.5, scaled
    torch.testing.assert_close(out[0], x0[0].clamp(-s, s) / s)
    torch.testing.assert_close(out[1], x0[1])  # s < 1 is raised to 1: unchanged
    assert dynamic_threshold(x0, 1.0, s_max=2.0)[0].tolist() == [0.25, -1.0, 1.0, 0.5]


def test_callback_sees_every_step(model):
    calls = []
    plan = dd.SamplingPlan.build(SCHED, 5)
    dd.sample(model, _xT(), plan, callback=lambda i, t, x, x0: calls.append((i, t, x.shape)))
    assert [c[:2] for c in calls] == [(0, 800), (1, 600), (2, 400), (3, 200), (4, 0)]


def test_nonfinite_state_is_reported_with_its_step():
    def bad(x, t):
        return torch.where(t[:, None, None, None] < 500, torch.nan, 0.0) * x

    plan = dd.SamplingPlan.build(SCHED, 10)
    with pytest.raises(NonFiniteError, match=r"step 5 \(timestep 400\)"):
        dd.sample(bad, _xT(), plan)
    with pytest.warns(RuntimeWarning, match="step 5"):
        dd.sample(bad, _xT(), plan, nonfinite="warn")
    assert torch.isnan(dd.sample(bad, _xT(), plan, nonfinite="ignore")).all()


def test_bad_input(model):
    plan = dd.SamplingPlan.build(SCHED, 10, eta=0.5)
    x = _xT()
    with pytest.raises(ValueError, match="not both"):
        dd.sample(model, x, plan, seed=0, noise=torch.zeros(10, *SHAPE))
    with pytest.raises(ValueError, match=r"noise must have shape \(steps, \*x.shape\)"):
        dd.sample(model, x, plan, noise=torch.zeros(9, *SHAPE))
    with pytest.raises(ValueError, match="float32 or float64"):
        dd.sample(model, x.half(), plan, seed=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        dd.sample(model, torch.full(SHAPE, math.inf), plan, seed=0)
    with pytest.raises(ValueError, match="batch"):
        dd.sample(model, torch.zeros(5), plan, seed=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        dd.sample(model, x, plan, seed=-1)
    with pytest.raises(ValueError, match="input's shape"):
        dd.sample(lambda x, t: x[:, :1], x, plan, seed=0)
    with pytest.raises(ValueError, match="nonfinite must be"):
        dd.sample(model, x, plan, seed=0, nonfinite="explode")


def test_slerp():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    out = dd.slerp(z0, z1, [0.0, 0.5, 1.0])
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out[0], z0)
    torch.testing.assert_close(out[2], z1)
    # orthogonal unit vectors: the midpoint is (z0 + z1) / sqrt(2), of unit norm
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(dd.slerp(e0, e1, 0.5), (e0 + e1) / math.sqrt(2))
    # equal norms stay on the sphere all the way
    n = dd.slerp(z0, z1 * z0.norm() / z1.norm(), torch.linspace(0, 1, 7)).flatten(1).norm(dim=1)
    torch.testing.assert_close(n, torch.full((7,), z0.norm().item()))
    torch.testing.assert_close(dd.slerp(e0, 2 * e0, 0.5), 1.5 * e0)  # parallel: linear fallback
    with pytest.raises(ValueError, match="one shape"):
        dd.slerp(z0, z1[:2], 0.5)


# -- a float64 state with a float32 (or half) network ---------------------------------------------------
@pytest.mark.parametrize("net_dtype", [torch.float32, torch.bfloat16])
def test_a_float64_state_runs_the_network_in_its_own_dtype(net_dtype):
    torch.manual_seed(0)
    net = dd.UNet(dd.UNetConfig.tiny()).eval().to(net_dtype)
    plan = dd.SamplingPlan.build(dd.NoiseSchedule.linear(100, 1e-3, 0.05), 5, eta=0.5)
    x_T = dd.rng.initial_noise(0, (2, 3, 16, 16))
    seen = []
    net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    x64 = dd.sample(net, x_T.double(), plan, seed=3)
    assert x64.dtype == torch.float64 and seen == [net_dtype] * plan.steps
    x32 = dd.sample(net, x_T, plan, seed=3)  # the same network calls on the float32 state
    tol = 1e-4 if net_dtype == torch.float32 else 0.1
    torch.testing.assert_close(x64.float(), x32, rtol=0, atol=tol)
    lat = dd.invert(net, x64, dd.SamplingPlan.build(dd.NoiseSchedule.linear(100, 1e-3, 0.05), 5))
    assert lat.dtype == torch.float64 and torch.isfinite(lat).all()


def test_a_diffusers_style_output_object_is_unwrapped():
    class Out:
        def __init__(self, sample):
            self.sample = sample

    class Wrapped(torch.nn.Module):
        def forward(self, x, t):
            return Out(torch.zeros_like(x))

    plan = dd.SamplingPlan.build(SCHED, 4)
    x = dd.sample(Wrapped(), _xT(), plan)
    assert x.shape == SHAPE and torch.isfinite(x).all()
