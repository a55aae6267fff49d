"""SamplingPlan: every per-step number a sampler needs, computed once in float64.

One step of every sampler here (DDIM at any eta, the paper's sigma-hat, inversion; eps, x0 or
v predictions; with or without clipping) is the same update of the state x given the model
output m:

    x' = d0 * clip(cx * x + ce * m) + dx * x + de * m + sigma * z          (*)

where `clip` is the identity, a fixed range or dynamic thresholding, and z ~ N(0, I). The plan
stores (cx, ce, d0, dx, de, sigma) per step as one (S, 6) table, so a single fused kernel serves
every variant and a CUDA graph can replay all steps by indexing the table with a device step
counter.

Derivation (a = alpha_bar of the state entering the step, a' = alpha_bar after it; a' = 1 after
the last sampling step, the paper's alpha_0 = 1). The model output is first turned into the
paper's two estimates, x0 = cx x + ce m and eps = ex x + ee m:
    eps-prediction: x0 = (x - sqrt(1-a) m) / sqrt(a),  eps = m
    x0-prediction:  x0 = m,                            eps = (x - sqrt(a) m) / sqrt(1-a)
    v-prediction:   x0 = sqrt(a) x - sqrt(1-a) m,      eps = sqrt(1-a) x + sqrt(a) m
variance="ddim" (Eq. 12): x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1-a')/(1-a)) sqrt(1 - a/a')                           (Eq. 16)
    so d0 = sqrt(a'), dx = c ex, de = c ee with c = sqrt(1 - a' - sigma^2).
    Clipping acts on x0 only; eps stays the model's (diffusers' default convention).
variance="large" (the paper's sigma-hat): the DDPM posterior mean over the skip, with
    beta = 1 - a/a', written in x0 and x,
    x' = sqrt(a') beta/(1-a) x0 + sqrt(a/a') (1-a')/(1-a) x + sqrt(beta) z,
    and no noise on the last step. Unclipped, this mean equals the eta=1 mean exactly. The official
    code's `ddpm_noisy` sampler clamps x0 to [-1, 1]: it is variance="large" with clip_x0=1.
Inversion (Section 4.3 / 5.4; eta = 0 run upward): x_next = sqrt(a_next) x0 + sqrt(1-a_next) eps.

Multistep samplers (sampler != "ddim") widen the row to 13 columns (ALL_COLUMNS) with a history of the
last three pushed estimates H1, H2, H3 (zeros at the start), still one statement for every sampler:

    x' = d0 * clip(cx * x + ce * m) + dx * x + de * m + h1 H1 + h2 H2 + h3 H3 + sigma * z        (**)
    then, if push = 1:  H3 <- H2, H2 <- H1, H1 <- P = pu * clip(x0) + pv * x + pw * m

DDIM rows are (*) (history 0, the (S, 6) table). With alpha_t = sqrt(a'), sigma_t = sqrt(1 - a'),
lambda = log(alpha / sigma) and h = lambda' - lambda of the step:
  dpmpp_2m / dpmpp_3m (Lu et al. 2022, "DPM-Solver++", multistep in data prediction; diffusers'
    DPMSolverMultistepScheduler): P = x0 (pu = 1); dx = sigma_t / sigma_s; order 1: d0 = -alpha_t (e^-h - 1)
    (= DDIM at eta 0); order 2: the D1 = (x0 - H1) / r0 term (r0 = h_prev / h) folded into d0 and h1;
    order 3: D1, D2 from (x0, H1, H2) folded into d0, h1, h2. dpmpp_2m_sde: dx = sigma_t / sigma_s e^-h,
    d0 = alpha_t (1 - e^-2h) (+ the D1 term), sigma = sigma_t sqrt(1 - e^-2h).
  unipc (Zhao et al. 2023, UniPC with B(h) = e^h - 1; diffusers' UniPCMultistepScheduler(bh2)): P = x0.
    The step's predictor runs from the corrected state x^c; the corrector of the state x_i the previous
    predictor wrote is x^c = x_i + C . (x0_i, H1, H2, ...), because the corrector and that predictor share
    the term (sigma_i / sigma_{i-1}) x^c_{i-1} and the first-order x0 term, which cancel in the difference.
    So the row is dx = rho, and rho C plus the predictor's own x0 / history weights in d0, h1..h3: no
    previous state, no division by rho (0 after a step onto alpha_bar = 1), exact in exact arithmetic.
  plms (Liu et al. 2022, PNDM's PLMS; diffusers' PNDMScheduler(skip_prk_steps=True)): P = m (pw = 1, raw
    outputs, as diffusers combines them); the DDIM (eta 0) transfer x' = A x + B m~ of the Adams-Bashforth
    combination m~ = sum_k c_k m_{i-k} (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24) gives
    dx = A, de = B c_0, h_k = B c_k. plms_start="heun" adds diffusers' extra row after the first step
    (same timestep twice): x1' = x1 + B_0 (m_1 - m_0) / 2 (dx = 1, de = B_0 / 2, h1 = -B_0 / 2, push = 0).
Order rules (warm-up, lower_order_final) follow diffusers; a step onto alpha_bar = 1 is always first order.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field, replace

import torch

from .schedule import NoiseSchedule, timestep_list_as_spacing, timesteps

COEF_COLUMNS = ("cx", "ce", "d0", "dx", "de", "sigma")
# A multistep plan's table is wider: the history terms h1..h3 (coefficients of the last three pushed
# estimates H1..H3) and what the step pushes, P = pu*clip(x0) + pv*x + pw*m when push = 1 (see (**)).
HISTORY_WEIGHTS = ("h1", "h2", "h3")
PUSH_COLUMNS = ("pu", "pv", "pw", "push")
HISTORY_COLUMNS = HISTORY_WEIGHTS + PUSH_COLUMNS
MAX_HISTORY = len(HISTORY_WEIGHTS)
ALL_COLUMNS = COEF_COLUMNS + HISTORY_COLUMNS
COL = {name: j for j, name in enumerate(ALL_COLUMNS)}  # a column's index in a row (a DDIM row is the first six)
# What each column is, in words, for a reader without this code (the metadata of a table-input ONNX graph,
# docs/onnx.md). a, a': alpha_bar of the state entering / leaving the step (alphas_cumprod at this timestep
# and at the next one of the plan; 1 after the last step unless final_alpha); m: the model output.
UPDATE_RULE = ("x' = d0 * clip(x0) + dx * x + de * m + h1 * H1 + h2 * H2 + h3 * H3 + sigma * z with x0 = cx * x + "
               "ce * m, z standard normal noise (the `noise` input's row), H1..H3 = 0 at the start; then, if push "
               "= 1: H3 <- H2, H2 <- H1, H1 <- pu * clip(x0) + pv * x + pw * m. a, a' = alphas_cumprod at this "
               "step's timestep and at the next one (1 after the last step); a DDIM table has only the first six "
               "columns (no history)")
COLUMN_MEANINGS = {
    "cx": "weight of x in the x0 estimate x0 = cx x + ce m: 1/sqrt(a) (eps model), 0 (x0 model), sqrt(a) (v model)",
    "ce": "weight of m in the x0 estimate: -sqrt(1-a)/sqrt(a) (eps), 1 (x0), -sqrt(1-a) (v)",
    "d0": "weight of clip(x0) in x': sqrt(a') (DDIM); sqrt(a') (1 - a/a') / (1-a) (variance large); the solver's "
          "x0 weight (multistep samplers)",
    "dx": "weight of x in x': c ex with c = sqrt(1 - a' - sigma^2) and eps = ex x + ee m (ex: 0 eps, 1/sqrt(1-a) "
          "x0, sqrt(1-a) v) (DDIM); sqrt(a/a') (1-a') / (1-a) (variance large); the solver's x weight (multistep)",
    "de": "weight of m in x': c ee (ee: 1 eps, -sqrt(a)/sqrt(1-a) x0, sqrt(a) v) (DDIM); 0 (variance large)",
    "sigma": "standard deviation of the noise z: eta sqrt((1-a')/(1-a)) sqrt(1 - a/a') (DDIM); sqrt(1 - a/a'), 0 "
             "on the last step (variance large)",
    "h1": "weight of H1, the estimate pushed last (0 without history)",
    "h2": "weight of H2, the estimate pushed before H1",
    "h3": "weight of H3, the estimate pushed before H2",
    "pu": "weight of clip(x0) in the pushed estimate P = pu clip(x0) + pv x + pw m",
    "pv": "weight of x in the pushed estimate P",
    "pw": "weight of m in the pushed estimate P",
    "push": "1: after the step H3 <- H2, H2 <- H1, H1 <- P; 0: the history is kept",
}
SAMPLERS = ("ddim", "plms", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
MAX_ORDER = {"ddim": 1, "plms": 4, "dpmpp_2m": 2, "dpmpp_3m": 3, "dpmpp_2m_sde": 2, "unipc": 3}
DEFAULT_ORDER = {"ddim": 1, "plms": 4, "dpmpp_2m": 2, "dpmpp_3m": 3, "dpmpp_2m_sde": 2, "unipc": 2}
PLMS_STARTS = ("heun", "euler")
VARIANCES = ("ddim", "large")
PREDICTIONS = ("eps", "x0", "v")
EPS_AT = ("current", "target")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# A sampler starts from pure noise at its first timestep t1, where the forward process still keeps
# sqrt(alpha_bar[t1]) of the image. It is "far from the end" (and warned about) when that exceeds
# FAR_START_SIGNAL and twice what the schedule's last timestep keeps; the measured numbers behind
# 0.1 and the factor 2 are in docs/DESIGN.md ("far start").
FAR_START_SIGNAL = 0.1


def _estimates(a: float, prediction: str):
    """(cx, ce, ex, ee): x0 = cx x + ce m and eps = ex x + ee m for a state with alpha_bar a."""
    sa, s1a = math.sqrt(a), math.sqrt(1.0 - a)
    if prediction == "eps":
        return 1.0 / sa, -s1a / sa, 0.0, 1.0
    if prediction == "x0":
        return 0.0, 1.0, 1.0 / s1a, -sa / s1a
    return sa, -s1a, s1a, sa  # v


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Per-step coefficients of (*) for S steps, plus what produced them.

    Tensors live on `coef.device`; `coef` is float64 as built and `.to(device, dtype)` moves
    and casts it (timesteps stay int64). Build with `SamplingPlan.build(...)`; get the matching
    encoder with `plan.inverse()`.
    """

    timesteps: torch.Tensor  # (S,) int64: the t given to the model at step i
    alpha: torch.Tensor  # (S,) alpha_bar of the state entering step i
    alpha_next: torch.Tensor  # (S,) alpha_bar of the state leaving step i
    coef: torch.Tensor  # (S, 6): columns COEF_COLUMNS
    T: int
    eta: float = 0.0
    variance: str = "ddim"
    prediction: str = "eps"
    spacing: object = "uniform"
    clip_x0: tuple | None = None  # (lo, hi) applied to the x0 estimate
    threshold: float | None = None  # dynamic thresholding quantile p (Imagen); None = off
    threshold_max: float = math.inf  # cap on the per-sample threshold s
    direction: str = "sample"  # "sample" (t descending) or "invert" (t ascending)
    eps_at: str | None = None  # inversion only: "current" or "target"
    meta: dict = field(default_factory=dict)  # free-form; copied into exports
    sampler: str = "ddim"  # one of SAMPLERS
    order: int = 1  # the multistep order (the highest used; warm-up and final steps may use less)
    lower_order_final: bool = True  # dpmpp_* / unipc: lower orders on the last steps (diffusers' rules)
    plms_start: str | None = None  # plms only: "heun" (diffusers / LDM) or "euler"
    history: int = 0  # history buffers the update reads (0 for ddim: the (S, 6) table)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        schedule: NoiseSchedule,
        steps: int | None = None,
        eta: float = 0.0,
        spacing="uniform",
        variance: str = "ddim",
        prediction: str = "eps",
        clip_x0=None,
        threshold: float | None = None,
        threshold_max: float = math.inf,
        steps_offset: int = 0,
        final_alpha: float | None = None,
        sampler: str = "ddim",
        order: int | None = None,
        lower_order_final: bool = True,
        plms_start: str = "heun",
    ) -> SamplingPlan:
        """A sampler over `steps` timesteps of `schedule`.

        steps:      the number of steps; or the timestep list itself (as spacing=[...]).
        eta:        0 = DDIM (deterministic), 1 = DDPM (the posterior's "fixed small" variance).
        spacing:    see `ddim_fast.timesteps`; or an explicit list (then `steps` may be None).
        variance:   "ddim" (sigma from eta) or "large" (the paper's sigma-hat column: the eta=1 mean
                    with noise std sqrt(1 - a/a'), none on the last step).
        prediction: what the model outputs: "eps", "x0" or "v".
        clip_x0:    None, a float c > 0 (clip to [-c, c]) or (lo, hi): clip the x0 estimate.
        threshold:  dynamic thresholding quantile p in (0, 1]: per sample s = quantile(|x0|, p)
                    clamped to [1, threshold_max], then x0 = clip(x0, -s, s) / s.
        final_alpha: alpha_bar after the last step: None = 1 (the paper's alpha_0 = 1, diffusers'
                    set_alpha_to_one=True); `float(schedule.alphas_cumprod[0])` is diffusers'
                    set_alpha_to_one=False.
        sampler:    "ddim" (default), "plms", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde" or "unipc" (bh2);
                    see the module docstring for each one's table rows.
        order:      the multistep order (None = the sampler's: plms 4, dpmpp_2m 2, dpmpp_3m 3, unipc 2;
                    unipc takes 1-3, dpmpp_3m 1-3, dpmpp_2m 1-2, plms 1-4). The first steps warm up
                    with lower orders; order 1 is DDIM (eta = 0) for every sampler but plms.
        lower_order_final: dpmpp_* and unipc: lower the order on the last steps as diffusers does
                    (dpmpp: the last two steps when steps < 15; unipc: order <= steps left). A step
                    that lands on alpha_bar = 1 is always first order (the higher ones diverge there).
        plms_start: plms only: "heun" (default; diffusers' PNDMScheduler(skip_prk_steps=True) and the
                    LDM PLMS: the first step is repeated with the average of the first two outputs, so
                    steps + 1 model evaluations) or "euler" (steps evaluations, Adams-Bashforth warm-up).

        The official DDIM code (ermongroup/ddim): its `generalized` sampler with --eta e is
        `build(schedule, S, eta=e)` (it never clamps); its `ddpm_noisy` sampler clamps x0 to
        [-1, 1], so it is `build(schedule, S, variance="large", clip_x0=1)`: variance="large"
        alone is that sampler without the clamp. With S = T, `ddpm_noisy` is the official DDPM
        sampler (DDPM's "fixed large" variance beta_t, x0 clamped); `build(schedule, T, eta=1.0)`
        is DDPM's other choice, the "fixed small" posterior variance, without a clamp.
        A plan whose first timestep is far from the end of the schedule (it would start from pure
        noise where the image is still visible, e.g. uniform S=600 of T=1000 starts at 599) warns.
        """
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        steps, spacing = timestep_list_as_spacing(steps, spacing)
        if not isinstance(spacing, str):
            ts = timesteps(schedule.T, None, spacing)
            if steps is not None and steps != len(ts):
                raise ValueError(f"steps={steps} but the explicit timestep list has {len(ts)} entries")
        else:
            ts = timesteps(schedule.T, steps, spacing, steps_offset)
        eta = _check_variance(variance, _check_eta(eta))
        _check_prediction(prediction)
        clip_x0 = _check_clip(clip_x0)
        threshold, threshold_max = _check_threshold(threshold, threshold_max, clip_x0)
        order = _check_sampler(sampler, order, len(ts), eta, variance, clip_x0, threshold, plms_start)

        ac = schedule.alphas_cumprod
        a = [float(ac[t]) for t in ts]
        final = _check_final_alpha(final_alpha, a[-1], int(ts[-1]))
        a_next = a[1:] + [final]
        _warn_far_start(ac, ts, spacing)
        options = _Options(sampler, prediction, eta, variance, order, bool(lower_order_final), plms_start)
        ts, a, a_next, rows = SAMPLER_ROWS[sampler](ts, a, a_next, options)
        columns = COEF_COLUMNS if sampler == "ddim" else ALL_COLUMNS
        coef = torch.tensor(rows, dtype=torch.float64).reshape(len(a), len(columns))
        return cls(
            timesteps=ts,
            alpha=torch.tensor(a, dtype=torch.float64),
            alpha_next=torch.tensor(a_next, dtype=torch.float64),
            coef=coef,
            T=schedule.T,
            eta=eta if sampler == "ddim" else 0.0,  # (a multistep sampler's eta was checked to be 0: store +0.0)
            variance=variance,
            prediction=prediction,
            spacing=spacing if isinstance(spacing, str) else "explicit",
            clip_x0=clip_x0,
            threshold=threshold,
            threshold_max=threshold_max,
            sampler=sampler,
            order=order,
            lower_order_final=bool(lower_order_final) if sampler != "ddim" else True,  # (a DDIM plan ignores it)
            plms_start=plms_start if sampler == "plms" else None,
            history=_history_depth(coef),
        )

    @classmethod
    def for_model(cls, model, steps: int | None = None, **overrides) -> SamplingPlan:
        """The plan `model` is meant to be sampled with: its schedule and prediction type, plus the
        sampler settings it came with (`model.sampler_defaults`, e.g. from a diffusers pipeline's
        scheduler config: spacing, steps_offset, clip_x0, threshold, final_alpha), then `overrides`
        (any keyword of `build`, None included). Overriding spacing drops a default steps_offset
        that only "leading" takes; overriding clip_x0 drops a default threshold and vice versa.
        Defaults that came from diffusers warn when this plan's step targets differ from
        DDIMScheduler's (it steps from t to t - T // S, this plan to the next timestep of its list).

        model: a model loaded with dd.load_model (or any object with .schedule, .prediction and
        .sampler_defaults), or a diffusers pipeline, scheduler, scheduler config dict, pipeline folder,
        its scheduler/ folder or a scheduler_config.json: their settings are DDIMPipeline's
        (scheduler_config.py), so DDIM-S of the plan is the pipeline's DDIM-S.
        tuned=True (with guidance=w for a guided one): the tuned plan bundled with the model (plan_files.py)."""
        if "tuned" in overrides or "guidance" in overrides:
            from . import plan_files

            return plan_files.for_model(cls, model, steps, rules=_file_rules(), **overrides)
        model = _plan_source(model)
        schedule = getattr(model, "schedule", None)
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"{type(model).__name__} carries no noise schedule (model.schedule): give a model loaded "
                             "with dd.load_model, a diffusers pipeline, its scheduler or its folder, or build the plan "
                             "with SamplingPlan.build(schedule, ...)")
        defaults = check_sampler_defaults(getattr(model, "sampler_defaults", None))
        origin = defaults.pop("from", None)
        if "spacing" in overrides and overrides["spacing"] != "leading" and "steps_offset" not in overrides:
            defaults.pop("steps_offset", None)
        if "clip_x0" in overrides:
            defaults.pop("threshold", None)
            defaults.pop("threshold_max", None)
        if "threshold" in overrides:
            defaults.pop("clip_x0", None)
        kw = {"prediction": getattr(model, "prediction", "eps"), **defaults, **overrides}
        plan = cls.build(schedule, steps, **kw)
        if origin == "diffusers":
            _warn_diffusers_targets(plan)
        return plan

    def inverse(self, eps_at: str = "current") -> SamplingPlan:
        """The DDIM encoder matching this sampler: the eta=0 ODE run from x0 up to x_T.

        Step k goes from alpha_bar a_k to a(tau_k) over the ascending timesteps tau_0 < ... ;
        a_0 = 1 (the data). eps_at picks where the model is evaluated:
          "current" (default, the ODE's Euler step): at the state's own timestep tau_{k-1};
                    the first step has no timestep of its own and uses tau_0;
          "target"  (diffusers' DDIMInverseScheduler, prompt-to-prompt): at tau_k.
        The model output is read at the state's alpha_bar in both. Inversion never clips:
        clipping x0 while encoding is the usual cause of failed reconstructions. (With an
        x0-prediction model the first step is the identity: eps is undefined at alpha_bar = 1.)
        """
        if self.direction != "sample":
            raise ValueError("this plan is already an inversion plan")
        if self.sampler != "ddim":
            raise ValueError(f"inversion runs the DDIM ODE; this plan is a {self.sampler!r} multistep plan: "
                             "build the plan to invert with sampler='ddim'")
        if eps_at not in EPS_AT:
            raise ValueError(f"eps_at must be one of {EPS_AT}, got {eps_at!r}")
        if self.eta != 0.0 or self.variance != "ddim":
            raise ValueError(
                "inversion is the inverse of the deterministic sampler: build the plan with eta=0 "
                "and variance='ddim'"
            )
        up = self.timesteps.flip(0)  # ascending tau_0 < tau_1 < ...
        a_up = self.alpha.flip(0).tolist()
        a_cur = [float(self.alpha_next[-1])] + a_up[:-1]  # the data sit where the sampler ends (1 by default)
        if eps_at == "current":
            t_eval = torch.cat([up[:1], up[:-1]])
        else:
            t_eval = up.clone()
        rows = []
        for ac, an in zip(a_cur, a_up):
            # eps and v read at alpha_bar = 1 give x0 = x exactly; x0-prediction cannot.
            a_read = a_up[0] if ac == 1.0 and self.prediction == "x0" else ac
            cx, ce, ex, ee = _estimates(a_read, self.prediction)
            s1n = math.sqrt(1 - an)
            rows.append(_row(COEF_COLUMNS, cx=cx, ce=ce, d0=math.sqrt(an), dx=s1n * ex, de=s1n * ee, sigma=0.0))
        return replace(
            self,
            timesteps=t_eval,
            alpha=torch.tensor(a_cur, dtype=torch.float64),
            alpha_next=torch.tensor(a_up, dtype=torch.float64),
            coef=torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(COEF_COLUMNS)),
            clip_x0=None,
            threshold=None,
            direction="invert",
            eps_at=eps_at,
        )

    # -- access -------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.timesteps.numel()

    def __len__(self) -> int:
        return self.steps

    @property
    def final_alpha(self) -> float:
        """alpha_bar after the last sampling step (1 unless built with final_alpha=...)."""
        return float(self.alpha_next[-1] if self.direction == "sample" else self.alpha[0])

    @property
    def needs_noise(self) -> bool:
        return bool((self.column("sigma") != 0).any())

    def column(self, name: str) -> torch.Tensor:
        """The (S,) column `name` of the table: one of COEF_COLUMNS, or of ALL_COLUMNS for a multistep plan."""
        return self.coef[:, ALL_COLUMNS.index(name)]

    def to(self, device=None, dtype=torch.float32) -> SamplingPlan:
        """A copy with the tables on `device`, coefficients cast to `dtype` (timesteps int64)."""
        return replace(
            self,
            timesteps=self.timesteps.to(device),
            alpha=self.alpha.to(device, dtype),
            alpha_next=self.alpha_next.to(device, dtype),
            coef=self.coef.to(device, dtype).contiguous(),
        )

    def describe(self) -> dict:
        """A JSON-able record of the plan (for metadata, manifests and logs)."""
        return {
            "T": self.T,
            "steps": self.steps,
            "timesteps": self.timesteps.tolist(),
            "eta": self.eta,
            "variance": self.variance,
            "prediction": self.prediction,
            "spacing": self.spacing,
            "clip_x0": list(self.clip_x0) if self.clip_x0 else None,
            "threshold": self.threshold,
            "threshold_max": None if math.isinf(self.threshold_max) else self.threshold_max,
            "direction": self.direction,
            "eps_at": self.eps_at,
            "final_alpha": self.final_alpha,
            "sampler": self.sampler,
            **({} if self.sampler == "ddim" else {"order": self.order, "history": self.history}),
            **({"lower_order_final": self.lower_order_final} if self.sampler not in ("ddim", "plms") else {}),
            **({"plms_start": self.plms_start} if self.sampler == "plms" else {}),
            **({"tuned": self.meta["tuned"]} if "tuned" in self.meta else {}),  # ddim_fast/tune.py's record
        }

    def __repr__(self) -> str:
        d = self.describe()
        d["timesteps"] = f"[{d['timesteps'][0]}..{d['timesteps'][-1]}]"
        return "SamplingPlan(" + ", ".join(f"{k}={v}" for k, v in d.items() if v is not None) + ")"

    # -- files (ddim_fast/plan_files.py: the format, its checks, the bundled tuned plans) ------------------------
    def save(self, path, *, model=None):
        """Write this plan to `path` as JSON: every field, the float64 table exactly, a format version, and the
        fingerprint of `model` (or of the model a tuned plan was made for). Atomic. Returns the path."""
        from . import plan_files

        return plan_files.save(self, path, model=model, columns=ALL_COLUMNS[: self.coef.shape[1]])

    @classmethod
    def load(cls, path, model=None, *, force: bool = False) -> SamplingPlan:
        """The plan saved in `path`. A damaged, cut-short or edited file is refused in one line (ValueError); with
        `model`, so is a file made for another model (by fingerprint), unless force=True."""
        from . import plan_files

        return plan_files.load(cls, path, model=model, force=force, rules=_file_rules())


