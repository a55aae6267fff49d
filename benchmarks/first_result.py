"""Time to the first result on a CPU, from an empty ONNX cache (issue 22).

    python -m benchmarks.first_result             # digits and the CIFAR-10 UNet, the CLI at -n 1 .. 256
    python -m benchmarks.first_result --quick     # a seconds-long smoke run on a tiny UNet (a test runs it)

Every measurement runs in a fresh process with an empty DDIM_FAST_CACHE folder:
  cold     `Engine(model, plan)` (backend auto) and its first `sample(16)`, split into import, model load,
           the network's torch export, its check against the float64 reference (whose ONNX Runtime session
           the Engine keeps), the rest of the Engine, and the sampling. Goal: Engine + sample(16) within
           5 s for digits (DDIM-20) and 15 s for the CIFAR-10 UNet (random weights, DDIM-10).
  warm     the same process, the model warm: a new steps / spacing / eta / sampler given per call
           (`eng.sample(16, plan=...)`), and a new `Engine(model, plan)`: seconds from the call until the
           first network call (sampling starts), and for the whole call. Goal: at most 1 s before sampling.
  cli      `ddim-fast sample -n N` (digits, 20 steps) with --backend auto, reference and onnxruntime, each from
           an empty cache, interleaved. Goal: auto within 1.1 x the faster of the other two.
  ratio    warm sampling calls on onnxruntime against the reference backend, interleaved, per model and
           batch (medians): the fraction behind engine.ORT_TIME_FRACTION, the auto rule's constant.
Prints a table; writes JSON (machine, load average before and after each part, versions, date) to
benchmarks/results/first-result-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOALS = {"digits": 5.0, "cifar10": 15.0}  # seconds for a cold Engine + sample(16)
WARM_GOAL_S = 1.0
CLI_SLACK = 1.1
ROOT = Path(__file__).resolve().parents[1]


# -- the child: one cold Engine, then the warm plans, in this fresh process ------------------------------------
def child(model_name: str, steps: int, batch: int) -> dict:
    t_start = time.time()
    import logging

    import ddim_fast as dd
    from ddim_fast.onnx import session as se

    t_import = time.time()
    stages = []

    class Stages(logging.Handler):
        def emit(self, record):
            stages.append((time.time(), record.getMessage()))

    logger = logging.getLogger("ddim_fast")
    logger.addHandler(Stages())
    logger.setLevel(logging.INFO)
    first = {}
    call = se.NetworkSession.__call__

    def timed_call(self, x, t, **cond):  # when sampling starts: the first network call of a measurement
        first.setdefault("t", time.time())
        return call(self, x, t, **cond)

    se.NetworkSession.__call__ = timed_call
    model = _model(model_name)
    plan = dd.SamplingPlan.for_model(model, steps)
    t_load = time.time()
    eng = dd.Engine(model, plan, device="cpu")
    t_engine = time.time()
    first.clear()
    eng.sample(batch, seed=0)
    t_sample = time.time()

    def stamp(prefix):
        return next((t for t, msg in stages if msg.startswith(prefix)), None)

    export0, check0, done = stamp("exporting the network"), stamp("checking the network"), stamp("exported the")
    cold = {"backend": eng.backend, "reason": eng.backend_reason, "t_start": t_start,
            "import_s": t_import - t_start, "load_s": t_load - t_import, "engine_s": t_engine - t_load,
            "sample_s": t_sample - t_engine, "first_result_s": t_sample - t_load,
            "export_s": check0 - export0 if export0 and check0 else None,
            "check_s": done - check0 if check0 and done else None,
            "engine_rest_s": (t_engine - t_load) - (done - export0) if export0 and done else None,
            "stages": [[round(t - t_load, 3), msg] for t, msg in stages]}
    warm = []
    news = {"steps": dict(steps=steps + 5), "spacing": dict(steps=steps, spacing="quad"),
            "eta": dict(steps=steps, eta=0.5), "sampler": dict(steps=steps, sampler="dpmpp_2m", spacing="trailing")}
    for what, kw in news.items():
        new = dd.SamplingPlan.for_model(model, **kw)
        first.clear()
        t0 = time.time()
        eng.sample(batch, seed=1, plan=new)
        warm.append({"change": f"new {what} (plan=)", "before_sampling_s": first["t"] - t0,
                     "call_s": time.time() - t0})
    first.clear()
    t0 = time.time()
    again = dd.Engine(model, dd.SamplingPlan.for_model(model, steps + 5, spacing="trailing"), device="cpu")
    again.sample(batch, seed=1)
    warm.append({"change": "new Engine(model, plan)", "before_sampling_s": first["t"] - t0,
                 "call_s": time.time() - t0})
    return {"cold": cold, "warm": warm}


def child_ratio(model_name: str, steps: int, batches: list, rounds: int) -> dict:
    """Per batch: median seconds of a warm sample(B) call on onnxruntime and on the reference backend."""
    import ddim_fast as dd

    model = _model(model_name)
    plan = dd.SamplingPlan.for_model(model, steps)
    engines = {b: dd.Engine(model, plan, backend=b, device="cpu") for b in ("onnxruntime", "reference")}
    rows = []
    for batch in batches:
        times = {b: [] for b in engines}
        for eng in engines.values():
            eng.sample(batch, seed=0)  # warm-up
        for _ in range(rounds):
            for b, eng in engines.items():
                t0 = time.perf_counter()
                eng.sample(batch, seed=0)
                times[b].append(time.perf_counter() - t0)
        med = {b: statistics.median(v) for b, v in times.items()}
        rows.append({"batch": batch, "onnxruntime_s": med["onnxruntime"], "reference_s": med["reference"],
                     "fraction": med["onnxruntime"] / med["reference"], "load_average": os.getloadavg()[0]})
    return {"model": model_name, "steps": steps, "rows": rows}


def _model(model_name):
    import torch

    import ddim_fast as dd

    if model_name == "cifar10":
        torch.manual_seed(0)
        model = dd.UNet(dd.UNetConfig.cifar10()).eval()  # random weights: the times do not depend on them
        model.schedule = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
        return model
    return dd.load_model(model_name)


# -- the parent ----------------------------------------------------------------------------------------------
def _env(cache: str) -> dict:
    env = dict(os.environ, DDIM_FAST_CACHE=cache, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DDIM_FAST_CACHE_MAX_MB", None)
    return env


def run_child(model_name: str, steps: int, batch: int) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="first-result-cache-") as cache:
        spawn = time.time()
        p = subprocess.run([sys.executable, "-m", "benchmarks.first_result", "--child", model_name, "--steps",
                            str(steps), "--batch", str(batch)], env=_env(cache), cwd=ROOT, capture_output=True,
                           text=True)
    if p.returncode != 0:
        raise SystemExit(f"the measurement of {model_name} failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["cold"]["startup_s"] = out["cold"].pop("t_start") - spawn  # the interpreter itself, before any import
    out["model"], out["steps"], out["batch"], out["load_average"] = model_name, steps, batch, load
    return out


def run_ratio(model_name: str, steps: int, batches: list, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="first-result-cache-") as cache:
        p = subprocess.run([sys.executable, "-m", "benchmarks.first_result", "--child-ratio", model_name, "--steps",
                            str(steps), "--ratio-batches", *map(str, batches), "--repeats", str(rounds)],
                           env=_env(cache), cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the ratio of {model_name} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_cli(model: str, steps: int, n: int, backend: str) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="first-result-cli-") as tmp:
        cmd = [sys.executable, "-m", "ddim_fast.cli", "sample", "--model", model, "--steps", str(steps), "-n", str(n),
               "--backend", backend, "--no-progress", "--out", str(Path(tmp) / "out.npz")]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=_env(str(Path(tmp) / "cache")), cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    line = next(x for x in p.stdout.splitlines() if ", backend " in x)
    chosen, reason = line.split(", backend ", 1)[1].split(" (", 1)
    return {"n": n, "backend": backend, "ran_on": chosen, "reason": reason.rsplit("), device", 1)[0], "s": seconds,
            "load_average": load}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny UNet, 3 steps, the CLI at -n 1")
    ap.add_argument("--models", nargs="+", default=None, help="cold/warm models (default: digits cifar10)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="the CLI's -n values (default 1 4 16 64 256)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each measurement (default 2; quick: 1)")
    ap.add_argument("--cli-repeats", type=int, default=None, help="runs of each CLI command (default: --repeats)")
    ap.add_argument("--no-cli", dest="cli", action="store_false", help="skip the CLI part")
    ap.add_argument("--no-ratio", dest="ratio", action="store_false", help="skip the ratio part")
    ap.add_argument("--ratio-batches", type=int, nargs="+", default=None,
                    help="batches of the ratio part (default 1 8 64; quick: 2)")
    ap.add_argument("--out", default=None, help="JSON path (default: results/first-result-<machine>-<date>.json)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-ratio", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch)))
        return None
    if args.child_ratio:
        print(json.dumps(child_ratio(args.child_ratio, args.steps, args.ratio_batches, args.repeats)))
        return None

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_info, result_path, write_json

    info = machine_info()
    load_before = os.getloadavg()
    repeats = args.repeats or (1 if args.quick else 2)
    tmp = tempfile.TemporaryDirectory(prefix="first-result-model-")
    if args.quick:
        import torch

        import ddim_fast as dd
        from ddim_fast.checkpoint import save_model

        torch.manual_seed(0)
        tiny = dd.UNet(dd.UNetConfig.tiny())
        tiny.schedule = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
        save_model(Path(tmp.name) / "tiny", tiny)
        models, cli_model, sizes = {str(Path(tmp.name) / "tiny"): 3}, str(Path(tmp.name) / "tiny"), args.sizes or [1]
        cli_steps = 3
    else:
        names = args.models or ["digits", "cifar10"]
        models = {m: 10 if m == "cifar10" else 20 for m in names}
        cli_model, cli_steps, sizes = "digits", 20, args.sizes or [1, 4, 16, 64, 256]
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, onnxruntime {info['onnxruntime']}; "
          f"load average {load_before[0]:.2f}", flush=True)

    cold = []
    for rep in range(repeats):
        for name, steps in models.items():
            r = run_child(name, steps, 16)
            r["repeat"] = rep
            cold.append(r)
            c = r["cold"]
            print(f"cold {Path(name).name} S={steps}: Engine {c['engine_s']:.2f} s + sample(16) {c['sample_s']:.2f} s "
                  f"= {c['first_result_s']:.2f} s (export {c['export_s'] or 0:.2f}, check {c['check_s'] or 0:.2f}; "
                  f"import {c['import_s']:.2f}, load {c['load_s']:.2f}); load {r['load_average']:.2f}", flush=True)
    load_mid = os.getloadavg()

    cli = []
    if args.cli:
        order = ["auto", "reference", "onnxruntime"]
        for n in sizes:
            for rep in range(args.cli_repeats or repeats):
                for backend in order[rep % 3:] + order[: rep % 3]:  # interleaved, the order rotated per repeat
                    r = run_cli(cli_model, cli_steps, n, backend)
                    r["repeat"] = rep
                    cli.append(r)
                    print(f"cli -n {n:<4} --backend {backend:<12} {r['s']:6.2f} s (ran on {r['ran_on']}); "
                          f"load {r['load_average']:.2f}", flush=True)
    load_after_cli = os.getloadavg()

    ratio = []
    if args.ratio:
        batches = args.ratio_batches or ([2] if args.quick else [1, 8, 64])
        for name in models:
            r = run_ratio(name, 2 if args.quick else 5, batches, 1 if args.quick else 3)
            ratio.append(r)
            for row in r["rows"]:
                print(f"ratio {Path(name).name} B={row['batch']}: onnxruntime {row['onnxruntime_s']:.3f} s, "
                      f"reference {row['reference_s']:.3f} s -> {row['fraction']:.2f}; load {row['load_average']:.2f}",
                      flush=True)
    load_after = os.getloadavg()
    tmp.cleanup()

    summary = summarize(cold, cli)
    summary["ratio"] = [dict(row, model=Path(r["model"]).name, steps=r["steps"]) for r in ratio for row in r["rows"]]
    print_tables(summary)
    record = {"benchmark": "first_result", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": info,
              "load_average": {"before": load_before, "after_cold_and_warm": load_mid, "after_cli": load_after_cli,
                               "after": load_after},
              "quick": args.quick, "repeats": repeats, "cli_repeats": args.cli_repeats or repeats,
              "cold_runs": cold, "cli_runs": cli, "summary": summary,
              "goals": {"first_result_s": GOALS, "warm_before_sampling_s": WARM_GOAL_S, "cli_slack": CLI_SLACK},
              "argv": list(sys.argv[1:] if argv is None else argv)}
    out = Path(args.out) if args.out else result_path("first-result" + ("-quick" if args.quick else ""), info)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    print(f"wrote {out}")
    return record


def summarize(cold, cli) -> dict:
    """Medians over repeats: cold per model (with the split), warm per change, CLI per (N, backend)."""
    med = statistics.median
    out = {"cold": [], "warm": [], "cli": []}
    for name in dict.fromkeys(r["model"] for r in cold):
        runs = [r for r in cold if r["model"] == name]
        keys = ("startup_s", "import_s", "load_s", "export_s", "check_s", "engine_rest_s", "engine_s", "sample_s",
                "first_result_s")
        row = {"model": Path(name).name, "steps": runs[0]["steps"], "backend": runs[0]["cold"]["backend"]}
        row.update({k: med([r["cold"][k] for r in runs if r["cold"][k] is not None] or [0.0]) for k in keys})
        row["goal_s"] = GOALS.get(row["model"])
        row["met"] = None if row["goal_s"] is None else row["first_result_s"] <= row["goal_s"]
        out["cold"].append(row)
        for change in dict.fromkeys(w["change"] for r in runs for w in r["warm"]):
            ws = [w for r in runs for w in r["warm"] if w["change"] == change]
            before = med([w["before_sampling_s"] for w in ws])
            out["warm"].append({"model": row["model"], "change": change, "before_sampling_s": before,
                                "call_s": med([w["call_s"] for w in ws]), "met": before <= WARM_GOAL_S})
    for n in dict.fromkeys(r["n"] for r in cli):
        s = {b: med([r["s"] for r in cli if r["n"] == n and r["backend"] == b]) for b in
             ("auto", "reference", "onnxruntime")}
        ran = [r["ran_on"] for r in cli if r["n"] == n and r["backend"] == "auto"]
        best = min(s["reference"], s["onnxruntime"])
        out["cli"].append({"n": n, **{f"{b}_s": v for b, v in s.items()}, "auto_ran_on": ran,
                           "auto_over_best": s["auto"] / best, "met": s["auto"] <= CLI_SLACK * best})
    return out


def print_tables(summary):
    if summary.get("ratio"):
        print("\nwarm sampling call, onnxruntime / reference (s; median)")
        for r in summary["ratio"]:
            print(f"  {r['model']:<10} S={r['steps']:<3} B={r['batch']:<4}{r['onnxruntime_s']:>9.3f}"
                  f"{r['reference_s']:>9.3f}   {r['fraction']:.2f}  (load {r['load_average']:.2f})")
    print("\ncold Engine(model, plan) + sample(16), empty cache (s; median)")
    print(f"{'model':<10}{'S':>4}{'startup':>9}{'import':>8}{'load':>7}{'export':>8}{'check':>7}{'rest':>7}"
          f"{'Engine':>8}{'sample':>8}{'total':>8}{'goal':>6}  met")
    for r in summary["cold"]:
        goal = f"{r['goal_s']:.0f}" if r["goal_s"] else "-"
        print(f"{r['model']:<10}{r['steps']:>4}{r['startup_s']:>9.2f}{r['import_s']:>8.2f}{r['load_s']:>7.2f}"
              f"{r['export_s']:>8.2f}{r['check_s']:>7.2f}{r['engine_rest_s']:>7.2f}{r['engine_s']:>8.2f}"
              f"{r['sample_s']:>8.2f}{r['first_result_s']:>8.2f}{goal:>6}  {r['met']}")
    print("\nwarm model, a new plan (s; median): before sampling starts / the whole sample(16) call")
    for r in summary["warm"]:
        print(f"  {r['model']:<10}{r['change']:<28}{r['before_sampling_s']:>8.3f}{r['call_s']:>9.2f}  {r['met']}")
    if summary["cli"]:
        print("\nddim-fast sample -n N, empty cache (s; median): auto, reference, onnxruntime")
        for r in summary["cli"]:
            print(f"  -n {r['n']:<5}{r['auto_s']:>8.2f} ({'/'.join(r['auto_ran_on'])}){r['reference_s']:>8.2f}"
                  f"{r['onnxruntime_s']:>8.2f}   auto / best {r['auto_over_best']:.2f}  {r['met']}")


if __name__ == "__main__":
    main()
