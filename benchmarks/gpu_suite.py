"""The GPU verification suite: the GPU test tier plus the GPU timings, in one command.

    python -m benchmarks.gpu_suite            # about 6-9 minutes on an H100
    python -m benchmarks.gpu_suite --quick    # smoke run: batch 1 only, no max-autotune

It (1) runs `pytest -m gpu`, (2) times full sampling calls of the CIFAR-10 UNet (random
weights: speed does not depend on them) at batch 1, 16, 256 and S = 10, 50 for eager fp32,
eager fp16 channels_last, torch.compile (reduce-overhead, max-autotune) of the fp16 network in
the reference loop, the triton backend, the cuda_graph backend, and ONNX Runtime's CUDA EP when
onnxruntime-gpu is installed, (3) times DDPM-1000 against DDIM-50 on the fastest backend, and
(4) writes benchmarks/results/<gpu>-<date>.json and .md, printing the table last.

Times are medians of CUDA-event-timed repeats (triton.testing.do_bench) of one whole
`sample` call, x_T included. A time budget keeps the run under 10 minutes: configurations that
do not fit are recorded as skipped, never silently dropped.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import ddim_fast as dd

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_S = 540  # stop starting new timings after 9 minutes


def _device_info():
    p = torch.cuda.get_device_properties(0)
    info = {"gpu": p.name, "sm": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


def run_gpu_tests(log_path: Path) -> dict:
    """The GPU tier (tests marked gpu); returns counts and the summary line."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          capture_output=True, text=True)
    log_path.write_text(proc.stdout + proc.stderr)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or [""]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail[0])}
    return {"returncode": proc.returncode, "summary": tail[0], "counts": counts,
            "seconds": round(time.perf_counter() - t0, 1)}


def _bench(fn, n_hint_ms):
    from triton.testing import do_bench

    rep = max(200, min(3000, 5 * n_hint_ms))
    return do_bench(fn, warmup=max(25, n_hint_ms), rep=rep, return_mode="median")


class Suite:
    def __init__(self, quick: bool):
        self.quick = quick
        self.t_start = time.perf_counter()
        self.rows = []
        torch.manual_seed(0)
        self.model = dd.UNet(dd.UNetConfig.cifar10())
        self.model.schedule = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
        self.sched = self.model.schedule

    def out_of_time(self):
        return time.perf_counter() - self.t_start > BUDGET_S

    def record(self, name, batch, steps, ms, note=""):
        row = {"config": name, "batch": batch, "steps": steps, "ms": None if ms is None else round(ms, 3),
               "ms_per_image": None if ms is None else round(ms / batch, 4), "note": note}
        self.rows.append(row)
        shown = "-" if ms is None else f"{ms:9.2f} ms"
        print(f"  {name:<22} B={batch:<4} S={steps:<5} {shown} {note}", flush=True)

    def time_engine(self, name, batch, steps, *, eta=0.0, **engine_kw):
        if self.out_of_time():
            return self.record(name, batch, steps, None, "skipped: time budget")
        try:
            plan = dd.SamplingPlan.build(self.sched, steps, eta=eta)
            eng = dd.Engine(self.model, plan, device="cuda", **engine_kw)
            t0 = time.perf_counter()
            eng.sample(batch, seed=0)
            torch.cuda.synchronize()
            first = (time.perf_counter() - t0) * 1000
            eng.sample(batch, seed=1)
            torch.cuda.synchronize()
            ms = _bench(lambda: eng.sample(batch, seed=2), int((time.perf_counter() - t0) * 500))
            note = f"first call {first:.0f} ms" + (f", {eng.graph_captures} capture(s)" if eng.graph_captures else "")
            self.record(name, batch, steps, ms, note)
            return ms
        except Exception as e:  # recorded, not hidden: the table shows the failure
            self.record(name, batch, steps, None, f"FAILED: {type(e).__name__}: {str(e)[:120]}")
        finally:
            torch.cuda.empty_cache()

    def time_compiled(self, name, batch, steps, mode):
        if self.out_of_time():
            return self.record(name, batch, steps, None, "skipped: time budget")
        try:
            net = copy.deepcopy(self.model).to("cuda", torch.float16).eval()
            cnet = torch.compile(net.to(memory_format=torch.channels_last), mode=mode)
            plan = dd.SamplingPlan.build(self.sched, steps)

            def model(x, t):
                return cnet(x.half().contiguous(memory_format=torch.channels_last), t).float()

            def run():
                x_T = dd.rng.initial_noise(0, (batch, 3, 32, 32), device="cuda")
                return dd.sample(model, x_T, plan, nonfinite="ignore")

            t0 = time.perf_counter()
            with torch.no_grad():
                run()
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                run()
                torch.cuda.synchronize()
                ms = _bench(run, 50)
            self.record(name, batch, steps, ms, f"compile+first call {compile_s:.0f} s")
            return ms
        except Exception as e:
            self.record(name, batch, steps, None, f"FAILED: {type(e).__name__}: {str(e)[:120]}")
        finally:
            torch._dynamo.reset()
            torch.cuda.empty_cache()

    def run(self):
        batches = (1,) if self.quick else (1, 16, 256)
        for B in batches:
            for S in (10, 50):
                print(f"batch {B}, {S} steps", flush=True)
                self.time_engine("eager_fp32", B, S, backend="reference", dtype=torch.float32)
                self.time_engine("eager_fp16_cl", B, S, backend="reference", dtype=torch.float16, channels_last=True)
                self.time_engine("triton_fp16", B, S, backend="triton", dtype=torch.float16)
                self.time_engine("cuda_graph_fp16", B, S, backend="cuda_graph", dtype=torch.float16)
                self.time_engine("cuda_graph_fp32", B, S, backend="cuda_graph", dtype=torch.float32)
                if B <= 16:
                    self.time_compiled("compile_reduce_overhead", B, S, "reduce-overhead")
                if B == 1 and not self.quick:
                    self.time_compiled("compile_max_autotune", B, S, "max-autotune")
                ort = _ort_cuda_missing()
                if ort is None:
                    self.time_engine("ort_cuda_fp16", B, S, backend="onnxruntime", dtype=torch.float16)
                else:
                    self.record("ort_cuda_fp16", B, S, None, f"skipped: {ort}")
        print("DDPM-1000 against DDIM-50, batch 1, cuda_graph fp16", flush=True)
        self.time_engine("ddpm1000_cuda_graph", 1, 1000, eta=1.0, backend="cuda_graph", dtype=torch.float16)


