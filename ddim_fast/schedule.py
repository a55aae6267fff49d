"""Noise schedules (betas -> alphas_cumprod, float64) and sampling sub-sequences (timesteps).

Notation follows the DDIM paper: `alphas_cumprod[t]` is the paper's alpha_t (a cumulative
product), indexed by the 0-based training timestep t in [0, T). The value "after the last
step" is alpha = 1 (the paper's alpha_0 = 1); that is the plan's business, not the schedule's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import is_int

SPACINGS = ("uniform", "quad", "leading", "trailing", "linspace")


@dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM forward process: betas[t] for t in [0, T), all float64 on the CPU.

    Build one with `linear`, `scaled_linear`, `cosine` or `from_betas`; `spec` records how, so
    a checkpoint can store the recipe instead of 1000 numbers.
    """

    betas: torch.Tensor  # (T,) float64
    spec: dict = field(default_factory=dict, compare=False)  # how it was built (JSON-able)

    def __post_init__(self):
        b = self.betas
        if not isinstance(b, torch.Tensor) or b.ndim != 1 or b.numel() < 1:
            raise ValueError("betas must be a 1-D tensor with at least one value")
        b = b.detach().to("cpu", torch.float64).contiguous()
        if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            raise ValueError("every beta must be finite and in the open interval (0, 1)")
        object.__setattr__(self, "betas", b)
        if not self.spec:
            object.__setattr__(self, "spec", {"kind": "betas", "betas": b.tolist()})
        # alpha_bar in float64: the product of 1000 factors loses ~1e-13 here, ~1e-4 in float32.
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - b, dim=0))

    @property
    def T(self) -> int:
        return self.betas.numel()

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """Ho et al. 2020 and every model in the DDIM paper: betas evenly spaced."""
        T = _check_T(T)
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(betas, {"kind": "linear", "T": T, "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def scaled_linear(
        cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> NoiseSchedule:
        """Latent-diffusion schedule: sqrt(beta) evenly spaced (diffusers' "scaled_linear")."""
        T = _check_T(T)
        betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2
        return cls(betas, {"kind": "scaled_linear", "T": T, "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal 2021: alpha_bar(u) = cos^2(pi/2 (u + s)/(1 + s)), betas capped at max_beta."""
        T = _check_T(T)
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas, {"kind": "cosine", "T": T, "s": s, "max_beta": max_beta})

    @classmethod
    def from_betas(cls, betas) -> NoiseSchedule:
        return cls(torch.as_tensor(betas, dtype=torch.float64))

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dict(self.spec)

    @classmethod
    def from_dict(cls, d: dict) -> NoiseSchedule:
        if not isinstance(d, dict):
            raise ValueError(f"a noise schedule is read from a dict (NoiseSchedule.to_dict()), got {type(d).__name__}")
        d = dict(d)
        kind = d.pop("kind", None)
        builders = {"linear": cls.linear, "scaled_linear": cls.scaled_linear, "cosine": cls.cosine}
        if kind not in builders and kind != "betas":
            raise ValueError(
                f"unknown noise schedule kind {kind!r}; expected one of {sorted(builders) + ['betas']}"
            )
        try:
            return cls.from_betas(d["betas"]) if kind == "betas" else builders[kind](**d)
        except (TypeError, KeyError) as e:  # unknown or missing keys, values of the wrong type
            raise ValueError(f"cannot build a {kind!r} noise schedule from {repr(d)[:200]} ({type(e).__name__}: {e}); "
                             "give the entries NoiseSchedule.to_dict() writes") from None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.spec.items() if k not in ("kind", "betas"))
        return f"NoiseSchedule.{self.spec.get('kind', 'betas')}({args})"


def _check_T(T):
    if not is_int(T) or T < 1:
        raise ValueError(f"T (the number of training timesteps) must be a positive int, got {T!r}")
    return int(T)


def timesteps(T: int, steps: int, spacing="uniform", steps_offset: int = 0) -> torch.Tensor:
    """The sub-sequence tau of training timesteps a sampler visits, in descending order.

    spacing:
      "uniform"  tau_i = i * (T // S), i = 0..S-1: the official DDIM code's "uniform" skip and
                 diffusers' "leading". It never visits T-1 (S=10, T=1000 starts at 900). When S
                 does not divide T the official code (range(0, T, T // S)) returns MORE than S
                 steps (S=7 gives 8); this returns exactly S.
      "quad"     the official code's quadratic skip, computed as it does (numpy):
                 int(linspace(0, sqrt(0.8 T), S) ** 2). Small values repeat (S=100, T=1000 gives
                 96 distinct steps); repeats are removed with a warning, since a repeated step is
                 a zero-length step that only costs a forward.
      "leading"  diffusers "leading": i * (T // S) + steps_offset.
      "trailing" diffusers "trailing": round(arange(T, 0, -T/S)) - 1 (numpy), which starts at T-1.
      "linspace" diffusers "linspace": round(linspace(0, T-1, S)) (numpy).
      a list     explicit training timesteps, strictly monotone, each in [0, T).
    Every spacing but "quad" returns exactly `steps` values. A list given as `steps` (with the spacing
    left at "uniform") is taken as that explicit list.
    """
    T = _check_T(T)
    steps, spacing = timestep_list_as_spacing(steps, spacing)
    if not isinstance(spacing, str):
        return _explicit(T, spacing)
    if not is_int(steps) or not 1 <= steps <= T:
        raise ValueError(
            f"steps must be an int in [1, T={T}], got {steps!r}; "
            "use steps=T for the full (DDPM-length) chain"
        )
    S = steps = int(steps)
    if not is_int(steps_offset):
        raise ValueError(f"steps_offset must be an int, got {steps_offset!r}")
    steps_offset = int(steps_offset)
    if spacing != "leading" and steps_offset:
        raise ValueError(f"steps_offset applies to spacing='leading' only, not {spacing!r}")
    if spacing in ("uniform", "leading"):
        ts = [i * (T // S) + steps_offset for i in range(S)]
        if ts[-1] >= T or steps_offset < 0:
            raise ValueError(
                f"steps_offset={steps_offset} pushes the leading spacing outside [0, {T}); "
                f"use an offset in [0, {T - ts[-1] + steps_offset})"
            )
    elif spacing == "quad":
        # numpy, as the official code: its linspace ends exactly on sqrt(0.8 T), and sqrt(800) ** 2 is
        # 800.0000000000001, so T=1000 ends on 800; (i * top / (S - 1)) ** 2 gives 799.99... -> 799.
        raw = (np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64).tolist()
        ts = sorted(set(raw))
        if len(ts) < S:
            warnings.warn(
                f"quad spacing with T={T}, S={S} repeats {S - len(ts)} timestep(s); "
                f"removed them, so the sampler takes {len(ts)} steps",
                stacklevel=2,
            )
    elif spacing == "trailing":  # numpy, as diffusers computes it: round(arange(T, 0, -T/S)) - 1
        ts = (np.round(np.arange(T, 0, -T / S)) - 1).astype(np.int64).tolist()[:S]
    elif spacing == "linspace":  # numpy, as diffusers computes it: round(linspace(0, T-1, S))
        ts = np.linspace(0, T - 1, S).round().astype(np.int64).tolist()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS} or a list of timesteps")
    return torch.tensor(sorted(ts, reverse=True), dtype=torch.long)


def timestep_list_as_spacing(steps, spacing):
    """(steps, spacing), with a timestep list given as `steps` moved to `spacing` (steps None): the list
    is then checked as a list, so an entry outside [0, T) is named as such, not as a bad number of steps."""
    is_list = isinstance(steps, (list, tuple, range)) or (getattr(steps, "ndim", None) == 1
                                                          and not isinstance(steps, str))
    if not is_list:
        return steps, spacing
    if not isinstance(spacing, str) or spacing != "uniform":
        raise ValueError(f"steps is a timestep list and spacing is {spacing!r}: give the timesteps once, as "
                         "spacing=[...] (steps=None) or as steps=[...] alone")
    return None, steps


def _explicit(T: int, seq) -> torch.Tensor:
    try:
        ts = [int(t) for t in (seq.tolist() if hasattr(seq, "tolist") else seq)]
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a name in {SPACINGS} or a list of ints, got {seq!r}") from None
    if not ts:
        raise ValueError("an explicit timestep list must not be empty")
    outside = [t for t in ts if not 0 <= t < T]
    if outside:
        shown = str(ts) if len(ts) <= 12 else f"[{', '.join(map(str, ts[:12]))}, ...]"
        bad = ", ".join(map(str, outside[:5])) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
        raise ValueError(f"timesteps {shown} has {bad} outside [0, T-1] = [0, {T - 1}]; every timestep must be a "
                         f"training timestep of this schedule (T={T})")
    if len(set(ts)) != len(ts):
        raise ValueError(f"the timestep list has duplicates: {ts}; give each timestep once")
    if ts != sorted(ts) and ts != sorted(ts, reverse=True):
        raise ValueError(f"the timestep list must be sorted (ascending or descending), got {ts}")
    return torch.tensor(sorted(ts, reverse=True), dtype=torch.long)