def _plan_source(model):
    """What for_model reads (schedule, prediction, sampler_defaults): a model as it is, or the settings of
    a diffusers pipeline, scheduler, scheduler config or folder (scheduler_config.plan_source)."""
    if isinstance(getattr(model, "schedule", None), NoiseSchedule):
        return model
    from .scheduler_config import plan_source

    return plan_source(model)


SAMPLER_DEFAULT_KEYS = ("spacing", "steps_offset", "clip_x0", "threshold", "threshold_max", "final_alpha")


def check_sampler_defaults(defaults) -> dict:
    """A copy of a model's `sampler_defaults` (None -> {}), refusing keys `build` does not take."""
    if defaults is None:
        return {}
    if not isinstance(defaults, dict):
        raise ValueError(f"sampler defaults must be a dict of SamplingPlan.build settings, "
                         f"got {type(defaults).__name__}")
    unknown = sorted(set(defaults) - set(SAMPLER_DEFAULT_KEYS) - {"from"})
    if unknown:
        raise ValueError(f"unknown sampler default(s) {unknown}; the known ones are {list(SAMPLER_DEFAULT_KEYS)}")
    out = dict(defaults)
    if out.get("threshold_max", 0) is None:
        out["threshold_max"] = math.inf
    return out


def _warn_diffusers_targets(plan: SamplingPlan) -> None:
    """DDIMScheduler steps from t to t - T // S (alpha_bar of the final step below 0); this plan
    steps to the next timestep of its own list. Say so where the two differ."""
    ts, S = plan.timesteps.tolist(), plan.steps
    theirs = [t - plan.T // S for t in ts]
    ours = ts[1:] + [-1]
    differ = [(t, a, b) for t, a, b in zip(ts, theirs, ours) if (a < 0) != (b < 0) or (a >= 0 and a != b)]
    if differ:
        t, a, b = differ[0]
        warnings.warn(
            f"with these timesteps diffusers' DDIMScheduler would differ from this plan at {len(differ)} step(s): "
            f"it steps from t to t - T // S (from {t} to {a if a >= 0 else 'the end'}), this plan to the next "
            f"timestep of its list ({b if b >= 0 else 'the end'}). Choose steps that divide T to match it",
            UserWarning, stacklevel=3)


def _check_final_alpha(final_alpha, a_last: float, t_last: int) -> float:
    if final_alpha is None:
        return 1.0
    try:
        final_alpha = float(final_alpha)
    except (TypeError, ValueError):
        raise ValueError(f"final_alpha must be None (alpha_bar = 1) or a number, got {final_alpha!r}") from None
    if not (a_last <= final_alpha <= 1.0):
        raise ValueError(f"final_alpha must lie in [alpha_bar[{t_last}] = {a_last:.6g}, 1], the alpha_bar of the last "
                         f"timestep and the clean data, got {final_alpha!r}")
    return final_alpha


def _warn_far_start(ac: torch.Tensor, ts: torch.Tensor, spacing) -> None:
    """Warn when the sampler would start from pure noise far below the end of the schedule."""
    T, first = ac.numel(), int(ts[0])
    kept, kept_end = math.sqrt(float(ac[first])), math.sqrt(float(ac[T - 1]))
    if kept <= max(FAR_START_SIGNAL, 2 * kept_end):
        return
    what = f"spacing={spacing!r}" if isinstance(spacing, str) else "this timestep list"
    warnings.warn(
        f"{what} starts at timestep {first} of T={T}: the sampler starts from pure noise where the forward "
        f"process still keeps {kept:.2f} of the image (sqrt(alpha_bar); timestep {T - 1} keeps {kept_end:.3f}), "
        f"so samples will be poor. Use spacing='trailing' or 'linspace' (both start at {T - 1})"
        + (", or a number of steps that divides T" if spacing in ("uniform", "leading") and T % len(ts) else ""),
        UserWarning,
        stacklevel=3,
    )


def check_options(steps=None, *, eta=0.0, variance: str = "ddim", prediction: str = "eps", clip_x0=None,
                  threshold=None, threshold_max=math.inf, sampler: str = "ddim", order=None,
                  plms_start: str = "heun") -> None:
    """The checks of `build` that need no schedule, raising the ValueError `build` would: for a caller
    that checks its arguments before it loads a model (the command line). steps: the number of steps
    when known (an order above it is refused); the range [1, T] needs the schedule."""
    eta = _check_variance(variance, _check_eta(eta))
    _check_prediction(prediction)
    clip_x0 = _check_clip(clip_x0)
    threshold, _ = _check_threshold(threshold, threshold_max, clip_x0)
    known = isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= 1
    _check_sampler(sampler, order, int(steps) if known else MAX_ORDER.get(sampler, 1), eta, variance, clip_x0,
                   threshold, plms_start)


def _check_variance(variance, eta: float) -> float:
    """eta as the plan stores it: variance="large" fixes its own noise (eta 1)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
    if variance == "large":
        if eta not in (0.0, 1.0):
            raise ValueError("variance='large' (sigma-hat) fixes its own noise; leave eta at 0 or 1")
        return 1.0
    return eta


def _check_eta(eta) -> float:
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta must be a number >= 0, got {eta!r}") from None
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be finite and >= 0 (0 = DDIM, 1 = DDPM), got {eta}")
    return eta


def _check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def _check_clip(clip_x0):
    if clip_x0 is None:
        return None
    if isinstance(clip_x0, numbers.Real) and not isinstance(clip_x0, bool):
        c = float(clip_x0)
        if not c > 0:  # -1 is not a range: refuse it rather than read it as 1
            raise ValueError(f"clip_x0 = c clips x0 to [-c, c], so c must be > 0, got {clip_x0!r}; "
                             "use clip_x0=None for no clipping or a pair (lo, hi)")
        clip_x0 = (-c, c)
    try:
        lo, hi = (float(v) for v in clip_x0)
    except (TypeError, ValueError):
        raise ValueError(f"clip_x0 must be None, a float c or a pair (lo, hi), got {clip_x0!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"clip_x0 needs finite lo < hi, got ({lo}, {hi})")
    if max(abs(lo), abs(hi)) > _FLOAT32_MAX:  # torch cannot clamp a float32 state to such a bound
        raise ValueError(f"clip_x0 bounds must lie within the float32 range (+-3.4e38), got ({lo}, {hi}); "
                         "use clip_x0=None for no clipping")
    return (lo, hi)


def _check_threshold(threshold, threshold_max, clip_x0):
    if threshold is None:
        return None, math.inf
    threshold, threshold_max = float(threshold), float(threshold_max)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold is a quantile in (0, 1] (Imagen uses 0.995), got {threshold}")
    if not threshold_max >= 1:
        raise ValueError(f"threshold_max must be >= 1, got {threshold_max}")
    if clip_x0 is not None:
        raise ValueError("give either clip_x0 or threshold, not both (thresholding already clips)")
    if threshold_max > _FLOAT32_MAX:  # above every float32 value: no cap (and torch cannot clamp to it)
        threshold_max = math.inf
    return threshold, threshold_max


# -- multistep samplers ---------------------------------------------------------------------------
def _check_sampler(sampler, order, steps, eta, variance, clip_x0, threshold, plms_start) -> int:
    """The order the plan uses (the sampler's default when None); refuses what the sampler cannot do."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if sampler == "plms" and plms_start not in PLMS_STARTS:
        raise ValueError(f"plms_start must be one of {PLMS_STARTS}, got {plms_start!r}")
    if sampler != "ddim" and (eta != 0.0 or variance != "ddim"):
        what = ("draws its own noise: drop eta and variance" if sampler == "dpmpp_2m_sde" else
                "is deterministic (use sampler='dpmpp_2m_sde' for a stochastic multistep sampler)")
        raise ValueError(f"eta and variance='large' are DDIM options; sampler {sampler!r} {what}")
    if sampler == "plms" and (clip_x0 is not None or threshold is not None):
        raise ValueError("plms combines model outputs, not x0 estimates, so clip_x0/threshold cannot be honoured; "
                         "use sampler='dpmpp_2m' or 'unipc' (which clip/threshold x0) or drop the option")
    top = MAX_ORDER[sampler]
    if order is None:
        return DEFAULT_ORDER[sampler]
    if not (isinstance(order, numbers.Integral) and not isinstance(order, bool)) or not 1 <= order <= top:
        raise ValueError(f"sampler {sampler!r} takes order 1..{top}, got {order!r}")
    order = int(order)
    if order > steps:
        raise ValueError(f"order={order} needs at least {order} steps (a multistep method of order k uses the k "
                         f"last model outputs), but the plan has {steps}: use steps >= {order} or a lower order")
    return order


# -- the table's rows: one function per sampler family, one signature -------------------------------
@dataclass(frozen=True)
class _Options:
    """The checked `build` settings a sampler's rows depend on."""

    sampler: str
    prediction: str
    eta: float
    variance: str
    order: int
    lower_order_final: bool
    plms_start: str


def _row(columns=ALL_COLUMNS, /, **values) -> tuple:
    """One table row in `columns` order (a multistep row by default) from its named values; the others 0."""
    if not values.keys() <= set(columns):
        raise AssertionError(f"no such column(s) {sorted(values.keys() - set(columns))}")  # a bug here
    return tuple(values.get(name, 0.0) for name in columns)


def _history_weights(h) -> dict:
    """{"h1": h[0], "h2": h[1], ...}: the weights of the pushed estimates H1, H2, ... (newest first)."""
    if len(h) > MAX_HISTORY:
        raise AssertionError("history deeper than MAX_HISTORY")  # a bug here, not the user's input
    return dict(zip(HISTORY_WEIGHTS, h))


def _history_depth(coef: torch.Tensor) -> int:
    """How many history buffers the table's update reads: its deepest h column with a nonzero entry
    (0 for a DDIM table, which has no h columns)."""
    used = [k for k, name in enumerate(HISTORY_WEIGHTS, 1)
            if COL[name] < coef.shape[1] and bool((coef[:, COL[name]] != 0).any())]
    return max(used, default=0)


def _ddim_rows(ts, a, a_next, o: _Options):
    """(*): Eq. 12 with sigma from eta (Eq. 16, variance "ddim") or the paper's sigma-hat ("large")."""
    rows = []
    for i, (ai, an) in enumerate(zip(a, a_next)):
        cx, ce, ex, ee = _estimates(ai, o.prediction)
        if o.variance == "ddim":
            sigma = o.eta * math.sqrt((1 - an) / (1 - ai)) * math.sqrt(1 - ai / an)
            c = math.sqrt(max(1 - an - sigma**2, 0.0))  # max(): rounding at eta = 1
            rows.append(_row(COEF_COLUMNS, cx=cx, ce=ce, d0=math.sqrt(an), dx=c * ex, de=c * ee, sigma=sigma))
        else:
            beta = 1 - ai / an
            last = i == len(a) - 1
            d0 = math.sqrt(an) * beta / (1 - ai)
            dx = math.sqrt(ai / an) * (1 - an) / (1 - ai)
            rows.append(_row(COEF_COLUMNS, cx=cx, ce=ce, d0=d0, dx=dx, de=0.0,
                             sigma=0.0 if last else math.sqrt(beta)))
    return ts, a, a_next, rows


_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _plms_rows(ts, a, a_next, o: _Options):
    """PNDM's pseudo linear multistep (Liu et al. 2022; diffusers' PNDMScheduler(skip_prk_steps=True)):
    the DDIM (eta = 0) transfer x' = A x + B m' applied to m' = an Adams-Bashforth combination of the
    current and earlier model outputs (raw outputs, converted at the current state, as diffusers does).
    The Heun start adds a row (the first timestep again), so the timesteps and alphas are its own."""
    def transfer(a_from, a_to):
        cx, ce, ex, ee = _estimates(a_from, o.prediction)
        sa, s1a = math.sqrt(a_to), math.sqrt(1.0 - a_to)
        return cx, ce, sa * cx + s1a * ex, sa * ce + s1a * ee

    rows, t_out, a_in, a_out = [], [], [], []
    heun = o.plms_start == "heun" and len(a) >= 2
    for i in range(len(a)):
        cx, ce, A, B = transfer(a[i], a_next[i])
        if heun and i == 1:  # repeat step 0 with the mean of the first two outputs: x1' = x1 + B0 (m1 - m0) / 2
            B0 = rows[0][COL["de"]]  # step 0's B (times its Adams-Bashforth weight 1)
            rows.append(_row(cx=cx, ce=ce, dx=1.0, de=B0 / 2, **_history_weights((-B0 / 2,)), push=0.0))
            t_out.append(int(ts[1]))
            a_in.append(a[1])
            a_out.append(a[1])
        c = _ADAMS_BASHFORTH[_plms_order(sum(r[COL["push"]] != 0 for r in rows), o.order)]
        rows.append(_row(cx=cx, ce=ce, dx=A, de=B * c[0], **_history_weights([B * v for v in c[1:]]),
                         pw=1.0, push=1.0))
        t_out.append(int(ts[i]))
        a_in.append(a[i])
        a_out.append(a_next[i])
    return torch.tensor(t_out, dtype=torch.int64), a_in, a_out, rows


def _dpmpp_rows(ts, a, a_next, o: _Options):
    """dpmpp_2m / dpmpp_3m / dpmpp_2m_sde: x' = rho x + (d0, h1, h2) . (x0, H1, H2) + sigma z, pushing P = x0."""
    lam = [_lambda(v) for v in a]
    rows = []
    for i in range(len(a)):
        k = _dpmpp_order(i, len(a), o.order, a_next[i] == 1.0, o.lower_order_final)
        rho, vec, sigma = _dpmpp_step(lam, a, a_next, i, k, sde=o.sampler == "dpmpp_2m_sde")
        cx, ce, _, _ = _estimates(a[i], o.prediction)
        rows.append(_row(cx=cx, ce=ce, d0=vec[0], dx=rho, sigma=sigma, **_history_weights(vec[1:]),
                         pu=1.0, push=1.0))
    return ts, a, a_next, rows


def _unipc_rows(ts, a, a_next, o: _Options):
    """unipc (bh2): the step's predictor from the corrected state x^c = x + corr . (x0, H1, ...) of the step
    before (see the module docstring), pushing P = x0."""
    lam = [_lambda(v) for v in a]
    rows = []
    corr = None  # the corrector of the step before, as a vector over (x0c, H1, H2, ...)
    for i in range(len(a)):
        k = _unipc_order(i, len(a), o.order, a_next[i] == 1.0, o.lower_order_final)
        rho, vec, nxt = _unipc_step(lam, a, a_next, i, k)
        if corr is not None:  # x^c = x + corr . (x0c, H1, ...): x' = rho x^c + vec . (x0c, H1, ...)
            vec = _add(vec, [rho * c for c in corr])
        corr = nxt
        cx, ce, _, _ = _estimates(a[i], o.prediction)
        rows.append(_row(cx=cx, ce=ce, d0=vec[0], dx=rho, **_history_weights(vec[1:]), pu=1.0, push=1.0))
    return ts, a, a_next, rows


# Every sampler's table through one signature: rows(timesteps, alpha, alpha_next, options) ->
# (timesteps, alpha, alpha_next, rows), each row in ALL_COLUMNS order (COEF_COLUMNS for ddim).
SAMPLER_ROWS = {"ddim": _ddim_rows, "plms": _plms_rows, "dpmpp_2m": _dpmpp_rows, "dpmpp_3m": _dpmpp_rows,
                "dpmpp_2m_sde": _dpmpp_rows, "unipc": _unipc_rows}


# Order rules: the order k of step i of S. Each sampler follows diffusers' scheduler, and a step that
# lands on alpha_bar = 1 (the data) is always first order: the higher orders divide by sigma = 0 there.
def _dpmpp_order(i, S, order, lands_on_data, lower_order_final) -> int:
    """DPM-Solver++ (DPMSolverMultistepScheduler): warm-up 1 at step 0 and at most 2 at step 1 (the history
    holds i estimates); with lower_order_final and S < 15, 1 at the last step and at most 2 at the one before."""
    if order == 1 or i == 0 or (i == S - 1 and (lands_on_data or (lower_order_final and S < 15))):
        return 1
    if order == 2 or i == 1 or (i == S - 2 and lower_order_final and S < 15):
        return 2
    return 3


def _unipc_order(i, S, order, lands_on_data, lower_order_final) -> int:
    """UniPC's predictor (UniPCMultistepScheduler): warm-up at most i + 1 (the history holds i estimates);
    with lower_order_final at most the steps left, S - i."""
    if lands_on_data:
        return 1
    return min(order, S - i if lower_order_final else order, i + 1)


def _plms_order(pushed, order) -> int:
    """PLMS (PNDMScheduler): Adams-Bashforth over the current output and the `pushed` ones stored before it
    (warm-up), at most `order` (and 4, the highest formula)."""
    return min(order, pushed + 1, 4)


# -- the coefficients of one step ---------------------------------------------------------------
def _lambda(a: float) -> float:
    """log(alpha_t / sigma_t), the half log-SNR of alpha_bar a (inf at a = 1)."""
    return math.inf if a == 1.0 else 0.5 * (math.log(a) - math.log1p(-a))


def _add(u, v):
    n = max(len(u), len(v))
    u, v = list(u) + [0.0] * (n - len(u)), list(v) + [0.0] * (n - len(v))
    return [p + q for p, q in zip(u, v)]


def _dpmpp_step(lam, a, a_next, i, k, sde=False):
    """DPM-Solver++ (Lu et al. 2022, multistep, data prediction) from step i's state to alpha_bar
    a_next[i] with order k: (rho, vec, sigma) with x' = rho x + vec . (x0_i, x0_{i-1}, x0_{i-2}) + sigma z.
    phi_1..phi_3 as in the authors' code: phi_1 = e^-h - 1, phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2."""
    an = a_next[i]
    if an == 1.0:  # lands on the data: x' = x0 (every order's limit that exists)
        return 0.0, [1.0], 0.0
    al_t, sg_t, sg_s = math.sqrt(an), math.sqrt(1 - an), math.sqrt(1 - a[i])
    h = _lambda(an) - lam[i]
    if h == 0.0:  # onto its own alpha_bar (final_alpha = the last timestep's): the identity, every order's limit
        return 1.0, [0.0], 0.0
    if sde:  # SDE-DPM-Solver++(2M), midpoint: the ODE's x0 weights with h doubled, x damped by e^-h, noise
        phi_1 = math.expm1(-2 * h)
        rho = sg_t / sg_s * math.exp(-h)
        sigma = sg_t * math.sqrt(-phi_1)  # sigma_t sqrt(1 - e^-2h)
    else:
        phi_1 = math.expm1(-h)
        rho, sigma = sg_t / sg_s, 0.0
    c0 = -al_t * phi_1  # the weight of x0_i: alpha_t (1 - e^-h), DDIM at eta 0 for order 1
    if k == 1:
        return rho, [c0], sigma
    r0 = (lam[i] - lam[i - 1]) / h
    d1_0 = [1 / r0, -1 / r0, 0.0]  # D1_0 = (m0 - m1) / r0 over (m0, m1, m2)
    if k == 2:  # midpoint: x' = rho x + c0 (D0 + D1 / 2)
        return rho, _add([c0], [c0 * 0.5 * v for v in d1_0[:2]]), sigma
    # order 3 (dpmpp_3m; dpmpp_2m_sde stops at 2, so phi_1 is e^-h - 1 here)
    r1 = (lam[i - 1] - lam[i - 2]) / h
    d1_1 = [0.0, 1 / r1, -1 / r1]  # D1_1 = (m1 - m2) / r1
    diff = [p - q for p, q in zip(d1_0, d1_1)]
    d1 = [p + r0 / (r0 + r1) * q for p, q in zip(d1_0, diff)]
    d2 = [q / (r0 + r1) for q in diff]
    phi_2 = phi_1 / h + 1.0
    phi_3 = (phi_1 + h) / h**2 - 0.5  # = phi_2 / h - 1/2, written as the table's numbers were first computed
    c1, c2 = al_t * phi_2, -al_t * phi_3  # x' = rho x + c0 D0 + c1 D1 + c2 D2
    return rho, _add(_add([c0], [c1 * v for v in d1]), [c2 * v for v in d2]), sigma


def _unipc_step(lam, a, a_next, i, k):
    """UniPC with B(h) = e^h - 1 (bh2; Zhao et al. 2023), data prediction, from step i's corrected
    state with predictor order k: (rho, vec, corr) where x_{i+1} = rho x_i^c + vec . (x0_i, x0_{i-1}, ...)
    and the corrector of step i+1 is x_{i+1}^c = x_{i+1} + corr . (x0_{i+1}, x0_i, x0_{i-1}, ...)
    (the predictor's own terms cancel in the difference, so the previous corrected state is never needed)."""
    an = a_next[i]
    if an == 1.0:
        return 0.0, [1.0], None
    al_t, sg_t, sg_s = math.sqrt(an), math.sqrt(1 - an), math.sqrt(1 - a[i])
    h = _lambda(an) - lam[i]
    if h == 0.0:  # onto its own alpha_bar: the identity (x' = the corrected state), as in _dpmpp_step
        return 1.0, [0.0], None
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = h_phi_1  # bh2
    rks = [(lam[i - j] - lam[i]) / h for j in range(1, k)] + [1.0]
    R, b = [], []
    h_phi_k, fact = h_phi_1 / hh - 1.0, 1
    for j in range(1, k + 1):
        R.append([r ** (j - 1) for r in rks])
        b.append(h_phi_k * fact / B_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    if k == 1:
        rhos_p = []
    elif k == 2:
        rhos_p = [0.5]
    else:
        rhos_p = _solve([row[:-1] for row in R[:-1]], b[:-1])
    rhos_c = [0.5] if k == 1 else _solve(R, b)
    rho = sg_t / sg_s
    g = al_t * B_h
    vec = [-al_t * h_phi_1] + [0.0] * (k - 1)
    for j in range(1, k):  # - g rhos_p[j] (x0_{i-j} - x0_i) / r_j
        vec[j] -= g * rhos_p[j - 1] / rks[j - 1]
        vec[0] += g * rhos_p[j - 1] / rks[j - 1]
    corr = [-g * rhos_c[-1], g * rhos_c[-1]] + [0.0] * (k - 1)
    for j in range(1, k):  # - g (rhos_c[j] - rhos_p[j]) (x0_{i-j} - x0_i) / r_j
        w = g * (rhos_c[j - 1] - rhos_p[j - 1]) / rks[j - 1]
        corr[j + 1] -= w
        corr[1] += w
    return rho, vec, corr


def _solve(A, y):
    """A x = y for a small dense system, in float64 (torch.linalg.solve)."""
    return torch.linalg.solve(torch.tensor(A, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)).tolist()


def _file_rules() -> dict:
    """What a plan file is checked against (ddim_fast/plan_files.py imports nothing from this module)."""
    return {"samplers": SAMPLERS, "max_order": MAX_ORDER, "columns": ALL_COLUMNS, "coef_columns": COEF_COLUMNS,
            "max_history": MAX_HISTORY, "variances": VARIANCES, "predictions": PREDICTIONS, "eps_at": EPS_AT,
            "plms_starts": PLMS_STARTS}
