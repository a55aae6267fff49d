"""What a command checks before it loads a model, so that a bad argument costs nothing.

Each command's `check(args)` (in its own file) runs first and refuses, as one line, every argument that
needs no model: seeds, counts and ranges, the sampler's options, the conditioning options, the device,
the output (its kind; an existing, writable folder: only an output folder itself is created) and the
input files (present and readable; an .npz of latents or images is read here, whole: it is small next
to a model, and read once). Then, as soon as the model's config is known, `check_with_model` refuses
what needs it: more steps than the model's T, a label outside its classes, latents or images of another
shape. The config comes from the model's config.json without its weights (ModelFacts.of_config), or,
for a format that keeps none (an official ckpt.pth), from the loaded model (ModelFacts.of_model), still
before the plan, the Engine (an ONNX export, the backend's timing probe) and any sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import images, rng
from ..checks import is_int
from ..plan import check_options
from .common import MULTISTEP_OPTIONS, check_plan_file, parse_device


# -- arguments that need no model ------------------------------------------------------------------
def seed(value, name: str = "--seed") -> int:
    if not is_int(value) or not 0 <= value <= rng.SEED_MAX:
        raise ValueError(f"{name}: a seed must be an int in [0, 2**63), got {value!r}")
    return int(value)


def at_least(value, lo: int, name: str, why: str = "") -> None:
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}{why}, got {value}")


def steps(value, name: str = "--steps") -> None:
    """The number of steps, before the model says its T (check_with_model checks the top of the range)."""
    if value is not None and value < 1:
        raise ValueError(f"{name}: steps must be an int in [1, T] (T: the model's training timesteps), got {value}")


def scale(args) -> None:
    if not 1 <= args.scale <= 64:
        raise ValueError(f"--scale must be in [1, 64], got {args.scale}")


def sampling(args, *, eta=0.0, variance="ddim") -> None:
    """The options every sampling command shares: --steps, --batch-size, --device, and the sampler's
    options (the checks of SamplingPlan.build that need no schedule, with its messages)."""
    steps(args.steps)
    at_least(args.batch_size, 1, "--batch-size")
    parse_device(args.device)
    sampler_options(args, steps=args.steps, eta=eta, variance=variance)


def sampler_options(args, *, steps, eta=0.0, variance="ddim") -> None:
    """--sampler, --order, --plms-start, --clip-x0, --threshold with eta and variance, as SamplingPlan.build
    would check them (plan.check_options); the model's own defaults (a diffusers scheduler's clipping) are
    checked with the plan, right after the model loads. With --plan the plan fixes these: a plan file is read
    and the options given are checked against it instead (common.check_plan_file)."""
    if getattr(args, "plan", None) is not None:
        return check_plan_file(args, steps=steps, eta=eta, variance=variance)
    given = {k: getattr(args, k) for k in MULTISTEP_OPTIONS if getattr(args, k, None) is not None}
    given.pop("lower_order_final", None)  # a flag: nothing to check
    if hasattr(args, "clip_x0"):  # absent unless given (argparse.SUPPRESS)
        given["clip_x0"] = args.clip_x0
    if getattr(args, "threshold", None) is not None:
        given["threshold"] = args.threshold
    check_options(steps, eta=eta, variance=variance, **given)


def conditioning(args) -> None:
    """--class / --guidance without the model: labels >= 0, a finite scale, and guidance only with a class."""
    labels, w = getattr(args, "class_labels", None), getattr(args, "guidance", None)
    if w is not None and not math.isfinite(w):
        raise ValueError(f"--guidance must be a finite number (e.g. 2), got {w}")
    if w is not None and labels is None:
        raise ValueError("--guidance needs --class (the class to guide towards)")
    for y in labels or ():
        if y < 0:
            raise ValueError(f"--class takes labels >= 0, got {y}")


def output(args, *, kinds=None, what: str = "") -> None:
    """--out: a kind the command writes, not replacing anything without --overwrite, in a folder that
    exists and can be written (images.check_output)."""
    kind = images.output_kind(args.out)
    if kinds is not None and kind not in kinds:
        raise ValueError(f"{what or 'this command'} writes {' or '.join(kinds)}, not {args.out}")
    images.check_output(args.out, args.overwrite)


# -- arguments that need the model's config ------------------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know of a model: the sample shape (C, H, W), its classes (labels
    0..num_classes-1 and the null label num_classes; None without labels), T, and the conditioning it
    cannot do without (needs: a text UNet's encoder_hidden_states, which the command line cannot give)."""

    shape: tuple | None
    num_classes: int | None
    T: int | None
    needs: tuple = ()

    @classmethod
    def of_config(cls, model) -> ModelFacts | None:
        """From the config files of --model, without loading weights; None where there are none."""
        from ..checkpoint import model_facts

        d = model_facts(model)
        if d is None:
            return None
        needs = ("encoder_hidden_states",) if d.get("kind") == "UNet2DConditionModel" else ()
        return cls(d["shape"], d["num_classes"], d["T"], needs)

    @classmethod
    def of_model(cls, model) -> ModelFacts:
        """From a loaded model (this project's UNet or a diffusers UNet as it is)."""
        from ..checks import sample_shape
        from ..conditioning import cond_spec
        from ..models.diffusers_unet import adapt

        net = adapt(model)
        try:
            shape = sample_shape(net)
        except ValueError:
            shape = None
        spec = cond_spec(net) or {}
        labels = spec.get("class_labels")
        schedule = getattr(model, "schedule", None)
        return cls(shape, labels["range"][1] if labels else None, getattr(schedule, "T", None),
                   tuple(k for k, s in spec.items() if s["null"] is None))


def check_with_model(args, facts: ModelFacts | None, *, steps=None, arrays=(), sampling: bool = True) -> None:
    """The arguments that need the model: steps within [1, T], --class within its labels, and each
    (what, path, array) of `arrays` (latents, images) in its sample shape. sampling: the command samples
    (a text UNet's encoder_hidden_states cannot be given on the command line)."""
    if facts is None:
        return
    if steps is not None and facts.T is not None:
        from ..schedule import timesteps

        timesteps(facts.T, steps)  # the library's own message: steps must be an int in [1, T=...]
    labels = getattr(args, "class_labels", None)
    if labels:
        n = facts.num_classes
        if n is None:
            raise ValueError(f"--class applies to a class-conditional model; {args.model} takes no class labels "
                             "(drop --class and --guidance)")
        bad = [y for y in labels if y > n]
        if bad:
            raise ValueError(f"--class {bad[0]} is not a label of {args.model}: it takes 0..{n - 1}, and {n} (the "
                             "null label: unconditional)")
    if sampling and facts.needs:
        raise ValueError(f"{args.model} needs {', '.join(facts.needs)} (a text-conditioned UNet), which the command "
                         "line cannot give: sample it from Python, e.g. dd.Engine(model, plan).sample(n, cond="
                         f"{{'{facts.needs[0]}': ...}})")
    for what, path, array in arrays:
        got = tuple(array.shape[1:])
        if facts.shape is not None and got != tuple(facts.shape):
            raise ValueError(f"{path} holds {what} of shape {got}; the model wants {tuple(facts.shape)}")
