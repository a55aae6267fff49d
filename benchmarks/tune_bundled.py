"""Make the tuned plans bundled with the models (issue 23): rerunnable, printing what it does and how long it took.

    python -m benchmarks.tune_bundled                  # every bundled plan (BUNDLED below), into ddim_fast/assets/
    python -m benchmarks.tune_bundled --only digits:5  # one of them
    python -m benchmarks.tune_bundled --quick --out /tmp/plans   # seconds-long smoke run (tiny settings)

Each plan is dd.tune_plan with the library's defaults (its held-out noise, its teacher: docs/benchmarks.md
gives the measured quality), written to ddim_fast/assets/<model>/plans/<model>-unipc-<S>[-w<guidance>].json,
where SamplingPlan.for_model(model, S, tuned=True[, guidance=w]) finds it by the model's fingerprint. The
plans of one model and guidance share one teacher run (tune_plan(teacher=...)); each plan's record gives the
teacher's time and its own, so the time to tune one plan from nothing is their sum.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import ddim_fast as dd
from ddim_fast import tune
from ddim_fast.plan_files import ASSETS

# (model, guidance) -> step counts. digits-cond is tuned with the labels i % 10 and the same guidance as its teacher.
BUNDLED = {("digits", None): (4, 5, 6, 8), ("digits-cond", 1.0): (5,), ("digits-cond", 2.0): (5,)}
QUICK = dict(samples=4, held_out=4, teacher_steps=24, grid=8, iterations=3, check_every=1)


def file_name(model: str, steps: int, guidance) -> str:
    return f"{model}-unipc-{steps}" + ("" if guidance is None else f"-w{guidance:g}") + ".json"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, metavar="MODEL:S[:W]",
                    help="just these plans, e.g. digits:5 digits-cond:5:2")
    ap.add_argument("--out", default=None, help="write here instead of ddim_fast/assets/<model>/plans/")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the project's 2-core machine is shared, "
                    "and two threads under other jobs' load ran the digits UNet 2.6x slower than one)")
    ap.add_argument("--quick", action="store_true", help="tiny settings (a smoke run: the plans mean nothing)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    jobs = _jobs(args.only)
    settings = QUICK if args.quick else {}
    written = []
    for (name, w), steps in jobs.items():
        model = dd.load_model(name)
        kw = dict(samples=settings.get("samples", 64), held_out=settings.get("held_out", 64), seed=12345,
                  teacher_steps=settings.get("teacher_steps", tune.TEACHER_STEPS))
        print(f"{name}{'' if w is None else f' at guidance {w:g}'}: the teacher ({kw['teacher_steps']} UniPC steps, "
              f"{kw['samples'] + kw['held_out']} noise samples)...", flush=True)
        teacher = tune.make_teacher(model, guidance=w, **kw)
        print(f"  teacher: {teacher.seconds:.0f} s ({teacher.cpu_seconds:.0f} s of CPU)", flush=True)
        for S in steps:
            t0 = time.perf_counter()
            plan = dd.tune_plan(model, S, guidance=w, teacher=teacher, progress=args.progress, name=name,
                                **kw, **{k: v for k, v in settings.items() if k not in kw})
            rec = plan.meta["tuned"]
            folder = Path(args.out) if args.out else ASSETS / name / "plans"
            folder.mkdir(parents=True, exist_ok=True)
            path = plan.save(folder / file_name(name, S, w), model=model)
            mse = rec["held_out_mse"]
            print(f"  S={S}: held-out MSE untuned {mse['untuned']:.4g}, timesteps {mse['timesteps']:.4g}, table "
                  f"{mse.get('table', float('nan')):.4g}; kept {rec['kept'] or 'nothing'}; timesteps "
                  f"{plan.timesteps.tolist()}; {time.perf_counter() - t0:.0f} s (+ the teacher's "
                  f"{teacher.seconds:.0f} s; {rec['seconds']['cpu']:.0f} s of CPU in all) -> {path}", flush=True)
            written.append(path)
    return written


def _jobs(only):
    if not only:
        return dict(BUNDLED)
    out = {}
    for spec in only:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"--only takes MODEL:S or MODEL:S:W, got {spec!r}")
        key = (parts[0], float(parts[2]) if len(parts) == 3 else None)
        out.setdefault(key, ())
        out[key] += (int(parts[1]),)
    return out


if __name__ == "__main__":
    main()
