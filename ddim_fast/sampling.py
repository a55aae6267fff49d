"""Reference samplers: plain PyTorch, one loop each, the single source of truth.

Every fast path (Triton, CUDA graph, ONNX Runtime) is tested against these functions. Equation
numbers are those of Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (ICLR 2021).
The per-step coefficients come from a SamplingPlan (see plan.py for their derivation), so the
loop body below is the same for every eta, variance and prediction type.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from . import conditioning, rng
from .models.diffusers_unet import adapt
from .plan import COL, HISTORY_WEIGHTS, SamplingPlan

NONFINITE = ("raise", "warn", "ignore")


class NonFiniteError(FloatingPointError, ValueError):
    """The sampler state became NaN or inf; the message names the step and timestep."""


@torch.no_grad()
def sample(
    model,
    x_T: torch.Tensor,
    plan: SamplingPlan,
    *,
    seed: int | None = None,
    noise: torch.Tensor | None = None,
    callback=None,
    first_index: int = 0,
    nonfinite: str = "raise",
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance: float | None = None,
) -> torch.Tensor:
    """Run `plan` from x_T down to x_0 and return the final state (not clamped).

    model:       callable model(x, t, **cond) -> prediction, t a LongTensor (B,) of training
                 timesteps; a diffusers UNet2DModel / UNet2DConditionModel is taken as it is.
    x_T:         (B, ...) float32 or float64 start; the state keeps this dtype throughout. A model
                 with parameters runs in their dtype (its input is cast to it and its output back).
    seed:        key of the per-step noise z (rng.step_noise), so sample b gets the same noise
                 at any batch size; `first_index` is the global index of sample 0 of the batch.
    noise:       (S, B, ...) explicit z for every step instead of a seed (parity tests, ONNX).
                 With neither, a plan that needs noise draws a seed from torch's global RNG.
    callback:    callback(i, t, x, x0) after each step i, with the new state and the x0 estimate.
    nonfinite:   "raise" (default) | "warn" | "ignore" when the state becomes NaN or inf.
    cond:        the model's conditioning, a dict of (B, ...) tensors, e.g. {"class_labels": y}.
    guidance:    None (default): one plain call model(x, t, **cond) per step. A number w: classifier-
                 free guidance, one call on the doubled batch [uncond; cond], then
                 m = m_u + w (m_c - m_u) (w = 0: the unconditional branch alone, w = 1: the
                 conditional one). uncond defaults to the model's null input (the null label of a
                 class-conditional UNet); a model without one needs it given. The noise of a sample
                 depends only on (seed, sample index), never on cond or guidance.
    """
    x = _check_state(x_T, "x_T")
    if plan.direction != "sample":
        raise ValueError("sample() needs a sampling plan; this one is an inversion plan (use invert())")
    model = adapt(model)
    cc = conditioning.resolve(model, x.shape[0], cond, uncond, guidance, x.device)
    draw = _noise_source(plan, x, seed, noise, first_index)
    return _run(model, x, plan, draw, callback, nonfinite, cc)


@torch.no_grad()
def invert(
    model,
    x0: torch.Tensor,
    plan: SamplingPlan,
    *,
    eps_at: str | None = None,
    callback=None,
    nonfinite: str = "raise",
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance: float | None = None,
) -> torch.Tensor:
    """DDIM encoding (Section 5.4): run the eta=0 ODE from data x0 up to x_T.

    `plan` is the sampling plan whose sampler should reconstruct x0 (its inverse is built
    here), or an inversion plan from `plan.inverse()`. eps_at: "current" (default, the ODE) or
    "target" (diffusers / prompt-to-prompt), see SamplingPlan.inverse. Never clips.
    cond, uncond, guidance: as in sample(), with m formed the same way at every step. Encode with the
    conditioning you will decode with; guidance > 1 (as in null-text inversion) is allowed but the
    inversion then no longer reconstructs x0 exactly, so plain cond (guidance None) is the usual choice.
    """
    x = _check_state(x0, "x0")
    model = adapt(model)
    cc = conditioning.resolve(model, x.shape[0], cond, uncond, guidance, x.device)
    if plan.direction == "sample":
        plan = plan.inverse(eps_at or "current")
    elif eps_at is not None and eps_at != plan.eps_at:
        raise ValueError(f"this inversion plan evaluates eps at {plan.eps_at!r}, not {eps_at!r}")
    return _run(model, x, plan, None, callback, nonfinite, cc)


def _run(model, x, plan, draw, callback, nonfinite, cc=None):
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    coef = plan.coef.to(x.device, x.dtype)  # float64 table, rounded once to the state's precision
    ts = plan.timesteps.to(x.device)
    net_dtype = _model_dtype(model)
    hist = [torch.zeros_like(x) for _ in range(plan.history)]  # H1, H2, ...: the multistep history
    for i in range(plan.steps):
        t = ts[i].expand(x.shape[0])  # (B,)
        m = _form(model, x, t, net_dtype, cc)
        z = draw(i) if draw is not None else None
        x, x0 = step(x, m, coef[i], plan, z, hist)
        if nonfinite != "ignore" and not torch.isfinite(x).all():
            msg = (
                f"the sampler state became non-finite at step {i} (timestep {int(ts[i])}); "
                "check the model's output and the schedule, or pass nonfinite='ignore'"
            )
            if nonfinite == "raise":
                raise NonFiniteError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            nonfinite = "ignore"  # once is enough: every later step is non-finite too
        if callback is not None:
            callback(i, int(ts[i]), x, x0)
    return x


def step(x, m, c, plan: SamplingPlan, z=None, hist=None):
    """One update (*) of plan.py, given the model output m and the step's coefficient row c;
    a multistep plan's row is wider, (**) of plan.py: `hist` is the list [H1, H2, ...] of earlier
    estimates (plan.history tensors like x), read by the update and shifted in place with the
    step's push P = pu x0 + pv x + pw m.

    Returns (x', x0): the new state and the (clipped) x0 estimate.
    """
    cx, ce, d0, dx, de, sigma = (c[COL[name]] for name in ("cx", "ce", "d0", "dx", "de", "sigma"))
    x0 = cx * x + ce * m  # (1) "predicted x0", Eq. 12 (or the prediction's equivalent)
    if plan.threshold is not None:
        x0 = dynamic_threshold(x0, plan.threshold, plan.threshold_max)
    elif plan.clip_x0 is not None:
        x0 = x0.clamp(*plan.clip_x0)
    # (2) sqrt(a') x0 + (3) the "direction pointing to x_t", both as coefficients of x0, x and m
    x_new = d0 * x0 + dx * x + de * m
    if hist:  # (**): the history terms, then the push (P from the step's input x)
        for name, H in zip(HISTORY_WEIGHTS, hist):  # h1 H1 + h2 H2 + ...
            x_new = x_new + c[COL[name]] * H
        pu, pv, pw, push = (c[COL[name]] for name in ("pu", "pv", "pw", "push"))
        if push != 0:
            hist.insert(0, pu * x0 + pv * x + pw * m)
            hist.pop()
    if z is not None:
        x_new = x_new + sigma * z  # (4) random noise sigma_t z, Eq. 12
    return x_new, x0


def dynamic_threshold(x0: torch.Tensor, p: float, s_max: float = math.inf) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = quantile(|x0|, p) per sample, clamped to [1, s_max];
    x0 is clipped to [-s, s] and divided by s."""
    s = torch.quantile(x0.abs().flatten(1), p, dim=1).clamp(1.0, s_max)  # in the state's dtype (float64 truth)
    s = s.view(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def slerp(z0: torch.Tensor, z1: torch.Tensor, w) -> torch.Tensor:
    """Spherical linear interpolation between two latents (Section 5.3; Shoemake 1985).

    The angle is taken over all elements (each latent is one vector, as in the official code).
    w: a float gives one latent; a 1-D sequence of K weights gives K latents stacked on a new
    first dimension. Falls back to linear interpolation when z0 and z1 are (anti)parallel or one
    is zero (no angle is defined).
    """
    if z0.shape != z1.shape:
        raise ValueError(f"slerp needs latents of one shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    for name, z in (("z0", z0), ("z1", z1)):
        if not z.is_floating_point():
            raise ValueError(f"slerp needs floating-point latents; {name} is {z.dtype}: pass {name}.float()")
        if not torch.isfinite(z).all():
            raise ValueError(f"slerp needs finite latents; {name} has NaN or inf values: pass finite latents")
    scalar = isinstance(w, numbers.Real)  # numpy scalars too
    wt = torch.as_tensor(w, dtype=torch.float64, device=z0.device).reshape(-1)
    if not torch.isfinite(wt).all():
        raise ValueError("slerp weights must be finite")
    a, b = z0.double(), z1.double()
    norms = a.norm() * b.norm()
    cos = (a * b).sum() / norms if norms > 0 else torch.ones((), dtype=torch.float64)  # 0: no angle
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    shape = (-1,) + (1,) * z0.ndim
    wt = wt.view(shape)
    if torch.sin(theta).abs() < 1e-6:
        out = (1 - wt) * a + wt * b
    else:
        out = (torch.sin((1 - wt) * theta) * a + torch.sin(wt * theta) * b) / torch.sin(theta)
    out = out.to(z0.dtype)
    return out[0] if scalar else out


# -- helpers -------------------------------------------------------------------------------------
def _check_state(x, name):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{name} must be float32 or float64, got {x.dtype}: the sampler state stays in full "
            f"precision; pass {name}.float() (the network may still run in fp16/bf16)"
        )
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be (batch, ...) with batch >= 1, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or inf values; pass a finite tensor")
    return x


def _model_dtype(model):
    """The floating dtype of a module's parameters (the precision it runs in), or None."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _form(model, x, t, net_dtype=None, cc=None):
    """The model output m the update uses: one plain call (cond or none), or with guidance one call on
    the doubled batch [uncond; cond] and the combine m = m_u + w (m_c - m_u), in x's dtype."""
    if cc is None:
        return _predict(model, x, t, net_dtype)
    if not cc.guided:
        return _predict(model, x, t, net_dtype, cc.cond)
    m2 = _predict(model, torch.cat([x, x]), torch.cat([t, t]), net_dtype, cc.doubled())
    return conditioning.combine(m2, cc.guidance)


def _predict(model, x, t, net_dtype=None, cond=None):
    """The model's prediction for state x, in x's dtype; the model runs in its own dtype."""
    kw = conditioning.cast_cond(cond, net_dtype) if cond else {}
    m = model(x if net_dtype is None else x.to(net_dtype), t, **kw)
    if not isinstance(m, torch.Tensor) and isinstance(getattr(m, "sample", None), torch.Tensor):
        m = m.sample  # a diffusers model's output object
    if not isinstance(m, torch.Tensor) or m.shape != x.shape:
        got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(
            f"the model returned {got} for input {tuple(x.shape)}; it must return one prediction of "
            "the input's shape (a learned-variance model returns 2C channels: keep the first C)"
        )
    return m.to(x.dtype)


def _noise_source(plan, x, seed, noise, first_index):
    """A function step -> z (or None when the plan draws no noise)."""
    if seed is not None and noise is not None:
        raise ValueError("give seed= or noise=, not both: noise= replaces the seeded generator")
    if noise is not None:
        want = (plan.steps, *x.shape)
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != want:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must have shape (steps, *x.shape) = {want}, got {got}")
        noise = noise.to(x.device, x.dtype)
        return (lambda i: noise[i]) if plan.needs_noise else None
    if not plan.needs_noise:
        if seed is not None:
            rng.check_seed(seed)
        return None
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())  # follows torch.manual_seed
    rng.check_seed(seed)
    return lambda i: rng.step_noise(seed, i, x.shape, first_index=first_index, device=x.device).to(x.dtype)
