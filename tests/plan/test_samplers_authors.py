"""The multistep samplers against their authors' own code, in float64: DPM-Solver++
(LuChengTHU/dpm-solver, dpm_solver_pytorch.py) and UniPC (wl-zhao/UniPC, uni_pc.py).

Those files are not part of this project and are never copied into it: point DDIM_FAST_AUTHORS_REF at a
folder holding them (e.g. from clones of the two repositories) to run these checks; without it they skip,
saying so. CI runs tests/plan/test_samplers.py instead, whose float64 reference is diffusers with its tables
patched to float64.

The authors solve in continuous time t in [1/N, 1] over a discrete schedule (log alpha piecewise linear
between t_n = (n + 1) / N); their `time_uniform` grid from 1 to t_end lands on whole timesteps when
t_end = 1 - S k / N, so the same S timesteps (999, 999 - k, ...) with final_alpha = alpha_bar at t_end
is a plan of ours. Their lower_order_final rules differ from diffusers' (DPM-Solver: only for steps < 10),
so the comparison runs with lower_order_final=False on both sides.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import ddim_fast as dd
from ddim_fast.sampling import sample
from tests.helpers import ToyNet, toy_x

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
REF = os.environ.get("DDIM_FAST_AUTHORS_REF")


def _module(name):
    path = Path(REF or "") / f"{name}.py"
    if not REF or not path.is_file():
        pytest.skip(f"the authors' {name}.py is not available: set DDIM_FAST_AUTHORS_REF to a folder holding it "
                    "(it is not shipped; tests/plan/test_samplers.py checks against float64-patched diffusers instead)")
    spec = importlib.util.spec_from_file_location(f"authors_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _authors_run(kind, model, x, S, k, order):
    """The authors' multistep solver from t = 1 to t_end = 1 - S k / N, in float64."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # their time grid is made with the default dtype
    try:
        mod = _module("dpm_solver_pytorch" if kind == "dpm" else "uni_pc")
        ns = mod.NoiseScheduleVP("discrete", alphas_cumprod=SCHED.alphas_cumprod.double(), dtype=torch.float64)
        model_fn = mod.model_wrapper(model, ns, model_type="noise")
        if kind == "dpm":
            solver = mod.DPM_Solver(model_fn, ns, algorithm_type="dpmsolver++")
        else:
            solver = mod.UniPC(model_fn, ns, variant="bh2")
        t_end = 1.0 - S * k / SCHED.T
        return solver.sample(x, steps=S, t_start=1.0, t_end=t_end, order=order, skip_type="time_uniform",
                             method="multistep", lower_order_final=False)
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("kind, sampler, order, S, k", [
    ("dpm", "dpmpp_2m", 2, 10, 99), ("dpm", "dpmpp_3m", 3, 12, 80), ("dpm", "dpmpp_3m", 3, 20, 49),
    ("unipc", "unipc", 2, 10, 99), ("unipc", "unipc", 3, 12, 80), ("unipc", "unipc", 1, 8, 120),
])
def test_equals_the_authors_code_in_float64(kind, sampler, order, S, k, capsys):
    model, x = ToyNet(), toy_x()
    theirs = _authors_run(kind, model, x, S, k, order)
    ts = [SCHED.T - 1 - j * k for j in range(S)]
    plan = dd.SamplingPlan.build(SCHED, spacing=ts, sampler=sampler, order=order, lower_order_final=False,
                                 final_alpha=float(SCHED.alphas_cumprod[SCHED.T - 1 - S * k]))
    ours = sample(model, x, plan)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    with capsys.disabled():
        print(f"\n  {sampler} order {order} S={S}: max |ours - authors'| / max |authors'| = {rel:.2e}")
    assert rel <= 1e-9
