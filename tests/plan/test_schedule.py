import math
import warnings

import numpy as np
import pytest
import torch

import ddim_fast as dd
from ddim_fast.schedule import NoiseSchedule, timesteps

# -- schedules: hand-computed cases ----------------------------------------------------------------


def test_linear_hand_computed():
    s = NoiseSchedule.linear(4, 0.1, 0.4)
    assert s.betas.dtype == torch.float64 and s.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(s.betas, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    torch.testing.assert_close(
        s.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504, 0.3024], dtype=torch.float64), rtol=0, atol=1e-15
    )


def test_linear_paper_endpoints():
    s = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
    assert s.T == 1000
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    # alpha_bar at T-1 for the DDPM linear schedule is about 4.04e-5
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_scaled_linear_hand_computed():
    s = NoiseSchedule.scaled_linear(3, 0.01, 0.09)  # sqrt: 0.1, 0.2, 0.3
    torch.testing.assert_close(s.betas, torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64))


def test_cosine_matches_formula_and_caps():
    T, s_ = 10, 0.008
    s = NoiseSchedule.cosine(T)
    f = [math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2 for t in range(T + 1)]
    expect = [min(1 - f[t + 1] / f[t], 0.999) for t in range(T)]
    torch.testing.assert_close(s.betas, torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-15)
    assert s.betas[-1].item() == 0.999  # the last beta of the raw cosine is 1: capped
    # alpha_bar follows f(t+1)/f(0) until the cap bites
    assert s.alphas_cumprod[3].item() == pytest.approx(f[4] / f[0], rel=1e-12)


def test_from_betas_and_dict_round_trip():
    for s in (NoiseSchedule.linear(50), NoiseSchedule.cosine(20), NoiseSchedule.scaled_linear(30),
              NoiseSchedule.from_betas([0.1, 0.2])):
        s2 = NoiseSchedule.from_dict(s.to_dict())
        assert torch.equal(s.betas, s2.betas)


@pytest.mark.parametrize("betas", [[0.0, 0.1], [0.5, 1.0], [float("nan")], [], [[0.1]]])
def test_bad_betas(betas):
    with pytest.raises(ValueError, match="beta"):
        NoiseSchedule.from_betas(torch.tensor(betas, dtype=torch.float64))


def test_unknown_schedule_kind():
    with pytest.raises(ValueError, match="unknown noise schedule kind"):
        NoiseSchedule.from_dict({"kind": "sigmoid"})


# -- timesteps ------------------------------------------------------------------------------------


def test_uniform_matches_official_when_divisible():
    assert timesteps(1000, 10).tolist() == list(range(900, -1, -100))
    assert timesteps(1000, 50).tolist() == list(range(0, 1000, 20))[::-1]


def test_uniform_gives_exactly_S_when_not_divisible():
    ts = timesteps(1000, 7)
    assert ts.tolist() == [852, 710, 568, 426, 284, 142, 0]
    assert len(range(0, 1000, 1000 // 7)) == 8  # what the official code would have given


def test_quad_hand_computed():
    # int((i * sqrt(800) / 9)^2) = int(800 i^2 / 81)
    assert timesteps(1000, 10, "quad").tolist() == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]


def test_quad_removes_duplicates_with_warning():
    with pytest.warns(UserWarning, match="repeats 4 timestep"):
        ts = timesteps(1000, 100, "quad")
    assert len(ts) == 96 and len(set(ts.tolist())) == 96


def test_leading_with_offset():
    assert timesteps(1000, 10, "leading", steps_offset=1).tolist() == list(range(901, 0, -100))
    with pytest.raises(ValueError, match="steps_offset"):
        timesteps(1000, 10, "leading", steps_offset=100)
    with pytest.raises(ValueError, match="steps_offset"):
        timesteps(1000, 10, "uniform", steps_offset=1)


def test_trailing_and_linspace_hand_computed():
    assert timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    # diffusers: round(arange(1000, 0, -1000/7)) - 1
    assert timesteps(1000, 7, "trailing").tolist() == [999, 856, 713, 570, 428, 285, 142]
    assert timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


@pytest.mark.parametrize("spacing", ["uniform", "leading", "trailing", "linspace"])
@pytest.mark.parametrize("T", [1000, 37, 4])
def test_every_spacing_gives_exactly_S_descending(spacing, T):
    for S in sorted({1, 2, 3, T // 3 or 1, T // 2 or 1, T - 1 or 1, T}):
        ts = timesteps(T, S, spacing)
        assert ts.dtype == torch.long and len(ts) == S
        assert (ts[:-1] > ts[1:]).all(), (S, ts)
        assert ts.min() >= 0 and ts.max() < T


def test_trailing_visits_T_minus_1_and_uniform_does_not():
    assert timesteps(1000, 10, "trailing")[0] == 999
    assert timesteps(1000, 10, "uniform")[0] == 900


def test_explicit_list():
    assert timesteps(100, None, [0, 10, 50]).tolist() == [50, 10, 0]
    assert timesteps(100, None, torch.tensor([99, 3])).tolist() == [99, 3]
    with pytest.raises(ValueError, match="sorted"):
        timesteps(100, None, [0, 50, 10])
    with pytest.raises(ValueError, match="duplicates"):
        timesteps(100, None, [0, 10, 10])
    with pytest.raises(ValueError, match=r"timesteps \[0, 100\] has 100 outside \[0, T-1\] = \[0, 99\]"):
        timesteps(100, None, [0, 100])
    with pytest.raises(ValueError, match="empty"):
        timesteps(100, None, [])


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True, None])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, T=1000\]"):
        timesteps(1000, steps)


def test_unknown_spacing():
    with pytest.raises(ValueError, match="unknown spacing 'cubic'"):
        timesteps(1000, 10, "cubic")


def test_no_warning_without_duplicates():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timesteps(1000, 10, "quad")


# -- the official quad list, diffusers' trailing / linspace --------------------------------------------
@pytest.mark.parametrize("T", [500, 1000, 4000])
def test_quad_equals_the_official_numpy_list_for_every_S(T):
    """The official code: int(s) for s in np.linspace(0, sqrt(0.8 T), S) ** 2 (duplicates removed here)."""
    wrong = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the duplicate-removal warning fires for most S
        for S in range(2, T + 1):
            official = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64)
            if timesteps(T, S, "quad").tolist() != sorted(set(official.tolist()), reverse=True):
                wrong.append(S)
    assert wrong == []


def test_quad_ends_on_800_at_S_100():
    """sqrt(800) ** 2 = 800.0000000000001: the official S=100 list starts at 800, not 799."""
    with pytest.warns(UserWarning, match="repeats"):
        assert timesteps(1000, 100, "quad")[0] == 800


def test_trailing_and_linspace_equal_diffusers_for_every_S():
    diffusers = pytest.importorskip("diffusers")
    T, wrong = 1000, []
    for spacing in ("trailing", "linspace"):
        sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        for S in range(1, T + 1):
            sched.set_timesteps(S)
            # diffusers' trailing arange can overshoot by one entry (a timestep -1): compare the first S
            if timesteps(T, S, spacing).tolist() != sched.timesteps[:S].tolist():
                wrong.append((spacing, S))
    assert wrong == []
