"""The fused step kernel against the reference update, on odd shapes, every clip mode and dtype.

On a CPU the kernel runs in the Triton interpreter (tests/conftest.py); with CUDA, on the GPU.
"""

import math

import pytest
import torch

pytest.importorskip("triton")  # an extra (gpu, dev): without it these tests skip

from ddim_fast import rng
from ddim_fast.kernels import ddim_step as step_mod
from ddim_fast.kernels.ddim_step import abs_order_stats, ddim_step, ddim_step_ref, initial_noise, threshold_scale
from ddim_fast.models.analytic import GaussianEps
from ddim_fast.plan import COL, SamplingPlan
from ddim_fast.sampling import sample, step
from ddim_fast.schedule import NoiseSchedule
from tests.helpers import assert_close_to_reference, poisoned_like

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCHED = NoiseSchedule.linear(1000, 1e-4, 0.02)
CLIPS = {"none": {}, "range": {"clip_x0": (-0.7, 0.9)}, "threshold": {"threshold": 0.8, "threshold_max": 1.6}}


def _plan(clip="none", eta=0.5, steps=6, prediction="eps"):
    return SamplingPlan.build(SCHED, steps=steps, eta=eta, prediction=prediction, **CLIPS[clip])


def _clip_args(plan):
    threshold = (plan.threshold, plan.threshold_max) if plan.threshold is not None else None
    return dict(clip=plan.clip_x0, threshold=threshold)


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g)).to(DEV)  # wide enough that clipping bites
    m = torch.randn(shape, generator=g).to(DEV, dtype)
    return x, m


def _run(x, m, plan, i, seed=None, first_index=0):
    """The kernel on copies: returns (x', x0); the x0 buffer starts as NaN."""
    coef = plan.to(DEV).coef
    xk = x.clone()
    x0 = poisoned_like(xk)
    step_t = torch.tensor([i], dtype=torch.int32, device=DEV)
    seed_t = None if seed is None else torch.tensor([seed], dtype=torch.int64, device=DEV)
    out = ddim_step(xk, m, coef, step_t, seed=seed_t, first_index=first_index, x0_out=x0, **_clip_args(plan))
    assert out is xk  # in place
    return xk, x0


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 2, 17, 19), (2, 1100)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", list(CLIPS))
def test_step_matches_reference(shape, dtype, clip):
    """x' and x0 under the tolerance rule, noise included (eta > 0, seed, first_index)."""
    plan = _plan(clip)
    i, seed, first = 2, 1234, 5
    x, m = _inputs(shape, dtype, seed=len(shape) * 7 + DTYPES.index(dtype))
    got, got_x0 = _run(x, m, plan, i, seed=seed, first_index=first)
    z = rng.step_noise(seed, i, shape, first_index=first, device=DEV)
    args = _clip_args(plan)
    # the reference in the run's precision: fp32 state, fp32 coefficients, the low-precision m
    ref, ref_x0 = ddim_step_ref(x, m, plan.to(DEV).coef, i, z=z, **args)
    # the truth: float64 everything, the plan's float64 coefficients
    truth, truth_x0 = ddim_step_ref(x.double(), m.double(), plan.coef.to(DEV), i, z=z.double(), **args)
    assert_close_to_reference(got, ref, truth, dtype, f"x' {shape} {dtype} {clip}")
    assert_close_to_reference(got_x0, ref_x0, truth_x0, dtype, f"x0 {shape} {dtype} {clip}")


@pytest.mark.parametrize("clip", list(CLIPS))
def test_reference_update_is_sampling_step(clip):
    """ddim_step_ref (the kernel file's plain-PyTorch statement) equals ddim_fast.sampling.step."""
    plan = _plan(clip)
    x, m = _inputs((2, 3, 4, 5), torch.float32, seed=3)
    z = torch.randn_like(x)
    for i in range(plan.steps):
        want, want_x0 = step(x, m, plan.to(DEV).coef[i], plan, z)
        got, got_x0 = ddim_step_ref(x, m, plan.to(DEV).coef, i, z=z, **_clip_args(plan))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got_x0, want_x0, rtol=0, atol=0)


