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
class Default(int):
    """An option's default int, told apart from the same number typed by the user (--plan refuses a --steps
    that contradicts the plan, but not the default it never asked for)."""


class DefaultFloat(float):
    """An option's default float (--eta), told apart from a typed one as Default is."""


class DefaultStr(str):
    """An option's default choice (--variance), told apart from a typed one as Default is."""


DEFAULTS = (Default, DefaultFloat, DefaultStr)


def add_model_options(p, *, steps=20):
    p.add_argument("--model", default="digits", help="checkpoint folder, training run folder (its latest "
                   "checkpoint), official ckpt.pth, diffusers folder or bundled name")
    p.add_argument("--steps", type=int, default=Default(steps), help="sampling steps S")
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
    p.add_argument("--eta", type=float, default=DefaultFloat(0.0), help="0 = DDIM (deterministic), 1 = DDPM")
    p.add_argument("--variance", default=DefaultStr("ddim"), choices=VARIANCES,
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
    if info.get("as_is"):  # a diffusers UNet that does not convert into ddim-fast's UNet (models/convert.py)
        print(f"loaded {args.model} as a diffusers {info['as_is']}: {info['why']}; the fused GroupNorm/attention "
              "kernels do not apply")
    elif info.get("format") == "diffusers":
        print(f"loaded {args.model}: a diffusers UNet2DModel that is the DDPM UNet, converted exactly into ddim-fast's "
              "UNet (the fused GroupNorm/attention kernels apply)")
    own = {k: v for k, v in (getattr(model, "sampler_defaults", None) or {}).items() if k != "from"}
    if own:
        shown = ", ".join(f"{k}={v}" for k, v in own.items() if v is not None and not (k == "steps_offset" and v == 0))
        print(f"sampler settings from the model's scheduler config: {shown or 'the defaults'}"
              " (override with --spacing / --clip-x0)")
    return model


def plan_for(args, model, *, steps=None, **sampler):
    """The plan of a command: the model's own sampler settings (SamplingPlan.for_model), overridden by
    the options given on the command line (--spacing, --clip-x0, --threshold) and `sampler` (eta,
    variance). steps: default args.steps. With --plan: that plan (plan_option)."""
    chosen = plan_option(args, model, steps=steps, **sampler)
    if chosen is not None:
        return chosen
    if getattr(model, "schedule", None) is None:
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


# -- --plan FILE | tuned ----------------------------------------------------------------------------------------
def add_plan_option(p):
    """--plan FILE|tuned and --force-plan (sample, decode, interpolate, export)."""
    p.add_argument("--plan", default=None, metavar="FILE|tuned",
                   help="sample with a saved plan (a .json from `ddim-fast tune` or plan.save), or 'tuned': the tuned "
                        "plan bundled with the model for --steps (and --guidance). Options that contradict the plan "
                        "(another --steps, --sampler, --eta, --spacing, ...) are refused")
    p.add_argument("--force-plan", action="store_true",
                   help="with --plan FILE: use a plan made for another model (by fingerprint) or edited by hand")


def plan_option(args, model, *, steps=None, **sampler):
    """The plan --plan names, or None without --plan; an option that contradicts it is refused in one line."""
    source = getattr(args, "plan", None)
    if source is None:
        return None
    want = args.steps if steps is None else steps
    given_steps = None if want is None or isinstance(want, Default) else int(want)
    if source == "tuned":
        guidance = getattr(args, "guidance", None)
        if given_steps is None:
            raise ValueError("--plan tuned picks the bundled tuned plan by --steps: add --steps S")
        plan = SamplingPlan.for_model(model, given_steps, tuned=True, guidance=guidance)
    else:
        plan = SamplingPlan.load(source, model=model, force=getattr(args, "force_plan", False))
    refuse_conflicts(args, plan, given_steps, sampler)
    return plan


def check_plan_file(args, *, steps=None, **sampler) -> None:
    """Before the model loads: a --plan FILE is read (its own checks: format, checksum, values) and every option
    that contradicts it is refused; the model's fingerprint is checked once the model is loaded (plan_option).
    --plan tuned needs the model to find its plan, so only its --steps is checked here."""
    source = getattr(args, "plan", None)
    if source is None:
        return
    want = args.steps if steps is None else steps
    given_steps = None if want is None or isinstance(want, Default) else int(want)
    if source == "tuned":
        if given_steps is None:
            raise ValueError("--plan tuned picks the bundled tuned plan by --steps: add --steps S")
        return
    plan = SamplingPlan.load(source, force=getattr(args, "force_plan", False))
    refuse_conflicts(args, plan, given_steps, sampler)


def refuse_conflicts(args, plan, steps, sampler) -> None:
    """One line naming every option given that contradicts the plan --plan names."""
    clash = plan_conflicts(args, plan, steps, sampler)
    if clash:
        raise ValueError(f"--plan {args.plan} fixes the sampler, but {'; '.join(clash)}: drop the option(s), or "
                         "build the plan from options without --plan")


def plan_conflicts(args, plan, steps, sampler) -> list[str]:
    """'--OPTION V (the plan has W)' for every option given that the plan contradicts."""
    have = {"steps": plan.steps, "sampler": plan.sampler, "order": plan.order, "plms_start": plan.plms_start,
            "lower_order_final": plan.lower_order_final, "spacing": plan.spacing, "threshold": plan.threshold,
            "clip_x0": plan.clip_x0, "eta": plan.eta, "variance": plan.variance}
    given = {"steps": steps, **{k: getattr(args, k, None) for k in (*MULTISTEP_OPTIONS, "spacing", "threshold")},
             **{k: v for k, v in sampler.items() if v is not None}}
    if hasattr(args, "clip_x0"):  # absent unless given
        given["clip_x0"] = None if args.clip_x0 is None else (-float(args.clip_x0), float(args.clip_x0))
    out = []
    for k, v in given.items():
        if (v is None and k != "clip_x0") or isinstance(v, DEFAULTS):  # not given: the plan decides
            continue
        if k in ("eta",) and float(v) == float(have[k]):
            continue
        if v != have[k]:
            out.append(f"--{k.replace('_', '-')} {v} (the plan has {have[k]})")
    tuned_w = (plan.meta.get("tuned") or {}).get("guidance")
    w = getattr(args, "guidance", None)
    if tuned_w is not None and w is not None and float(w) != float(tuned_w):
        out.append(f"--guidance {w:g} (the plan was tuned for guidance {tuned_w:g})")
    return out


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


def plan_summary(plan) -> str:
    """The sampler of a plan in a few words, from plan.describe(): "20 steps ddim eta=0, uniform spacing",
    "10 steps unipc (order 2), trailing spacing", "50 steps ddim eta=1 [variance large], ...", plus the
    clipping or thresholding of x0 when there is one."""
    d = plan.describe()
    steps = len(set(d["timesteps"]))  # plms' Heun start visits its second timestep twice: one more network call
    text = f"{steps} steps {d['sampler']}"
    if d["sampler"] == "ddim":
        text += f" eta={d['eta']:g}" + (f" [variance {d['variance']}]" if d["variance"] != "ddim" else "")
    else:
        opts = [f"order {d['order']}"] + ([f"{d['plms_start']} start"] if d.get("plms_start") else []) \
            + (["no lower order final"] if d.get("lower_order_final") is False else []) \
            + ([f"{d['steps']} network calls"] if d["steps"] != steps else [])
        text += f" ({', '.join(opts)})"
    text += f", {d['spacing']} spacing"
    if d["clip_x0"]:
        text += f", x0 clipped to [{d['clip_x0'][0]:g}, {d['clip_x0'][1]:g}]"
    if d["threshold"] is not None:
        text += f", x0 thresholded (p={d['threshold']:g})"
    return text


def describe(args, eng, model) -> dict:
    """What made an output: recorded in .npz metadata and manifests."""
    c = getattr(model, "config", None)
    return {
        "model": str(args.model),
        "config": c.to_dict() if hasattr(c, "to_dict") else _plain_config(c),
        "plan": eng.plan.describe(),
        "backend": eng.backend,
        "dtype": args.dtype,
        **({"class": args.class_labels, "guidance": args.guidance} if getattr(args, "class_labels", None) else {}),
    }


def _plain_config(c):
    """A diffusers model's config (a dict) as JSON-able values, None for anything else."""
    import json

    if not isinstance(c, dict):
        return None
    try:
        return json.loads(json.dumps(dict(c)))
    except (TypeError, ValueError):
        return None


def progress(total, enabled, desc):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", leave=False)


def params(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M params"
