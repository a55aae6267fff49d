"""The quality-per-second frontier of the samplers (issue 15), on the bundled digits model.

    python -m benchmarks.quality_per_step            # every sampler x S in {5, 8, 10, 15, 20, 50}, 256 samples a cell
    python -m benchmarks.quality_per_step --quick    # a seconds-long smoke run of the harness (numbers mean nothing)

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
    args = ap.parse_args(argv)
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