def test_noise_is_the_reference_stream():
    """With only sigma = 1 the kernel writes z itself: rng.step_noise to float32 rounding, and the
    same sample gets the same noise at any batch size (first_index addresses it)."""
    coef = torch.zeros(4, 6, device=DEV)
    coef[3, COL["sigma"]] = 1.0
    shape, seed = (3, 3, 9, 11), 2**40 + 7
    x = torch.zeros(shape, device=DEV)
    step_t = torch.tensor([3], dtype=torch.int32, device=DEV)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEV)
    z = ddim_step(x, torch.zeros_like(x), coef, step_t, seed=seed_t, first_index=4).clone()
    want = rng.step_noise(seed, 3, shape, first_index=4, device=DEV)
    torch.testing.assert_close(z, want, rtol=2e-6, atol=2e-6)
    alone = torch.zeros(1, *shape[1:], device=DEV)
    ddim_step(alone, torch.zeros_like(alone), coef, step_t, seed=seed_t, first_index=5)
    torch.testing.assert_close(alone[0], z[1], rtol=0, atol=0)
    assert z.std() > 0.9 and abs(z.mean()) < 0.05  # sanity: these are normals


def test_first_index_from_device_memory():
    """first_index as a (1,) int64 device tensor (what a CUDA graph replays) = the int."""
    coef = torch.zeros(2, 6, device=DEV)
    coef[1, COL["sigma"]] = 1.0
    shape = (2, 3, 5, 4)
    step_t = torch.tensor([1], dtype=torch.int32, device=DEV)
    seed_t = torch.tensor([77], dtype=torch.int64, device=DEV)
    a = ddim_step(torch.zeros(shape, device=DEV), torch.zeros(shape, device=DEV), coef, step_t, seed=seed_t,
                  first_index=torch.tensor([9], dtype=torch.int64, device=DEV))
    b = ddim_step(torch.zeros(shape, device=DEV), torch.zeros(shape, device=DEV), coef, step_t, seed=seed_t,
                  first_index=9)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, rng.step_noise(77, 1, shape, first_index=9, device=DEV), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 1, 33, 31)])
def test_initial_noise_is_the_reference_x_T(shape):
    seed = 2**33 + 5
    x = poisoned_like(torch.empty(shape, device=DEV))
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEV)
    out = initial_noise(x, seed_t, torch.tensor([6], dtype=torch.int64, device=DEV))
    assert out is x
    torch.testing.assert_close(x, rng.initial_noise(seed, shape, first_index=6, device=DEV), rtol=2e-6, atol=2e-6)
    one = initial_noise(torch.empty(1, *shape[1:], device=DEV), seed_t, 6 + shape[0] - 1)
    assert torch.equal(one[0], x[-1])  # batch-invariant
    with pytest.raises(ValueError, match="seed must be a"):
        initial_noise(x, seed, 0)
    with pytest.raises(ValueError, match="at most 65535 programs"):  # 256 KB: the check, not the memory
        initial_noise(torch.empty(65536, 1, device=DEV), seed_t, 0)


def test_zero_sigma_draws_nothing():
    """A step whose sigma is 0 ignores the seed; eta = 0 (no seed) gives the same bits."""
    plan = SamplingPlan.build(SCHED, steps=5, variance="large")  # no noise on the last step
    assert plan.column("sigma")[-1] == 0 and plan.column("sigma")[0] > 0
    x, m = _inputs((2, 3, 5, 5), torch.float16, seed=1)
    with_seed, _ = _run(x, m, plan, plan.steps - 1, seed=99)
    without, _ = _run(x, m, plan, plan.steps - 1, seed=None)
    assert torch.equal(with_seed, without)
    noisy, _ = _run(x, m, plan, 0, seed=99)
    quiet, _ = _run(x, m, plan, 0, seed=None)
    assert not torch.allclose(noisy, quiet)


def test_step_index_is_read_from_device_memory():
    """The same launch arguments follow the step tensor's content (a CUDA graph replays it)."""
    plan = _plan("none", eta=0.0)
    coef = plan.to(DEV).coef
    x, m = _inputs((2, 4, 3, 3), torch.float32, seed=2)
    step_t = torch.zeros(1, dtype=torch.int32, device=DEV)
    got = []
    for i in range(3):
        step_t.fill_(i)
        got.append(ddim_step(x.clone(), m, coef, step_t))
    for i in range(3):
        want, _ = ddim_step_ref(x, m, coef, i)
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got[0], got[2])


def test_nonfinite_flag_is_set_and_sticky():
    plan = _plan("range")
    coef = plan.to(DEV).coef
    x, m = _inputs((3, 2, 7, 5), torch.float16, seed=4)
    step_t = torch.tensor([1], dtype=torch.int32, device=DEV)
    flag = torch.zeros(1, dtype=torch.int32, device=DEV)
    ddim_step(x.clone(), m, coef, step_t, flag=flag, clip=plan.clip_x0)
    assert flag.item() == 0
    for bad in (float("nan"), float("inf")):
        m_bad = m.clone()
        m_bad[2, 1, 6, 4] = bad  # the last element of the batch: the masked tail block
        out = ddim_step(x.clone(), m_bad, coef, step_t, flag=flag, clip=plan.clip_x0)
        assert flag.item() == 1 and not torch.isfinite(out[2, 1, 6, 4])  # NaN survives the clamp
        ddim_step(x.clone(), m, coef, step_t, flag=flag)  # a clean step does not clear it
        assert flag.item() == 1
        flag.zero_()


