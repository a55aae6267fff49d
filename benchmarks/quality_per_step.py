"""The quality-per-second frontier of the samplers (issue 15), on the bundled digits model; with --ladder, the
tuned plans' ladder (issue 23).

    python -m benchmarks.quality_per_step            # every sampler x S in {5, 8, 10, 15, 20, 50}, 256 samples a cell
    python -m benchmarks.quality_per_step --quick    # a seconds-long smoke run of the harness (numbers mean nothing)
    python -m benchmarks.quality_per_step --ladder --n 1000 --batch 250   # the tuned plans' ladder
    python -m benchmarks.quality_per_step --ladder --quick                # its smoke run

The ladder: for S in {3, 4, 5, 6, 8}, UniPC untuned (trailing), with the searched timesteps only (stage 1 of
dd.tune_plan), and tuned (both stages, as kept), beside DDIM-50 and untuned UniPC-10. Each plan draws N samples
for two seed sets (seeds --seed and --seed + 1: noise no tuning step saw, which used seed 12345), scored by
FD-digits and by the mean squared distance to a 200-step UniPC teacher (trailing) from the same noise, with
the wall-clock time per sample on the backend. Tuned plans come from the bundle where one exists (the record
in the file gives its tuning time) and are tuned here, with the library's defaults, where none does.

For each sampler and number of steps S: N samples of the bundled model scored by FD-digits (the Frechet
distance in the digits classifier's features against the digits test split; lower is better, and FD
at small N is biased upwards, so only cells with the same N compare), and the wall-clock time per
sample of drawing them on one backend (default onnxruntime, the fastest measured on CPU), measured
side by side in one run: each cell's Engine is built and warmed up (export, first call) before its
timed call. The noise of FD is shown by repeating the rows named by --repeat with another seed set.

Prints a table, writes JSON and a PNG plot (FD-digits against seconds per sample, one line per sampler)
to benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import ddim_fast as dd
from benchmarks.common import machine_info, result_path, table, write_json
from ddim_fast.metrics import fd_digits, load_digits_classifier
from ddim_fast.plan import SAMPLERS

STEPS = (5, 8, 10, 15, 20, 50)
QUICK_STEPS = (5,)


def cell(model, clf, sampler, S, n, batch, backend, seed, spacing):
    """(FD-digits, seconds per sample, model evaluations) of one sampler at S steps."""
    plan = dd.SamplingPlan.for_model(model, S, sampler=sampler, spacing=spacing)
    eng = dd.Engine(model, plan, backend=backend)
    eng.sample(min(batch, 4), seed=seed)  # warm-up: export, session, first call
    t0 = time.perf_counter()
    imgs = torch.cat([eng.sample(min(batch, n - lo), seed=seed, first_index=lo).cpu() for lo in range(0, n, batch)])
    seconds = (time.perf_counter() - t0) / n
    return fd_digits(imgs, clf), seconds, plan.steps


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for sampler in dict.fromkeys(r["sampler"] for r in rows if r["seed"] == rows[0]["seed"]):
        pts = sorted((r["s_per_sample"], r["fd"], r["steps"]) for r in rows
                     if r["sampler"] == sampler and r["seed"] == rows[0]["seed"])
        ax.plot([p[0] * 1e3 for p in pts], [p[1] for p in pts], marker="o", label=sampler)
        for x, y, s in pts:
            ax.annotate(str(s), (x * 1e3, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall-clock ms per sample (labels: S)")
    ax.set_ylabel("FD-digits (lower is better)")
    ax.set_title("bundled digits model: quality per second")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # atomic
    return path


# -- the tuned plans' ladder (issue 23) ----------------------------------------------------------------------
LADDER_STEPS = (3, 4, 5, 6, 8)
QUICK_TUNE = dict(samples=4, held_out=4, teacher_steps=12, grid=6, iterations=2, check_every=1)


def draw(model, plan, n, batch, backend, seed, threads=None):
    """(images (n, C, H, W) in [-1, 1], seconds per sample) on one warmed-up Engine."""
    eng = dd.Engine(model, plan, backend=backend,
                    onnx_options={"threads": threads} if threads and backend == "onnxruntime" else None)
    eng.sample(min(batch, 4), seed=seed)  # warm-up: export or cached graph, session, first call
    t0 = time.perf_counter()
    imgs = torch.cat([eng.sample(min(batch, n - lo), seed=seed, first_index=lo).cpu() for lo in range(0, n, batch)])
    return imgs, (time.perf_counter() - t0) / n


def ladder_plans(model, steps, quick, log=print):
    """[(row name, S, plan, tuning seconds or None, record)] for the ladder, tuned plans from the bundle where
    one exists, else tuned here (one teacher shared by every S tuned here)."""
    from ddim_fast import tune

    out, teacher = [], None
    for S in steps:
        untuned = dd.SamplingPlan.for_model(model, S, sampler="unipc", spacing="trailing")
        try:
            tuned = None if quick else dd.SamplingPlan.for_model(model, S, tuned=True)
        except ValueError:
            tuned = None
        if tuned is None:
            settings = QUICK_TUNE if quick else {}
            if teacher is None:
                teacher = tune.make_teacher(model, **{k: v for k, v in settings.items()
                                                      if k in ("samples", "held_out", "teacher_steps")})
                log(f"  tuning teacher: {teacher.seconds:.0f} s")
            tuned = dd.tune_plan(model, S, teacher=teacher, progress=False, name="digits", **settings)
            log(f"  tuned S={S} here: {tuned.meta['tuned']['seconds']}")
        rec = tuned.meta["tuned"]
        stage1 = tune.build_like(untuned, model.schedule, rec["stage1_timesteps"])
        sec = rec["seconds"]
        out += [("untuned", S, untuned, None, None),
                ("timesteps", S, stage1, round(sec["teacher"] + sec["timesteps"], 1), rec),
                ("tuned", S, tuned, sec["total"], rec)]
    return out


class _FD:
    """FD-digits against the test split, whose statistics are computed once (fd_digits recomputes them per call)."""

    def __init__(self, clf):
        from ddim_fast.data import load_digits
        from ddim_fast.metrics import feature_statistics

        self.clf, self.stats = clf, feature_statistics
        ref, _ = load_digits(clf.config.resolution, split="test")
        with torch.no_grad():
            self.ref = feature_statistics(clf.features(ref))

    def __call__(self, images):
        from ddim_fast.metrics import frechet_distance

        with torch.no_grad():
            f = torch.cat([self.clf.features(images[i:i + 256]) for i in range(0, len(images), 256)])
        return frechet_distance(*self.stats(f), *self.ref)


def ladder(args, info, quick):
    model = dd.load_model(args.model)
    clf = load_digits_classifier().eval()
    fd_of = _FD(clf)
    seeds = (args.seed, args.seed + 1)
    steps = args.steps or ((3,) if quick else LADDER_STEPS)
    teacher_steps = 12 if quick else 200
    refs = [("ddim", 4 if quick else 50), ("unipc", 4 if quick else 10)]
    stem = result_path("quality_per_step-tuned" + ("-quick" if quick else ""), info) if args.out is None \
        else Path(args.out).with_suffix(".json")
    rows, teachers = [], {}

    def save():
        write_json(stem, {"machine": info, "backend": args.backend, "model": args.model, "n": args.n, "seeds": seeds,
                          "teacher": {"sampler": "unipc", "steps": teacher_steps, "spacing": "trailing"},
                          "argv": sys.argv[1:] if args.argv is None else args.argv, "rows": rows})

    teacher_plan = dd.SamplingPlan.for_model(model, teacher_steps, sampler="unipc", spacing="trailing")
    for seed in seeds:
        teachers[seed], sec = draw(model, teacher_plan, args.n, args.batch, args.backend, seed, args.threads)
        print(f"  teacher ({teacher_steps} steps) seed {seed}: {sec * 1e3:.1f} ms/sample", flush=True)
    plans = [(f"{s}-{S}", S, dd.SamplingPlan.for_model(model, S, sampler=s, spacing="trailing"), None, None)
             for s, S in refs] + ladder_plans(model, steps, quick)
    for name, S, plan, tuning, rec in plans:
        for seed in seeds:
            imgs, sec = draw(model, plan, args.n, args.batch, args.backend, seed, args.threads)
            mse = float(((imgs - teachers[seed]) ** 2).mean())
            fd = fd_of(imgs)
            rows.append(dict(plan=name, sampler=plan.sampler, steps=S, evaluations=plan.steps, seed=seed, n=args.n,
                             fd=round(fd, 3), mse_teacher=float(f"{mse:.4g}"), s_per_sample=sec,
                             tuning_s=tuning, timesteps=plan.timesteps.tolist(),
                             kept=None if rec is None else rec["kept"],
                             held_out_mse=None if rec is None else rec["held_out_mse"]))
            print(f"  {name:10s} S={S:3d} seed={seed}  FD-digits {fd:7.2f}  MSE {mse:.3e}  {sec * 1e3:6.2f} ms/sample",
                  flush=True)
            save()
    shown = [dict(r, ms_per_sample=round(r["s_per_sample"] * 1e3, 2)) for r in rows]
    print(table(shown, ["plan", "steps", "seed", "n", "fd", "mse_teacher", "ms_per_sample", "tuning_s"]))
    png = plot_ladder(rows, stem.with_suffix(".png"))
    print(f"wrote {stem} and {png}")
    return rows


def plot_ladder(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "fd", "FD-digits (lower is better)"),
                           (axes[1], "mse_teacher", "MSE to the 200-step teacher")):
        for name, style in (("untuned", "o--"), ("timesteps", "s-."), ("tuned", "D-")):
            pts = {}
            for r in rows:
                if r["plan"] == name:
                    pts.setdefault(r["steps"], []).append(r[key])
            xs = sorted(pts)
            ax.errorbar(xs, [sum(pts[x]) / len(pts[x]) for x in xs],
                        yerr=[[sum(pts[x]) / len(pts[x]) - min(pts[x]) for x in xs],
                              [max(pts[x]) - sum(pts[x]) / len(pts[x]) for x in xs]],
                        fmt=style, capsize=3, label={"untuned": "UniPC, trailing", "timesteps": "searched timesteps",
                                                     "tuned": "tuned (both stages)"}[name])
        refs = dict.fromkeys(r["plan"] for r in rows if r["tuning_s"] is None and r["plan"] != "untuned")
        for r0, (color, hatch) in zip(refs, (("tab:purple", "//"), ("tab:grey", "\\\\"))):
            vals = [r[key] for r in rows if r["plan"] == r0]
            ax.axhspan(min(vals), max(vals), facecolor="none", edgecolor=color, hatch=hatch, alpha=0.8,
                       label=f"{r0}: the two seed sets' range")
        ax.set_xlabel("network evaluations S")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("bundled digits model: tuned plans (mean of two seed sets, bars: both)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S=5, 16 samples, two samplers: the harness only")
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    ap.add_argument("--steps", nargs="+", type=int, default=None)
    ap.add_argument("--n", type=int, default=256, help="samples per cell")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spacing", default="trailing",
                    help="timestep spacing of every cell (trailing starts at T-1; uniform at T - T/S, where the "
                         "multistep solvers lose to DDIM at small S)")
    ap.add_argument("--repeat", nargs="*", default=["ddim:50", "unipc:10", "dpmpp_2m:10"],
                    help="cells SAMPLER:S drawn again with seed+1 (the noise level of FD)")
    ap.add_argument("--extra", nargs="*", default=[], help="more cells SAMPLER:S with --seed (e.g. ddim:50 when "
                    "--steps leaves 50 out)")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/quality_per_step-<machine>)")
    ap.add_argument("--ladder", action="store_true", help="the tuned plans' ladder (issue 23) instead of the frontier")
    ap.add_argument("--threads", type=int, default=None, help="--ladder: torch and ONNX Runtime threads")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ladder:
        warnings.simplefilter("ignore", UserWarning)
        if args.quick:
            args.n, args.batch = 8, 8
        return ladder(args, machine_info(), args.quick)
    if args.quick:
        args.samplers, args.n, args.batch = ["ddim", "unipc"], 16, 16
        args.repeat = ["unipc:5"]
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    warnings.simplefilter("ignore", UserWarning)  # the far-start / diffusers notes of some spacings

    info = machine_info()
    model = dd.load_model(args.model)
    clf = load_digits_classifier()
    rows = []
    stem = result_path("quality_per_step" + ("-quick" if args.quick else ""), info) if args.out is None \
        else Path(args.out).with_suffix(".json")

    def save():  # after every cell: a stopped run keeps what it measured
        write_json(stem, {"machine": info, "backend": args.backend, "model": args.model, "n": args.n,
                          "spacing": args.spacing, "argv": sys.argv[1:] if argv is None else argv, "rows": rows})

    # every sampler at the small S first, the repeats, then the largest S (a stopped run keeps the frontier's left)
    grid = [(s, S, args.seed) for S in steps for s in args.samplers]
    last = [c for c in grid if c[1] == max(steps) and len(steps) > 1]
    todo = [c for c in grid if c not in last] + [(s, int(S), args.seed) for s, S in (c.split(":") for c in args.extra)]
    todo += [(s, int(S), args.seed + 1) for s, S in (c.split(":") for c in args.repeat)] + last
    for sampler, S, seed in todo:
        fd, sec, evals = cell(model, clf, sampler, S, args.n, args.batch, args.backend, seed, args.spacing)
        rows.append(dict(sampler=sampler, steps=S, evaluations=evals, seed=seed, n=args.n, fd=round(fd, 3),
                         s_per_sample=sec))
        print(f"  {sampler:13s} S={S:3d} seed={seed}  FD-digits {fd:7.2f}  {sec * 1e3:7.2f} ms/sample", flush=True)
        save()

    shown = [dict(r, ms_per_sample=round(r["s_per_sample"] * 1e3, 2)) for r in rows]
    print(table(shown, ["sampler", "steps", "evaluations", "seed", "n", "fd", "ms_per_sample"]))
    png = plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem} and {png}")
    return rows


if __name__ == "__main__":
    main()
