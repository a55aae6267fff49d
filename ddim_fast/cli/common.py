"""What the sub-commands share: the model and sampler options, the plan built from them, the Engine,
loading a model with the notes a user needs, the device, progress bars, grid options and the
torchrun setup (ddim_fast.distributed)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time

import torch

from ..backends import BACKENDS
from ..checkpoint import load_model
from ..engine import Engine, Workload
from ..plan import PLMS_STARTS, PREDICTIONS, SAMPLERS, VARIANCES, SamplingPlan
from ..precision import DTYPES
from ..schedule import SPACINGS


# -- options ---------------------------------------------------------------------------------------
def add_model_options(p, *, steps=20):
    p.add_argument("--model", default="digits", help="checkpoint folder, training run folder (its latest "
                   "checkpoint), official ckpt.pth, diffusers folder or bundled name")
    p.add_argument("--steps", type=int, default=steps, help="sampling steps S")
    add_spacing_option(p)
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: cuda_graph on CUDA, onnxruntime on a CPU when installed, else reference")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="network precision")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler call")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar, and no lines for the stages of a first ONNX export")


def add_spacing_option(p):
    p.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="timestep sub-sequence (default: the model's own, e.g. a diffusers scheduler's, else uniform)")


def add_sampler_options(p):
    p.add_argument("--eta", type=float, default=0.0, help="0 = DDIM (deterministic), 1 = DDPM")
    p.add_argument("--variance", default="ddim", choices=VARIANCES,
                   help="'large' = the paper's sigma-hat (with --clip-x0 1: the official code's ddpm_noisy)")
    add_clip_option(p, "clip the x0 estimate to [-C, C], or 'none' (default: the model's own setting, e.g. a "
                       "diffusers scheduler's clip_sample, else none)")
    add_multistep_options(p)


MULTISTEP_OPTIONS = ("sampler", "order", "lower_order_final", "plms_start")  # absent (None) unless given


def add_multistep_options(p):
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="ddim (default), plms, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde or unipc (multistep solvers: "
                        "good samples in 10-20 steps; use --spacing trailing)")
    p.add_argument("--order", type=int, default=None, help="multistep order (default: the sampler's)")
    p.add_argument("--no-lower-order-final", dest="lower_order_final", action="store_const", const=False,
                   default=None, help="dpmpp_*/unipc: keep the full order on the last steps")
    p.add_argument("--plms-start", default=None, choices=PLMS_STARTS,
                   help="plms: heun (default, diffusers' PNDM: steps + 1 evaluations) or euler")


def add_guidance_options(p):
    """--class / --guidance: class-conditional sampling and classifier-free guidance."""
    p.add_argument("--class", dest="class_labels", type=int, nargs="+", default=None, metavar="Y",
                   help="class label(s) of a class-conditional model: one for every image, or several cycled "
                        "(image k gets the (k mod count)-th)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale w (with --class): m = m_u + w (m_c - m_u) against the "
                        "null label; 0 = unconditional, 1 = the class alone; default: no guidance (plain class)")


def cond_for(args, lo: int, b: int) -> dict:
    """The Engine keywords (cond, guidance) of images lo..lo+b-1 from --class / --guidance ({} without)."""
    labels = getattr(args, "class_labels", None)
    guidance = getattr(args, "guidance", None)
    if labels is None:
        if guidance is not None:
            raise ValueError("--guidance needs --class (the class to guide towards)")
        return {}
    y = torch.tensor(labels, dtype=torch.long)[torch.arange(lo, lo + b) % len(labels)]
    return {"cond": {"class_labels": y}, "guidance": guidance}


def add_clip_option(p, help_text):
    """--clip-x0 C | none; absent from args unless given (argparse.SUPPRESS), so 'not given' keeps the
    model's own setting and 'none' overrides it."""
    p.add_argument("--clip-x0", type=clip_arg, default=argparse.SUPPRESS, metavar="C", help=help_text)


def clip_arg(text):
    """argparse type of --clip-x0: C > 0, or 'none' (no clipping, also over a model's own default)."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        c = float(text)
    except ValueError:
        c = float("nan")
    if not (c > 0 and c != float("inf")):
        raise argparse.ArgumentTypeError(f"--clip-x0 takes C > 0 (clip x0 to [-C, C]) or 'none', got {text!r}")
    return c


def add_grid_options(p):
    p.add_argument("--scale", type=int, default=1, help="grid outputs: enlarge every pixel N x N")


def check_scale(args):
    if not 1 <= args.scale <= 64:
        raise ValueError(f"--scale must be in [1, 64], got {args.scale}")


def parse_device(arg) -> torch.device:
    """--device: auto (CUDA when available), cpu, cuda or cuda:N."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(arg)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown --device {arg!r}; use auto, cpu, cuda or cuda:N") from None