@pytest.mark.parametrize("n", [1, 2, 37, 1100])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.995, 1.0])
def test_threshold_scale_is_torch_quantile(n, p):
    """The two order statistics and torch.lerp reproduce torch.quantile (linear interpolation) exactly."""
    g = torch.Generator().manual_seed(n)
    x = (3 * torch.randn(3, n, generator=g)).to(DEV)
    m = torch.randn(3, n, generator=g).to(DEV, torch.float16)
    coef = torch.tensor([[0.8, -0.6, 0, 0, 0, 0]], device=DEV)
    step_t = torch.zeros(1, dtype=torch.int32, device=DEV)
    s = threshold_scale(x, m, coef, step_t, p, s_max=2.5)
    x0 = 0.8 * x - 0.6 * m.float()
    want = torch.quantile(x0.abs(), p, dim=1).clamp(1.0, 2.5)
    torch.testing.assert_close(s, want, rtol=0, atol=0)


def _rows_with_hard_cases(n, seed):
    """(6, n) float32 rows: random; heavy ties; one value repeated everywhere; neighbouring floats
    (1 ulp apart) around every rank; signs, -0.0 and inf (the select is over |a|); huge/tiny."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, generator=g)]
    rows.append(torch.randint(0, 3, (n,), generator=g).float() * 0.25)  # values 0, 0.25, 0.5: ties
    rows.append(torch.full((n,), 1.5))
    base = torch.full((n,), 1.0).view(torch.int32) + torch.randint(0, 3, (n,), generator=g, dtype=torch.int32)
    rows.append(base.view(torch.float32))  # 1.0 and its next two floats: ranks fall between 1-ulp steps
    r = torch.randn(n, generator=g)
    r[:: 3] = -0.0
    r[1:: 5] = float("inf")
    rows.append(-r.abs() if n % 2 else r)
    rows.append(torch.randn(n, generator=g) * torch.tensor(10.0).pow(torch.randint(-30, 30, (n,), generator=g)))
    return torch.stack(rows).to(DEV)  # (6, n)


# block None: the row in registers (one chunk); 16: the chunked passes, a partial last chunk
@pytest.mark.parametrize("n,block", [(1, None), (2, None), (5, None), (37, None), (300, None), (21, 16)])
def test_abs_order_stats_are_exact_order_statistics(n, block, monkeypatch):
    """The select kernel against a sort of |a|: every kind of rank pair torch.quantile asks for."""
    if block is not None:
        monkeypatch.setattr(step_mod, "SELECT_BLOCK", block)
        assert step_mod.select_config(n)[:2] == (16, 2)
    a = _rows_with_hard_cases(n, seed=n)
    want = a.abs().sort(dim=1).values  # (6, n)
    ranks = {0, n // 2, n - 1} if block else {0, n // 3, n // 2, max(n - 2, 0), n - 1}
    for k in sorted(ranks):
        k2 = min(k + 1, n - 1)
        got = abs_order_stats(a, k, k2)
        assert torch.equal(got[:, 0], want[:, k]) and torch.equal(got[:, 1], want[:, k2]), (n, k, got)


@pytest.mark.parametrize("p", [0.0001, 0.37, 0.5, 0.995, 1.0])
def test_threshold_scale_on_hard_rows_is_torch_quantile(p):
    """Through threshold_scale (x0 = x, so |x0| = |a|): ties, 1-ulp neighbours at the rank, inf."""
    a = _rows_with_hard_cases(29, seed=3)
    coef = torch.tensor([[1.0, 0, 0, 0, 0, 0]], device=DEV)
    s = threshold_scale(a, torch.zeros_like(a), coef, torch.zeros(1, dtype=torch.int32, device=DEV), p)
    want = torch.quantile(a.abs(), p, dim=1).clamp(1.0, math.inf)  # inf at the rank: NaN in both (lerp)
    torch.testing.assert_close(s, want, rtol=0, atol=0, equal_nan=True)


def test_abs_order_stats_propagate_nan_like_torch_quantile():
    a = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)).to(DEV)
    a[1, 17] = float("nan")
    got = abs_order_stats(a, 20, 21)
    want = torch.quantile(a.abs(), 20.5 / 39, dim=1)
    assert got[1].isnan().all() and want[1].isnan()
    assert torch.isfinite(got[[0, 2]]).all()


def test_abs_order_stats_bad_inputs():
    a = torch.zeros(2, 5, device=DEV)
    for call, words in [(lambda: abs_order_stats(a.double(), 0, 0), "float32"),
                        (lambda: abs_order_stats(a.t(), 0, 0), "contiguous"),
                        (lambda: abs_order_stats(a, 3, 2), "ranks"),
                        (lambda: abs_order_stats(a, 1, 3), "ranks"),
                        (lambda: abs_order_stats(a, 4, 5), "ranks")]:
        with pytest.raises(ValueError, match=words):
            call()


def test_sampling_loop_matches_reference_sampler():
    """A whole eta > 0 run with dynamic thresholding: the kernel loop equals dd.sample(seed=...)."""
    plan = SamplingPlan.build(SCHED, steps=8, eta=0.7, threshold=0.9, threshold_max=2.0)
    model = GaussianEps(SCHED, mu=0.3, std=0.5).to(DEV)
    x_T = rng.initial_noise(7, (3, 2, 5, 3), device=DEV)
    want = sample(model, x_T, plan, seed=7, first_index=2)
    truth = sample(model.double(), x_T.double(), plan, seed=7, first_index=2)
    x = x_T.clone()
    coef, ts = plan.to(DEV).coef, plan.timesteps.to(DEV)
    seed_t = torch.tensor([7], dtype=torch.int64, device=DEV)
    step_t = torch.zeros(1, dtype=torch.int32, device=DEV)
    for i in range(plan.steps):
        step_t.fill_(i)
        ddim_step(x, model(x, ts[i].expand(3)), coef, step_t, seed=seed_t, first_index=2,
                  threshold=(plan.threshold, plan.threshold_max))
    assert_close_to_reference(x, want, truth, torch.float32, "8-step sampler")


def test_bad_inputs_name_the_fix():
    coef = _plan().to(DEV).coef
    x = torch.zeros(2, 3, 4, 4, device=DEV)
    st = torch.zeros(1, dtype=torch.int32, device=DEV)
    cases = [
        (dict(x=x.half()), "float32"),
        (dict(x=x.transpose(2, 3)), "contiguous"),
        (dict(m=torch.zeros(2, 3, 4, 5, device=DEV)), "shape"),
        (dict(m=x.double()), "dtype"),
        (dict(coef=coef.double()), "plan.to"),
        (dict(step=st.long()), "int32"),
        (dict(seed=torch.zeros(1, dtype=torch.int32, device=DEV)), "int64"),
        (dict(first_index=-1), "first_index"),
        (dict(clip=(1.0, -1.0)), "lo < hi"),
        (dict(threshold=(1.5, 2.0)), "0 < p"),
        (dict(clip=(-1, 1), threshold=(0.9, 2.0)), "not both"),
        (dict(x0_out=torch.zeros(2, 3, 4, 4, device=DEV).half()), "x0_out"),
        (dict(flag=torch.zeros(1, dtype=torch.int64, device=DEV)), "flag"),
        (dict(x=torch.zeros(65536, 1, device=DEV), m=torch.zeros(65536, 1, device=DEV)), "at most 65535 programs"),
    ]
    for change, words in cases:
        args = dict(x=x, m=torch.zeros_like(x), coef=coef, step=st)
        args.update(change)
        kw = {k: args.pop(k) for k in list(args) if k not in ("x", "m", "coef", "step")}
        with pytest.raises(ValueError, match=words):
            ddim_step(args["x"], args["m"], args["coef"], args["step"], **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_on_gpu_at_model_size(dtype):
    """A CelebA-sized batch on the device: all clip modes at once would repeat the above; here
    the size (many blocks per sample, grid dim 1 = batch) is the point."""
    plan = _plan("threshold", eta=1.0)
    shape, i, seed = (16, 3, 64, 64), 4, 11
    x, m = _inputs(shape, dtype, seed=0)
    got, got_x0 = _run(x, m, plan, i, seed=seed, first_index=3)
    z = rng.step_noise(seed, i, shape, first_index=3, device=DEV)
    ref, _ = ddim_step_ref(x, m, plan.to(DEV).coef, i, z=z, **_clip_args(plan))
    truth, _ = ddim_step_ref(x.double(), m.double(), plan.coef.to(DEV), i, z=z.double(), **_clip_args(plan))
    assert_close_to_reference(got, ref, truth, dtype, "gpu step")
    assert math.isfinite(got_x0.sum().item())
