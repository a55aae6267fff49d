"""Every export checks itself before a file is written: ONNX Runtime runs the graph on random inputs
and the result must meet docs/DESIGN.md's tolerance rule (ddim_fast.precision) against a float64
reference (error <= 2 x the error of the torch reference in the same precision + atol)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..checks import sample_shape
from ..conditioning import cond_spec, example_cond, null_cond
from ..plan import COL, SamplingPlan
from ..precision import NAMES, atol, tolerance_ok
from ..sampling import invert, sample
from .graph import table_feeds
from .network import Network, eval_copy
from .runtime import OrtRunner


class ExportValidationError(RuntimeError):
    """ONNX Runtime's result on the exported graph broke the tolerance rule: the file was not written."""


@torch.no_grad()
def validate_export(proto_or_path, model, plan: SamplingPlan | None, dtype=torch.float32, shape=None, *,
                    batch: int | None = None, seed: int = 0, cond: dict | None = None, guided: bool = False,
                    runner: OrtRunner | None = None, own_copy=None) -> dict:
    """Run the exported graph in ONNX Runtime (CPU EP) on random inputs and compare it with the
    float64 reference (the model in float64; ddim_fast.sampling for a sampler). Raises
    ExportValidationError when the tolerance rule fails; returns the errors otherwise.
    cond: example conditioning inputs of the graph (their shapes; fresh random values are drawn);
    guided: the sampler graph does classifier-free guidance (random uncond, a scale of 2.5); runner: a CPU
    OrtRunner already open on the graph (the caller keeps it), else one is opened here; own_copy: a private
    network.eval_copy(model, dtype) the check may use and then convert to float64 in place (one copy of the
    weights instead of two)."""
    shape = sample_shape(model, shape)
    # batch 2: not the traced batch (network.TRACE_BATCH = 3), so the dynamic batch is checked, and per-sample
    # ops (GroupNorm, thresholding) see two samples. Torch's float64 convolutions split the batch over the
    # threads: on 2 cores a third sample doubled the CIFAR-10 UNet's float64 reference (0.31 -> 0.60 s).
    batch = batch or 2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen)  # (B, C, H, W)
    low_model = own_copy if own_copy is not None else eval_copy(model, dtype)
    low = Network(low_model, dtype)
    runner = runner or OrtRunner(proto_or_path, device="cpu")
    c, c64, kw, kw64, feeds_c = _random_cond(model, cond, guided, batch, gen)
    if plan is None:
        T = getattr(getattr(model, "schedule", None), "T", 1000)
        t = torch.randint(0, T, (batch,), generator=gen)
        ref_low = low(x, t, **c)
        m64 = low_model.double() if own_copy is not None else eval_copy(model, torch.float64)
        ref64 = _tensor(m64(x.double(), t, **c64))
        fast = runner(x=x, t=t, **c)
    else:
        m64 = eval_copy(model, torch.float64)
        noise = torch.randn(plan.steps, *x.shape, generator=gen) if plan.needs_noise else None
        tables = table_feeds(plan) if "coef" in runner.inputs else {}  # a table-input graph gets the plan's
        if plan.direction == "invert":
            ref64, ref_low = invert(m64, x.double(), plan, **kw64), invert(low, x, plan, **kw)
            fast = runner(x0=x, **tables, **feeds_c)
        else:
            n64 = noise.double() if noise is not None else None
            ref64, ref_low = sample(m64, x.double(), plan, noise=n64, **kw64), sample(low, x, plan, noise=noise, **kw)
            feeds = {"x_T": x} if noise is None else {"x_T": x, "noise": noise}
            fast = runner(**feeds, **tables, **feeds_c)
    err_fast = (fast.double() - ref64).abs().max().item()
    err_low = (ref_low.double() - ref64).abs().max().item()
    what = "eps-model" if plan is None else f"{plan.direction} sampler ({plan.steps} steps)"
    if not (math.isfinite(err_fast) and tolerance_ok(err_fast, err_low, dtype)):
        raise ExportValidationError(
            f"the exported {what} does not match the reference: max error vs float64 {err_fast:.3g}, but the "
            f"torch reference in {NAMES[dtype]} has {err_low:.3g} (allowed: 2 x that + "
            f"{atol(dtype):g}). Nothing was written; please report this with the model config"
        )
    return {"err_onnx": err_fast, "err_torch": err_low}


def _tensor(out):
    return out if isinstance(out, torch.Tensor) else out.sample


def _random_cond(model, example, guided, batch, gen):
    """Random conditioning like `example` for `batch` samples: (cond, cond in float64, the sampler's
    keywords, the float64 sampler's keywords, the graph's conditioning feeds)."""
    if not example:
        return {}, {}, {}, {}, {}
    spec = cond_spec(model) or {}

    def draw():
        out = {}
        for k, v in example.items():
            if k in spec:
                out[k] = example_cond({k: spec[k]}, batch, gen, length=v.shape[1] if v.ndim > 1 else 8)[k]
            elif v.is_floating_point():
                out[k] = torch.randn(batch, *v.shape[1:], generator=gen)
            else:
                out[k] = v[:1].expand(batch, *v.shape[1:]).clone()
        return out

    def f64(d):
        return {k: v.double() if v.is_floating_point() else v for k, v in d.items()}

    c = draw()
    if not guided:
        return c, f64(c), {"cond": c}, {"cond": f64(c)}, dict(c)
    u = null_cond({k: spec[k] for k in c if k in spec}, batch) if set(c) <= set(spec) else None
    u = draw() if u is None else u
    w = 2.5
    feeds = {**c, **{f"uncond_{k}": v for k, v in u.items()}, "guidance": torch.tensor(w, dtype=torch.float32)}
    return (c, f64(c), {"cond": c, "uncond": u, "guidance": w},
            {"cond": f64(c), "uncond": f64(u), "guidance": w}, feeds)


def head(plan: SamplingPlan, k: int) -> SamplingPlan:
    """The first k steps of a plan (same variance, clipping and noise flag), for validation."""
    head = dataclasses.replace(plan, timesteps=plan.timesteps[:k], alpha=plan.alpha[:k],
                               alpha_next=plan.alpha_next[:k], coef=plan.coef[:k])
    if head.needs_noise != plan.needs_noise:  # the noise input would differ: validate with noise on
        coef = head.coef.clone()
        coef[:, COL["sigma"]] += 1e-3
        head = dataclasses.replace(head, coef=coef)
    return head


def check_loop_tables(proto, plan: SamplingPlan):
    """The Loop's trip count, coefficient table and timesteps are exactly the plan's (float32)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}

    def one(hint):
        names = [n for n in inits if n.startswith(f"ddim/{hint}_")]
        if len(names) != 1:
            raise ExportValidationError(f"the exported Loop has {len(names)} '{hint}' tables; please report this")
        return numpy_helper.to_array(inits[names[0]])

    coef = plan.to("cpu", torch.float32).coef.numpy()
    ok = (np.array_equal(one("coef_table"), coef) and np.array_equal(one("timesteps"), plan.timesteps.numpy())
          and int(one("trips")) == plan.steps)
    if not ok:
        raise ExportValidationError("the exported Loop's tables differ from the plan's; nothing was written. "
                                    "Please report this with the model config")
