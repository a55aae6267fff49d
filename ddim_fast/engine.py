"""Engine: a model, a plan and a backend, ready to sample many times.

    eng = dd.Engine(model, plan, backend="auto", device="cuda", dtype=torch.float16)
    imgs = eng.sample(16, seed=0)        # (16, C, H, W) float32 in [-1, 1]
    imgs = eng(x_T)                      # from a given start
    x_T = eng.invert(imgs)               # DDIM encoding (eta=0 plans)
    imgs = eng.sample(16, plan=other)    # another plan for one call (steps, spacing, eta, sampler)

Backends (ddim_fast/backends/, one file each; all produce the reference sampler's result, within
docs/DESIGN.md's tolerance rule):
  reference    eager PyTorch (ddim_fast.sampling) on any device: the truth.
  triton       the UNet with fused Triton GroupNorm(+SiLU) and attention, and the fused step
               kernel (noise drawn in-kernel), launched eagerly. CUDA, or CPU under
               TRITON_INTERPRET=1 (for tests: very slow).
  cuda_graph   the triton backend's whole S-step loop (UNet + step, every step) captured into
               one CUDA graph and replayed: one launch per sample call instead of hundreds.
  onnxruntime  ONNX Runtime (ddim_fast.onnx): on a CPU the reference loop with the exported network
               in one CPU EP session (any plan, one export); on CUDA (onnxruntime-gpu) the exported
               whole sampler with IO binding.
  auto         the first that can run of backends.AUTO: on CUDA cuda_graph (Triton installed),
               else onnxruntime (onnxruntime-gpu), else reference; on a CPU onnxruntime when
               installed and worth it for the Workload (choose_backend), else reference. The
               choice and the reason (naming what was skipped and why, with the estimates it
               weighed) are in `eng.backend` and `eng.backend_reason`.

What a first Engine costs on a CPU (backend auto or onnxruntime): the network's ONNX export, once per
model and precision (seconds; cached on disk, its stages logged to the "ddim_fast" logger), and an ONNX
Runtime session. Later Engines of the model in the process reuse the session; a new plan, per call or
per Engine, costs no export and no session.

The state x is float32 throughout; `dtype` is the network's precision (fp32, fp16 or bf16).
The Engine works on its own copy of the model (moved to `device` and `dtype`), so the caller's
model is never modified.

CUDA graph costs. A graph is captured on the first call for each (batch size, direction
(sample / invert), start (`sample`: x_T drawn by a kernel inside the graph; `eng(x_T)`: copied
in), noise source (seed / explicit noise=)) and kept in a small LRU cache (`max_graphs`,
default 4; evicting one frees its graph). Capture first runs the whole loop once eagerly
(Triton JIT, cuDNN algorithm search, allocator growth), then records it once more: about two
eager sampling calls of time, plus Triton's one-off compilation on a cold cache. Memory: the
activations of one UNet forward at that batch size (every step reuses them; all graphs share
one pool) plus static buffers for x (and x_T / noise when given) and the output copy. A new
batch size, image shape, dtype or plan (by content) captures again; a new seed or
first_index does not (they live in (1,) device tensors). Replays copy the result out, so a
result the caller holds is never overwritten by the next replay. These costs are stated from
the mechanism; benchmarks/gpu_suite.py reports the measured first-call times.

Settings and limits. The Engine leaves torch's cuDNN and TF32 settings as the caller set them
(torch.backends.cudnn.enabled / deterministic / allow_tf32, torch.backends.cuda.matmul);
graph warm-up only turns on cuDNN's algorithm search (cudnn.benchmark) for its own duration,
and not at all when the caller asked for determinism. A batch larger than the fused kernels'
grid limit (MAX_BATCH = 65535 samples) is run in near-equal chunks (the same images: noise is
keyed by the global sample index); GroupNorm inputs of 2**31 elements or more are split over
the batch by the triton ops.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import OrderedDict

import torch

from . import conditioning, rng
from .backends import AUTO, BACKENDS, BackendUnavailable, backend_class
from .backends.base import raise_if_flagged
from .checks import check, is_int, positive_int, sample_shape
from .models.diffusers_unet import adapt
from .plan import SamplingPlan
from .precision import NAMES


@dataclasses.dataclass(frozen=True)
class Workload:
    """What an Engine is about to do, for backend="auto" on a CPU before the model's ONNX export is cached:
    `images` samples in calls of at most `batch` (default: all in one call), with guidance (a doubled
    batch) or not. auto then exports only when exporting and running on ONNX Runtime is expected to end
    sooner than the reference backend (see choose_backend). Without a workload, auto exports."""

    images: int
    batch: int | None = None
    guided: bool = False

    def __post_init__(self):
        positive_int("Workload images", self.images)
        if self.batch is not None:
            positive_int("Workload batch", self.batch)
        check(self.guided in (True, False), f"Workload guided must be True or False, got {self.guided!r}")


class Engine:
    def __init__(
        self,
        model,
        plan: SamplingPlan,
        backend: str = "auto",
        device=None,
        dtype: torch.dtype = torch.float32,
        *,
        shape=None,
        channels_last: bool = False,
        max_graphs: int = 4,
        onnx_options: dict | None = None,
        workload: Workload | None = None,
    ):
        """model: a UNet (or any nn.Module model(x, t, **cond)), or a diffusers UNet2DModel /
        UNet2DConditionModel as it is (its output's .sample is taken); plan: a sampling plan (eta=0
        plans also give `invert`); device: default CUDA when available; dtype: the network's
        precision; shape: (C, H, W) of one sample, read from model.config when omitted (a diffusers
        model's in_channels and sample_size);
        channels_last: run the network in NHWC memory format (often faster with fp16 convs);
        onnx_options: keyword arguments of the onnxruntime backend (backends/onnxruntime.py: threads and
        opset; on CUDA also unroll and cuda_graph, which shape its whole-sampler graphs);
        workload: a Workload (images, batch) for backend="auto" on a CPU: with it, auto runs a job shorter
        than the one-off ONNX export on the reference backend (choose_backend); without it, auto exports.

        Cost: with backend="auto" on a CPU the first Engine of a model exports its network to ONNX (seconds,
        once per model and precision, cached on disk); later Engines of the same model open the cached
        export (an open session is reused in the process), and a new plan, per call (plan=) or per Engine,
        costs no export and no new session. The `ddim_fast` logger reports the export's stages at INFO."""
        if not isinstance(plan, SamplingPlan) or plan.direction != "sample":
            raise ValueError("plan must be a sampling SamplingPlan (SamplingPlan.build(...)), not an inversion plan")
        if workload is not None and not isinstance(workload, Workload):
            raise ValueError(f"workload must be a dd.Workload(images=..., batch=...) or None, "
                             f"got {type(workload).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if dtype not in NAMES:
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        positive_int("max_graphs", max_graphs)
        model = adapt(model)  # a diffusers UNet: called as model(x, t, **cond), its .sample taken
        self.cond_spec = conditioning.cond_spec(model)  # what conditioning it takes (None: unknown)
        self.device = torch.device(device) if device is not None else _default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("device='cuda' but torch sees no CUDA device; use device='cpu'")
        self.plan = plan
        self._inverse_plans = OrderedDict()  # (id(plan), eps_at) -> (plan, its inverse)
        self.dtype = dtype
        self.shape = sample_shape(model, shape)
        self.channels_last = channels_last
        self.prediction = getattr(model, "prediction", plan.prediction)
        if self.prediction != plan.prediction:
            raise ValueError(
                f"the model predicts {self.prediction!r} but the plan was built for {plan.prediction!r}: "
                f"build the plan with prediction={self.prediction!r}"
            )
        options = _check_onnx_options(onnx_options, backend)
        fingerprint = functools.cache(lambda: _network_fingerprint(model))  # at most once per Engine
        self.backend, self.backend_reason = choose_backend(backend, self.device, model=model, plan=plan, dtype=dtype,
                                                           shape=self.shape, workload=workload, fingerprint=fingerprint)
        cls = backend_class(self.backend)
        if not cls.options:
            options = {}  # auto chose a backend without options (the user could not know which it would pick)
        elif self.backend == "onnxruntime" and self.device.type == "cpu":
            options["model_fp"] = fingerprint()
        self.config = getattr(model, "config", None)
        self.schedule = getattr(model, "schedule", None)
        self._backend = cls(model, plan, device=self.device, dtype=dtype, shape=self.shape, channels_last=channels_last,
                            max_graphs=int(max_graphs), **options)

    # -- public -------------------------------------------------------------------------------
    def sample(self, batch_size: int, seed: int = 0, *, first_index: int = 0, cond: dict | None = None,
               uncond: dict | None = None, guidance: float | None = None, plan: SamplingPlan | None = None
               ) -> torch.Tensor:
        """`batch_size` images for samples first_index .. first_index+B-1 of `seed`, as a
        (B, C, H, W) float32 tensor in [-1, 1] on the engine's device. Sample k of a seed is the
        same image whatever the batch size, backend or device (to the tolerance rule), and its noise
        does not depend on cond or guidance.

        cond: the model's conditioning, a dict of (B, ...) tensors (e.g. {"class_labels": y});
        guidance: None, or w for classifier-free guidance, m = m_u + w (m_c - m_u) from one network
        call on the doubled batch [uncond; cond] (0: unconditional, 1: conditional alone); uncond
        defaults to the model's null input (the null label), else it must be given (same keys and
        shapes as cond). Under the CUDA graph new labels and a new scale replay the same graph.
        plan: this call's sampling plan instead of the engine's (any steps, spacing, eta, sampler; the
        model's prediction type): on a CPU it costs no export and no new session; the cuda_graph backend
        captures once per plan (max_graphs kept)."""
        batch_size = positive_int("batch_size", batch_size)
        first_index = _check_first_index(first_index, batch_size)
        seed = rng.check_seed(seed)
        plan = self._plan(plan)
        cc = self._conditioning(batch_size, cond, uncond, guidance)
        out = _in_chunks(batch_size, self.max_batch, lambda lo, hi: self._backend.sample(
            hi - lo, plan, seed=seed, first_index=first_index + lo, **_cut(cc, lo, hi)))
        return _finite(out, self.backend).clamp_(-1.0, 1.0)

    def __call__(self, x_T: torch.Tensor, *, seed: int | None = None, noise: torch.Tensor | None = None,
                 first_index: int = 0, cond: dict | None = None, uncond: dict | None = None,
                 guidance: float | None = None, plan: SamplingPlan | None = None) -> torch.Tensor:
        """Sample from a given start x_T (B, C, H, W); returns float32 images in [-1, 1].

        seed keys the per-step noise of eta > 0 plans (default: 0); noise (S, B, C, H, W)
        replaces it (parity tests); cond, uncond, guidance, plan as in sample()."""
        plan = self._plan(plan)
        x_T = self._check_input(x_T, "x_T")
        cc = self._conditioning(x_T.shape[0], cond, uncond, guidance)
        if seed is not None and noise is not None:
            raise ValueError("give seed= or noise=, not both: noise= replaces the seeded generator")
        if noise is not None:
            want = (plan.steps, *x_T.shape)
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != want:
                raise ValueError(f"noise must have shape (steps, *x_T.shape) = {want}, "
                                 f"got {getattr(noise, 'shape', type(noise).__name__)}")
            noise = noise.to(self.device, torch.float32)
        seed = rng.check_seed(0 if seed is None else seed)
        first_index = _check_first_index(first_index, x_T.shape[0])
        out = _in_chunks(x_T.shape[0], self.max_batch, lambda lo, hi: self._backend.run(
            x_T[lo:hi], plan, seed=seed, noise=None if noise is None else noise[:, lo:hi].contiguous(),
            first_index=first_index + lo, **_cut(cc, lo, hi)))
        return _finite(out, self.backend).clamp_(-1.0, 1.0)  # checked first: clamp would turn inf into +-1

    def sample_rows(self, seeds, indices, *, cond: dict | None = None, uncond: dict | None = None,
                    guidance: float | None = None, plan: SamplingPlan | None = None) -> torch.Tensor:
        """One batch whose rows come from different requests: row b is sample indices[b] of seeds[b], the
        image `sample(1, seeds[b], first_index=indices[b], ...)` gives it alone (bitwise where the backend is
        batch-invariant bitwise, else to the tolerance rule), on every backend: x_T and, for eta > 0 plans,
        every step's noise are drawn on the host per row (rng.row_normal, the same keyed numbers) and the
        batch runs from them (`noise=`). cond (B, ...) per row; guidance one scale for the batch (the
        fused step takes a scalar: requests with different scales go in different batches)."""
        seeds, indices = list(seeds), list(indices)
        for i in indices:
            _check_first_index(i, 1)
        plan = self._plan(plan)
        x_T = rng.row_normal(seeds, indices, self.shape, step=0, purpose=rng.PURPOSE_XT)
        noise = None
        if plan.needs_noise:
            noise = torch.stack([rng.row_normal(seeds, indices, self.shape, step=i, purpose=rng.PURPOSE_STEP)
                                 for i in range(plan.steps)])
        return self(x_T, noise=noise, cond=cond, uncond=uncond, guidance=guidance, plan=plan)

    def invert(self, x0: torch.Tensor, *, eps_at: str = "current", cond: dict | None = None,
               uncond: dict | None = None, guidance: float | None = None, plan: SamplingPlan | None = None
               ) -> torch.Tensor:
        """DDIM encoding of images x0 (B, C, H, W) to latents x_T (not clamped). cond, uncond,
        guidance as in sample(): encode with the conditioning you decode with (guidance > 1 is
        allowed but then the round trip is no longer exact; see ddim_fast.sampling.invert).
        plan: the sampling plan whose sampler should reconstruct x0 (default: the engine's)."""
        plan = self._plan(plan)
        x0 = self._check_input(x0, "x0")
        inv = self._inverse_plan(plan, eps_at)
        cc = self._conditioning(x0.shape[0], cond, uncond, guidance)
        out = _in_chunks(x0.shape[0], self.max_batch, lambda lo, hi: self._backend.run(
            x0[lo:hi], inv, seed=0, noise=None, first_index=0, **_cut(cc, lo, hi)))
        return _finite(out, self.backend)

    @property
    def max_batch(self) -> int | None:
        """The largest batch one launch of this backend's kernels takes (None: no limit); larger
        batches are run in near-equal chunks of at most this many samples."""
        return self._backend.max_batch

    @property
    def graph_captures(self) -> int:
        """How many CUDA graphs this engine has captured so far (0 for eager backends)."""
        return self._backend.captures

    def __repr__(self) -> str:
        return (f"Engine(backend={self.backend!r}, device={str(self.device)!r}, dtype={NAMES[self.dtype]}, "
                f"shape={self.shape}, plan={self.plan!r})")

    # -- internals ------------------------------------------------------------------------------
    def _plan(self, plan):
        """The plan of a call: the engine's, or `plan` checked as the constructor checks its own."""
        if plan is None or plan is self.plan:
            return self.plan
        if not isinstance(plan, SamplingPlan) or plan.direction != "sample":
            raise ValueError("plan= must be a sampling SamplingPlan (SamplingPlan.build(...)), not an inversion plan")
        if plan.prediction != self.prediction:
            raise ValueError(f"the model predicts {self.prediction!r} but plan= was built for {plan.prediction!r}: "
                             f"build the plan with prediction={self.prediction!r}")
        return plan

    def _inverse_plan(self, plan, eps_at):
        key = (id(plan), eps_at)  # the value holds the plan, so its id is not reused while cached
        if key not in self._inverse_plans:
            self._inverse_plans[key] = (plan, plan.inverse(eps_at))
            while len(self._inverse_plans) > INVERSE_PLANS_KEPT:
                self._inverse_plans.popitem(last=False)
        self._inverse_plans.move_to_end(key)
        return self._inverse_plans[key][1]

    def _conditioning(self, batch, cond, uncond, guidance):
        """The checked conditioning of one call on the engine's device (labels checked once, here)."""
        return conditioning.resolve(None, batch, cond, uncond, guidance, self.device, spec=self.cond_spec)

    def _check_input(self, x, name):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.shape or x.ndim != len(self.shape) + 1 or x.shape[0] < 1:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        x = x.to(self.device, torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} has NaN or inf values; pass a finite tensor")
        return x


# -- backend choice -------------------------------------------------------------------------------
def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


INVERSE_PLANS_KEPT = 8  # inversion plans an Engine keeps (one per plan and eps_at it was asked to invert with)

# ONNX Runtime's time for a job as a fraction of the reference backend's, on a CPU, once the export exists:
# the largest fraction measured, so that auto errs towards the reference backend.
# NOTE: measured on the 2-core VM, never quiet in that session (docs/DESIGN.md, "The backend rule";
# benchmarks/first_result.py, its ratio part, warm sampling calls): digits 0.42, 0.57, 0.70 at batch 1, 8,
# 16 (load average 2.2), 0.09, 0.07, 0.24 at batch 1, 8, 64 (load 3.7); the CIFAR-10 UNet 0.06, 0.24, 0.38
# at batch 1, 8, 16 (load 2.9-4.0), 0.07 and 0.28 at batch 1 and 8 (load 3.1). On record from a quiet run:
# the CIFAR-10 UNet 0.61 and 0.85 at batch 1 and 8 (2026-11-25), digits 0.63 at batch 64 (issue 22).
ORT_TIME_FRACTION = 0.70
# The probe: one timed network call, at the job's batch when that costs at most PROBE_BUDGET_S, else at
# the largest batch that does (the per-sample time scaled linearly to the job's batch).
PROBE_BUDGET_S = 0.5


def choose_backend(backend: str, device: torch.device, *, model=None, plan: SamplingPlan | None = None,
                   dtype=torch.float32, shape=None, workload: Workload | None = None, fingerprint=None
                   ) -> tuple[str, str]:
    """(name, reason) of the backend an Engine runs: the one rule, for the library and the command line.

    An explicit `backend` runs when it can on `device` (else BackendUnavailable naming what is missing).
    "auto" takes the first of AUTO[device.type] that can run, saying what it skipped and why; on a CPU,
    given the model, onnxruntime must also fit the job: it runs fp32 and fp16 networks; when the model's
    ONNX export is cached, or no `workload` is given (the library's default: export once, then cached),
    it is taken; otherwise the job's time on the reference backend (one timed network call, the probe)
    is set against exporting first (export_estimate_s, from this machine's past exports and the
    network's size) plus ORT_TIME_FRACTION of that time, and the faster is taken. fingerprint: a
    callable giving export.network_fingerprint(model) (the Engine computes it once)."""
    if backend != "auto":
        missing = backend_class(backend).unavailable(device)
        if missing:
            raise BackendUnavailable(f"backend {backend!r} cannot run: {missing}")
        return backend, f"requested: {backend}"
    skipped, notes = [], ""
    for name in AUTO.get(device.type, ("reference",)):
        missing = backend_class(name).unavailable(device)
        if missing is None and name == "onnxruntime" and device.type == "cpu" and model is not None:
            missing, notes = _cpu_rule(model, plan, dtype, shape, workload, fingerprint)
        if missing is None:
            reason = f"auto: {device.type.upper()} device -> {name}, {backend_class(name).summary}" + notes
            return name, reason + "".join(f"; without {n}: {why}" for n, why in skipped)
        skipped.append((name, missing))
    raise BackendUnavailable(f"no backend can run on {device}: " + "; ".join(f"{n}: {why}" for n, why in skipped))


def _cpu_rule(model, plan, dtype, shape, workload, fingerprint) -> tuple[str | None, str]:
    """(why not onnxruntime, or None; what to add to the reason when it is taken) for auto on a CPU."""
    from .onnx.cache import export_estimate_s
    from .onnx.export import EXPORT_DTYPES, network_cached

    if dtype not in EXPORT_DTYPES:
        return f"it runs fp32 and fp16 networks, not {NAMES[dtype]}", ""
    fp = fingerprint() if fingerprint is not None else None
    if network_cached(model, dtype, shape=shape, model_fp=fp):
        return None, "; the model's ONNX export is cached"
    params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0
    export_s = export_estimate_s(params)
    if workload is None:
        return None, (f"; exporting the model to ONNX first (about {export_s:.0f} s here, once; cached for later "
                      "Engines and commands)")
    if plan is None:
        raise ValueError("choose_backend needs the plan to weigh a workload")
    doubled = 2 if workload.guided else 1  # guidance: the network sees [uncond; cond]
    batch = min(workload.batch or workload.images, workload.images)
    try:
        per_sample, probed = probe_per_sample_s(model, doubled * batch, dtype, shape)
    except Exception as e:  # a model the probe cannot call plainly: the library's default
        return None, (f"; exporting the model to ONNX first (about {export_s:.0f} s here, once): the reference "
                      f"backend's time could not be measured ({type(e).__name__}: {e})")
    ref_s = per_sample * doubled * workload.images * plan.steps
    ort_s = ORT_TIME_FRACTION * ref_s
    numbers = (f"this job ({workload.images} images x {plan.steps} network calls{', guided' if workload.guided else ''}"
               f"; {1e3 * per_sample:.2f} ms per sample-call on the reference backend, timed at batch {probed}) takes "
               f"~{ref_s:.1f} s on the reference backend, against ~{export_s:.0f} s to export the model to ONNX "
               f"first and ~{ort_s:.1f} s ({ORT_TIME_FRACTION:g} x) on ONNX Runtime")
    if export_s + ort_s < ref_s:
        return None, f"; {numbers}: exporting first is faster (once; cached for later Engines and commands)"
    return (f"{numbers}: the reference backend is faster for this job (backend='onnxruntime' exports now, and "
            "later Engines and commands use the cached export)"), ""


@torch.no_grad()
def probe_per_sample_s(model, batch: int, dtype, shape) -> tuple[float, int]:
    """(seconds per sample of one reference network call at about `batch`, the batch timed): a warm-up call
    (a process's first call pays one-off set-up), one timed call at batch 1, then, when `batch` is larger
    and fits PROBE_BUDGET_S, one at `batch` (else at the largest batch that fits). The caller's model is
    used as it is when it already runs on the CPU in `dtype`; otherwise a copy."""
    import copy

    params = [*model.parameters(), *model.buffers()] if isinstance(model, torch.nn.Module) else []
    if not all(p.device.type == "cpu" and (p.dtype == dtype or not p.is_floating_point()) for p in params):
        model = copy.deepcopy(model).to("cpu", dtype)
    spec = conditioning.cond_spec(model) or {}

    def call(b):
        x = torch.randn(b, *shape, dtype=dtype)
        t = torch.full((b,), 500, dtype=torch.int64)
        cond = conditioning.cast_cond(conditioning.example_cond(spec, b, length=77), dtype) if spec else {}
        t0 = time.perf_counter()
        model(x, t, **cond)
        return time.perf_counter() - t0

    call(1)
    one = call(1)
    b = min(batch, max(1, int(PROBE_BUDGET_S / max(one, 1e-9))))
    if b <= 1:
        return one, 1
    return call(b) / b, b


def _network_fingerprint(model) -> str:
    from .onnx.export import network_fingerprint

    return network_fingerprint(model)


def _check_onnx_options(options, backend) -> dict:
    """onnx_options checked before any work: a dict of the onnxruntime backend's own keyword arguments,
    given only where onnxruntime may run."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"onnx_options must be a dict (e.g. {{'threads': 2}}), got {type(options).__name__}")
    allowed = backend_class("onnxruntime").options
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown onnx_options {', '.join(map(repr, unknown))}; the onnxruntime backend takes "
                         f"{', '.join(allowed)}")
    if options and backend not in ("auto", "onnxruntime"):
        raise ValueError(f"onnx_options apply to the onnxruntime backend only, and this engine runs {backend!r}; "
                         "drop them or pick backend='onnxruntime'")
    return dict(options)


def _check_first_index(first_index, batch):
    if not is_int(first_index) or not (0 <= first_index and first_index + batch <= 2**31 - 1):
        raise ValueError(f"first_index must be an int with 0 <= first_index + B < 2**31, got {first_index!r}")
    return int(first_index)


def batch_chunks(n: int, limit: int | None) -> list[tuple[int, int]]:
    """[(lo, hi), ...] covering range(n) in the fewest near-equal chunks of at most `limit`
    (equal sizes let a CUDA graph serve every chunk but possibly the last)."""
    if limit is None or n <= limit:
        return [(0, n)]
    count = -(-n // limit)
    size = -(-n // count)
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _in_chunks(n, limit, run):
    """run(lo, hi) over batch_chunks(n, limit), concatenated along the batch."""
    chunks = batch_chunks(n, limit)
    if len(chunks) == 1:
        return run(0, n)
    return torch.cat([run(lo, hi) for lo, hi in chunks])


def _cut(cc, lo, hi):
    """The backend keyword for samples lo..hi-1 of a call's conditioning (nothing when there is none,
    so a backend without conditioning support keeps working for unconditional calls)."""
    return {} if cc is None else {"cond": cc.slice(lo, hi)}


def _finite(out, backend):
    """`out`, or NonFiniteError: every backend's result is checked (ONNX Runtime has no flag), so a
    NaN never leaves the Engine as an image."""
    raise_if_flagged((~torch.isfinite(out)).any(), backend)
    return out
