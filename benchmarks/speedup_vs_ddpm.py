"""Wall clock of DDPM-1000 against DDIM-S: the paper's Figure 4 and its 10x-50x claim.

    python -m benchmarks.speedup_vs_ddpm                     # bundled digits + CIFAR-10 UNet
    python -m benchmarks.speedup_vs_ddpm --models digits --backends reference --quick

For each model and backend: one full DDPM ancestral chain (S = T = 1000, eta = 1) and DDIM
(eta = 0) at S = 10, 20, 50, 100 and 1000, each timed as a whole `Engine.sample` call (x_T included),
median of repeats. The goal: DDIM-S at least 0.95 x (1000 / S) times faster than DDPM-1000.
Prints a table, writes JSON and a PNG plot (time against S) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys

import torch

import ddim_fast as dd
from benchmarks.common import machine_info, result_path, table, wall_median, write_json
from ddim_fast.checks import require

STEPS = (10, 20, 50, 100, 1000)  # DDIM-1000 (eta = 0) separates the cost of steps from the cost of noise


def _model(name):
    if name == "cifar10":
        torch.manual_seed(0)
        m = dd.UNet(dd.UNetConfig.cifar10())  # random weights: speed does not depend on them
        m.schedule = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
        return m
    return dd.load_model(name)


def _engine(model, S, eta, backend, device):
    plan = dd.SamplingPlan.build(model.schedule, S, eta=eta, prediction=model.prediction)
    return dd.Engine(model, plan, backend=backend, device=device)


def _seconds(eng, batch, reps):
    return wall_median(lambda: eng.sample(batch, seed=0), reps=reps, warmup=1)


def run(models, backends, batch, steps, reps, device):
    rows, done = [], set()
    for name in models:
        model = _model(name)
        T = model.schedule.T
        for backend in backends:
            try:
                ddpm = _engine(model, T, 1.0, backend, device)
            except ValueError as e:  # an unavailable backend is reported, not hidden
                print(f"{name} / {backend}: skipped ({e})")
                continue
            if (name, ddpm.backend) in done:  # "auto" resolved to a backend already listed
                continue
            done.add((name, ddpm.backend))
            t_ddpm = _seconds(ddpm, batch, 1)
            print(f"{name} / {ddpm.backend}: DDPM-{T} {t_ddpm:.2f} s", flush=True)
            rows.append({"model": name, "backend": ddpm.backend, "sampler": f"DDPM-{T}", "steps": T,
                         "seconds": t_ddpm, "ms_per_step": 1000 * t_ddpm / T, "speedup": 1.0,
                         "target": None, "met": None})
            for S in steps:
                eng = _engine(model, S, 0.0, backend, device)
                t = _seconds(eng, batch, 1 if S >= 1000 else reps)
                target = 0.95 * T / S
                rows.append({"model": name, "backend": eng.backend, "sampler": f"DDIM-{S}", "steps": S,
                             "seconds": t, "ms_per_step": 1000 * t / S, "speedup": t_ddpm / t, "target": target,
                             "met": t_ddpm / t >= target})
                print(f"  DDIM-{S}: {t:.3f} s, {t_ddpm / t:.1f}x (target {target:.1f}x)", flush=True)
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["model"], r["backend"]) for r in rows}):
        pts = sorted((r["steps"], r["seconds"]) for r in rows if (r["model"], r["backend"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{key[0]} / {key[1]}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps S (1000 = DDPM)")
    ax.set_ylabel("seconds per batch")
    ax.set_title("Sampling time is linear in S (cf. DDIM Figure 4)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,cifar10", help="comma-separated: bundled names, paths, cifar10")
    ap.add_argument("--backends", default="auto,reference", help="comma-separated Engine backends")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="S = 10 and 20 only, one repeat")
    args = ap.parse_args(argv)
    require("matplotlib", "bench", "the plot of time against S")  # before measuring, not after
    info = machine_info()
    steps = STEPS[:2] if args.quick else STEPS
    reps = 1 if args.quick else args.reps
    backends = list(dict.fromkeys(args.backends.split(",")))
    rows = run(args.models.split(","), backends, args.batch, steps, reps, args.device)
    path = write_json(result_path("speedup-vs-ddpm", info), {"machine": info, "batch": args.batch, "rows": rows})
    png = result_path("speedup-vs-ddpm", info, ".png")
    plot(rows, png)
    print(f"\nmachine: {info['gpu'] or info['cpu']} ({info['cores']} cores), batch {args.batch}")
    print(table(rows, ["model", "backend", "sampler", "seconds", "ms_per_step", "speedup", "target", "met"]))
    print(f"\n-> {path}\n-> {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
