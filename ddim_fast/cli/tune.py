"""`ddim-fast tune`: fit a plan's timesteps and table to a model (ddim_fast.tune) and save it as a plan file,
which `ddim-fast sample --plan FILE` (and decode, interpolate, export) then use."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..tune import TEACHER_STEPS, TUNABLE, tune_plan
from .common import add_guidance_options, load, params


class Tune:
    """`ddim-fast tune --model M --steps S --out plan.json`: a tuned plan, with a progress bar and the time left."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--model", default="digits", help="checkpoint folder, training run folder, official ckpt.pth, "
                       "diffusers folder or bundled name")
        p.add_argument("--steps", type=int, default=5, help="sampling steps S of the plan")
        p.add_argument("--sampler", default="unipc", choices=TUNABLE, help="the deterministic sampler to tune")
        p.add_argument("--order", type=int, default=None, help="multistep order (default: the sampler's)")
        p.add_argument("--out", required=True, help="the plan file to write (.json)")
        add_guidance_options(p)
        p.add_argument("--samples", type=int, default=64, help="training noise: teacher runs the fit sees")
        p.add_argument("--held-out", type=int, default=64, help="held-out noise: decides what is kept, and when "
                       "the table fit stops")
        p.add_argument("--seed", type=int, default=12345, help="the noise's seed (rows of rng.initial_noise)")
        p.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS, help="the teacher's UniPC steps")
        p.add_argument("--grid", type=int, default=40, help="candidate timesteps of the search")
        p.add_argument("--stages", type=int, default=2, choices=(1, 2), help="1: timesteps only; 2: and the table")
        p.add_argument("--iterations", type=int, default=60, help="the most iterations of the table fit")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing file")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    @staticmethod
    def run(args) -> int:
        out = check_out(args.out, args.overwrite)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        model = load(args)
        cond = tune_cond(args)
        print(f"tuning a {args.steps}-step {args.sampler} plan for {args.model} ({params(model)}): a "
              f"{args.teacher_steps}-step teacher on {args.samples} + {args.held_out} noise samples, "
              f"{'timesteps and table' if args.stages == 2 else 'timesteps only'}")
        t0 = time.perf_counter()
        plan = tune_plan(model, args.steps, sampler=args.sampler, order=args.order, cond=cond, guidance=args.guidance,
                         samples=args.samples, held_out=args.held_out, seed=args.seed,
                         teacher_steps=args.teacher_steps, grid=args.grid, stages=args.stages,
                         iterations=args.iterations, progress=args.progress, name=str(args.model))
        plan.save(out, model=model)
        print(summary(plan.meta["tuned"], time.perf_counter() - t0, out))
        return 0


def check_out(out, overwrite) -> Path:
    """The output path, checked before any work: a .json file that may be written."""
    out = Path(out)
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out must name a .json plan file, got {out}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write {out}: {parent} is not a writable folder; choose another --out")
    return out


def tune_cond(args) -> dict | None:
    """--class labels cycled over the noise rows (training, then held out), or None (with --guidance alone
    the tuner gives a class-conditional model the labels i % num_classes)."""
    if args.class_labels is None:
        return None
    n = args.samples + args.held_out
    y = torch.tensor(args.class_labels, dtype=torch.long)[torch.arange(n) % len(args.class_labels)]
    return {"class_labels": y}


def summary(rec: dict, seconds: float, out) -> str:
    """What the tuner found, in a few lines."""
    mse = rec["held_out_mse"]
    stages = [("untuned", "untuned"), ("timesteps", "timestep search"), ("table", "table calibration")]
    shown = ", ".join(f"{label} {mse[k]:.3g}{' (kept)' if k in rec['kept'] else ''}" for k, label in stages if k in mse)
    lines = [f"held-out MSE to the teacher: {shown}",
             f"timesteps {rec['stage1_timesteps'] if 'timesteps' in rec['kept'] else 'unchanged'}",
             f"tuned in {seconds:.0f} s -> {out}"]
    if rec.get("fit") and rec["fit"].get("overfit"):
        lines.insert(1, "the table fit overfitted (held-out distance rose while the training one fell): its best "
                        "held-out point was kept")
    return "\n".join(lines)
