"""backend="triton" (backends/triton.py): fused ops and the fused step kernel (the interpreter on a
CPU) against the reference sampler, under docs/DESIGN.md's tolerance rule."""


import pytest
import torch

import ddim_fast as dd
from tests.helpers import assert_close_to_reference, truth_and_low

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
SHAPE = (3, 8, 8)


def _plan(S=10, **kw):
    return dd.SamplingPlan.build(SCHED, S, **kw)


@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_triton_backend_matches_reference(tiny, eta):
    """End to end: fused ops + fused step (in-kernel noise) vs the reference."""
    pytest.importorskip("triton")
    plan = dd.SamplingPlan.build(tiny.schedule, 2, eta=eta)  # the interpreter is slow: 2 steps
    x_T = dd.rng.initial_noise(4, (2, 3, 16, 16))
    eng = dd.Engine(tiny, plan, backend="triton", device="cpu")
    got = eng.sample(2, seed=4) if eta else eng(x_T, seed=4)  # sample(): x_T drawn in-kernel
    truth, low = truth_and_low(tiny, plan, x_T, 4, torch.float32)
    assert_close_to_reference(got, low, truth, torch.float32, f"triton eta={eta}")


def test_triton_backend_inverts_like_reference(analytic):
    pytest.importorskip("triton")
    plan = _plan(5)
    x0 = 0.3 + 0.2 * torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    got = dd.Engine(analytic, plan, shape=SHAPE, backend="triton", device="cpu").invert(x0)
    low = dd.Engine(analytic, plan, shape=SHAPE, backend="reference", device="cpu").invert(x0)
    truth = dd.invert(analytic, x0.double(), plan)
    assert_close_to_reference(got, low, truth, torch.float32, "triton invert")