def _ort_cuda_missing():
    from ddim_fast.engine import onnxruntime_status

    return onnxruntime_status(torch.device("cuda"))


def goals(rows):
    """The issue's goals at batch 1, S = 50, fp16."""
    t = {(r["config"], r["batch"], r["steps"]): r["ms"] for r in rows}
    g = t.get(("cuda_graph_fp16", 1, 50))
    out = []

    def ratio(name, base, target):
        b = t.get((base, 1, 50))
        if g and b:
            out.append({"goal": name, "measured": round(b / g, 2), "target": target, "met": b / g >= target})
        else:
            out.append({"goal": name, "measured": None, "target": target, "met": None})

    ratio("cuda_graph vs eager fp16 (channels_last)", "eager_fp16_cl", 3.0)
    ratio("cuda_graph vs torch.compile reduce-overhead", "compile_reduce_overhead", 1.5)
    ddpm = t.get(("ddpm1000_cuda_graph", 1, 1000))
    if g and ddpm:
        out.append({"goal": "DDIM-50 vs DDPM-1000 wall clock", "measured": round(ddpm / g, 2),
                    "target": round(0.95 * 1000 / 50, 2), "met": ddpm / g >= 0.95 * 1000 / 50})
    else:
        out.append({"goal": "DDIM-50 vs DDPM-1000 wall clock", "measured": None, "target": 19.0, "met": None})
    return out


def run_kernel_benchmarks() -> dict:
    """benchmarks/bench_kernels.py's measurements (bandwidth vs a device copy, attention vs SDPA)."""
    from benchmarks import bench_kernels as bk

    print("kernel benchmarks ...", flush=True)
    try:
        copy_gbs = bk.copy_bandwidth()
        rows = bk.bench_step(copy_gbs) + bk.bench_group_norm(copy_gbs) + bk.bench_attention()
        return {"copy_GBs": copy_gbs, "rows": rows}
    except Exception as e:  # recorded, not hidden
        return {"error": f"{type(e).__name__}: {e}"}


def markdown(info, tests, rows, goal_rows, kernels=None):
    lines = [f"# GPU suite: {info['gpu']} ({_dt.date.today()})", "",
             f"torch {info['torch']}, CUDA {info['cuda']}, triton {info.get('triton')}, "
             f"onnxruntime {info.get('onnxruntime')}", "",
             f"GPU tests: {tests['summary']} (exit {tests['returncode']}, {tests['seconds']} s)", "",
             "| config | batch | steps | ms / call | ms / image | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
        per = "-" if r["ms_per_image"] is None else f"{r['ms_per_image']:.3f}"
        lines.append(f"| {r['config']} | {r['batch']} | {r['steps']} | {ms} | {per} | {r['note']} |")
    lines += ["", "| goal (batch 1, S=50, fp16) | measured | target | met |", "|---|---|---|---|"]
    for g in goal_rows:
        lines.append(f"| {g['goal']} | {g['measured']} | {g['target']} | {g['met']} |")
    if kernels and "rows" in kernels:
        from benchmarks.common import table

        lines += ["", f"Kernels (device-to-device copy: {kernels['copy_GBs']:.0f} GB/s):", "",
                  table(kernels["rows"], ["kernel", "case", "ms", "baseline_ms", "speedup", "GBs", "pct_copy"])]
    elif kernels:
        lines += ["", f"Kernel benchmarks FAILED: {kernels['error']}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1 only, no max-autotune")
    ap.add_argument("--skip-tests", action="store_true", help="timings only")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default: benchmarks/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; this suite needs a GPU (the CPU tiers run with pytest)")
        return 2
    info = _device_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', info['gpu']).strip('-')}-{_dt.date.today()}"
    tests = {"summary": "skipped (--skip-tests)", "returncode": None, "counts": {}, "seconds": 0}
    if not args.skip_tests:
        print("running the GPU test tier ...", flush=True)
        tests = run_gpu_tests(out / f"{stem}-tests.log")
        print(f"  {tests['summary']}", flush=True)
    suite = Suite(args.quick)
    suite.run()
    goal_rows = goals(suite.rows)
    kernels = run_kernel_benchmarks()
    result = {"device": info, "date": str(_dt.date.today()), "tests": tests, "timings": suite.rows,
              "goals": goal_rows, "kernels": kernels, "quick": args.quick,
              "seconds": round(time.perf_counter() - suite.t_start, 1)}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = markdown(info, tests, suite.rows, goal_rows, kernels)
    (out / f"{stem}.md").write_text(md)
    print()
    print(md)
    return 0 if tests["returncode"] in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
