"""Conditioning and classifier-free guidance (CFG): what a model takes besides (x, t), checked once per
sampling call, and how the model output m is formed from it before the update.

A model is model(x, t, **cond): `cond` is a dict of tensors with a leading batch dimension
({"class_labels": (B,) int64} for a class-conditional UNet, {"encoder_hidden_states": (B, L, D)}
for a diffusers UNet2DConditionModel). With `guidance=w` the network runs once on the doubled
batch [uncond; cond] (the order diffusers' pipelines use) and

    m = m_u + w * (m_c - m_u)

so w = 0 is the unconditional branch alone, w = 1 the conditional branch alone (the same result as
no guidance, at twice the cost) and w > 1 pushes past it. `uncond` defaults to the model's null
input where it has one (the null label N of a class-conditional UNet, the last class row of a
diffusers UNet2DModel with num_class_embeds); otherwise it must be given. Without guidance there is
no doubled batch and no extra cost.

cond_spec(model) says what a known model takes (names, per-sample shapes, dtypes, the null value):
it drives the checks, the default uncond and the ONNX graph inputs and metadata.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .checks import check


# -- what a model takes ---------------------------------------------------------------------------
def cond_spec(model) -> dict | None:
    """name -> {"shape": per-sample shape (ints; "L" for a free length), "dtype": torch dtype,
    "range": (lo, hi) for integer inputs, "null": the null value or None, "about": a line} for a
    known model (this project's UNet, a diffusers UNet2DModel / UNet2DConditionModel, or an adapter of
    one); {} for a known unconditional model; None for any other callable (cond passed through)."""
    from .models.diffusers_unet import DiffusersUNet
    from .models.unet import UNet

    if isinstance(model, DiffusersUNet):
        return model.cond_spec()
    if isinstance(model, UNet):
        n = model.config.num_classes
        if n is None:
            return {}
        return {"class_labels": {"shape": (), "dtype": torch.int64, "range": (0, n), "null": n,
                                 "about": f"class labels 0..{n - 1}; {n} is the null label (unconditional)"}}
    own = getattr(model, "cond_spec", None)
    return own() if callable(own) else None


def example_cond(spec: dict, batch: int, generator=None, length: int = 8) -> dict:
    """Random valid inputs of `spec` for `batch` samples (export tracing and validation)."""
    out = {}
    for name, s in spec.items():
        shape = (batch, *(length if d == "L" else d for d in s["shape"]))
        if s["dtype"].is_floating_point:
            out[name] = torch.randn(shape, generator=generator)
        else:
            lo, hi = s["range"]
            out[name] = torch.randint(lo, hi + 1, shape, generator=generator)
    return out


def null_cond(spec: dict | None, batch: int, device=None) -> dict | None:
    """The null inputs for `batch` samples, or None when some input has no null value."""
    if not spec or any(s["null"] is None for s in spec.values()):
        return None
    return {name: torch.full((batch,), s["null"], dtype=s["dtype"], device=device) for name, s in spec.items()}


def check_guidance(w) -> float | None:
    """The guidance scale as a float (None: no guidance); a bool or a non-finite number is refused."""
    if w is None:
        return None
    check(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(float(w)),
          f"guidance must be a finite number (e.g. 2.0) or None for no guidance, got {w!r}")
    return float(w)


# -- one call's conditioning ------------------------------------------------------------------------
@dataclass
class Conditioning:
    """The checked conditioning of one sampling call: cond and (with guidance) uncond, on one device,
    each tensor with the call's batch B; guidance the scale or None."""

    cond: dict
    uncond: dict | None = None
    guidance: float | None = None

    @property
    def guided(self) -> bool:
        return self.guidance is not None

    def doubled(self) -> dict:
        """The network's inputs for the doubled batch [uncond; cond] (guided calls only)."""
        return {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.cond}

    def network_inputs(self) -> dict:
        """What the network is called with: the doubled batch's inputs when guided, else cond."""
        return self.doubled() if self.guided else self.cond

    def slice(self, lo: int, hi: int) -> Conditioning:
        """Samples lo..hi-1 (the Engine's batch chunks)."""
        def cut(d):
            return None if d is None else {k: v[lo:hi] for k, v in d.items()}
        return Conditioning(cut(self.cond), cut(self.uncond), self.guidance)

    def to(self, device) -> Conditioning:
        def move(d):
            return None if d is None else {k: v.to(device) for k, v in d.items()}
        return Conditioning(move(self.cond), move(self.uncond), self.guidance)

    def signature(self) -> tuple:
        """What a compiled program (CUDA graph, ONNX graph) depends on: the names, per-sample shapes and
        dtypes of the inputs and whether the call is guided; not their values or the scale."""
        return (self.guided, tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(self.cond.items())))