# -- the model, its plan, the engine -----------------------------------------------------------------
def load(args):
    """load_model(--model), saying which checkpoint a training run folder gave and which sampler
    settings the model brings (a diffusers scheduler config)."""
    model = load_model(args.model)
    info = getattr(model, "checkpoint_info", {}) or {}
    if info.get("run"):
        print(f"{args.model} is a training run: loading its latest checkpoint {info['path']} "
              f"({'EMA' if info.get('ema') else 'raw'} weights)")
    own = {k: v for k, v in (getattr(model, "sampler_defaults", None) or {}).items() if k != "from"}
    if own:
        shown = ", ".join(f"{k}={v}" for k, v in own.items() if v is not None and not (k == "steps_offset" and v == 0))
        print(f"sampler settings from the model's scheduler config: {shown or 'the defaults'}"
              " (override with --spacing / --clip-x0)")
    return model


def plan_for(args, model, *, steps=None, **sampler):
    """The plan of a command: the model's own sampler settings (SamplingPlan.for_model), overridden by
    the options given on the command line (--spacing, --clip-x0, --threshold) and `sampler` (eta,
    variance). steps: default args.steps."""
    if model.schedule is None:
        raise ValueError(f"{args.model} carries no noise schedule; convert it with `ddim-fast convert`")
    if model.prediction not in PREDICTIONS:
        raise ValueError(f"{args.model} has an unknown prediction type {model.prediction!r}")
    given = {}
    if getattr(args, "spacing", None) is not None:
        given["spacing"] = args.spacing
    if hasattr(args, "clip_x0"):  # absent unless given (argparse.SUPPRESS); 'none' gives None
        given["clip_x0"] = args.clip_x0
    if getattr(args, "threshold", None) is not None:
        given["threshold"] = args.threshold
    given.update({k: getattr(args, k) for k in MULTISTEP_OPTIONS if getattr(args, k, None) is not None})
    return SamplingPlan.for_model(model, args.steps if steps is None else steps, **given, **sampler)


def engine(args, *, eta=0.0, variance="ddim", device=None, model=None, plan=None, images=None):
    """(Engine, model) for a sampling command: --model loaded unless given, its plan, --backend,
    --device and --dtype. images: how many images the command runs through the sampler, its Workload
    (with --batch-size and --guidance), by which --backend auto on a CPU weighs exporting to ONNX first
    (engine.choose_backend: the one rule, the library's too)."""
    model = model if model is not None else load(args)
    plan = plan if plan is not None else plan_for(args, model, eta=eta, variance=variance)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = device or parse_device(args.device)
    workload = None
    if images is not None:
        workload = Workload(images=max(1, images), batch=args.batch_size,
                            guided=getattr(args, "guidance", None) is not None)
    eng = Engine(model, plan, backend=args.backend, device=device, dtype=DTYPES[args.dtype], workload=workload)
    return eng, model


@contextlib.contextmanager
def export_progress(enabled: bool):
    """The stages of a fresh ONNX export (the "ddim_fast" logger at INFO), one line each with the time so
    far, on stderr while the command runs; nothing when not enabled (--no-progress)."""
    logger = logging.getLogger("ddim_fast")
    if not enabled:
        yield
        return
    t0 = time.perf_counter()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Elapsed(t0))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _Elapsed(logging.Formatter):
    def __init__(self, t0):
        super().__init__()
        self.t0 = t0

    def format(self, record):
        return f"  [{time.perf_counter() - self.t0:5.1f} s] {record.getMessage()}"


def describe(args, eng, model) -> dict:
    """What made an output: recorded in .npz metadata and manifests."""
    c = model.config
    return {
        "model": str(args.model),
        "config": c.to_dict() if hasattr(c, "to_dict") else None,
        "plan": eng.plan.describe(),
        "backend": eng.backend,
        "dtype": args.dtype,
        **({"class": args.class_labels, "guidance": args.guidance} if getattr(args, "class_labels", None) else {}),
    }


def progress(total, enabled, desc):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", leave=False)


def params(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M params"