def resolve(model, batch: int, cond=None, uncond=None, guidance=None, device=None,
            spec: dict | None = ...) -> Conditioning | None:
    """Check one call's conditioning against `model` (its cond_spec) and a batch of `batch` samples;
    None when there is nothing to condition on (an unconditional call). One clear ValueError per
    problem: a cond that is not a dict of tensors, a batch that does not match, an input the model
    does not take, labels out of range, guidance that is not finite or has no unconditional branch, a
    UNet2DConditionModel without encoder_hidden_states. Labels are checked here once (one host sync),
    so the fast paths need not check them per step."""
    if spec is ...:
        spec = cond_spec(model)
    w = check_guidance(guidance)
    cond = _check_dict(cond, "cond", batch)
    uncond = _check_dict(uncond, "uncond", batch)
    if spec:
        required = [k for k, s in spec.items() if s["null"] is None]
        missing = [k for k in required if k not in (cond or {})]
        if missing:
            shape = ", ".join(map(str, spec[missing[0]]["shape"]))
            raise ValueError(f"this model needs {', '.join(missing)} in cond (e.g. cond={{'{missing[0]}': a tensor "
                             f"of shape (B, {shape})}}): a UNet2DConditionModel has no unconditional input of its own")
    if spec is not None:
        for name, d in (("cond", cond), ("uncond", uncond)):
            extra = sorted(set(d or ()) - set(spec))
            takes = ", ".join(spec) if spec else "no conditioning (it is unconditional)"
            check(not extra, f"{name} has {', '.join(extra)}, which this model does not take; it takes {takes}")
            for k, v in (d or {}).items():
                _check_input(k, v, spec[k], name)
    if uncond is not None and w is None:
        raise ValueError("uncond is used only with guidance: pass guidance=w (e.g. 2.0) or drop uncond")
    if w is not None:
        check(bool(cond), "guidance needs cond (the conditional branch), e.g. cond={'class_labels': y}")
        if uncond is None:
            uncond = null_cond({k: spec[k] for k in cond} if spec else None, batch)
            check(uncond is not None,
                  "guidance needs an unconditional branch: this model has no null input for "
                  f"{', '.join(cond)}; pass uncond= with the same keys (e.g. the empty prompt's embeddings)")
        check(set(uncond) == set(cond), f"uncond must have the same keys as cond ({', '.join(sorted(cond))}), "
                                        f"got {', '.join(sorted(uncond)) or 'none'}")
        for k in cond:
            check(uncond[k].shape == cond[k].shape,
                  f"uncond[{k!r}] has shape {tuple(uncond[k].shape)} but cond[{k!r}] {tuple(cond[k].shape)}: "
                  "give one unconditional input per sample, of the same shape")
    if not cond:
        return None
    out = Conditioning(cond, uncond, w)
    return out.to(device) if device is not None else out


def _check_dict(d, name, batch):
    if d is None:
        return None
    check(isinstance(d, dict) and all(isinstance(k, str) for k in d),
          f"{name} must be a dict of tensors keyed by the model's argument names (e.g. {{'class_labels': y}}), "
          f"got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        check(isinstance(v, torch.Tensor), f"{name}[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
        check(v.ndim >= 1 and v.shape[0] == batch,
              f"{name}[{k!r}] has batch {v.shape[0] if v.ndim else 'none (a scalar)'} but the state has {batch} "
              f"samples: give one entry per sample (leading dimension {batch})")
        out[k] = v
    return out


def _check_input(name, v, s, what):
    if s["dtype"].is_floating_point:
        check(v.is_floating_point(), f"{what}[{name!r}] must be a floating-point tensor, got {v.dtype}")
        check(bool(torch.isfinite(v).all()), f"{what}[{name!r}] has NaN or inf values; pass finite inputs")
    else:
        check(not (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool),
              f"{what}[{name!r}] must be an integer tensor (e.g. torch.long), got {v.dtype}")
        lo, hi = s["range"]
        if v.numel():
            vmin, vmax = int(v.min()), int(v.max())
            check(lo <= vmin and vmax <= hi, f"{what}[{name!r}] must be in [{lo}, {hi}] ({s['about']}), "
                                             f"got values from {vmin} to {vmax}")
    want = tuple(s["shape"])
    got = tuple(v.shape[1:])
    ok = len(got) == len(want) and all(w == "L" or w == g for w, g in zip(want, got))
    shown = ", ".join(map(str, want))
    check(ok, f"{what}[{name!r}] must have shape (B{', ' + shown if want else ''}), got {tuple(v.shape)}")


# -- forming m ----------------------------------------------------------------------------------------
def combine(m2: torch.Tensor, w) -> torch.Tensor:
    """m = m_u + w (m_c - m_u) from the doubled batch's output m2 = [m_u; m_c] (2B, ...)."""
    m_u, m_c = m2.chunk(2)
    return m_u + w * (m_c - m_u)


def cast_cond(cond: dict, dtype) -> dict:
    """Floating-point inputs in the network's dtype (like x); integer ones unchanged."""
    if dtype is None:
        return cond
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
