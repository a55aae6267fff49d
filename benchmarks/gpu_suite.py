"""The GPU suite: the GPU test tier, backend timings and kernel benchmarks under one wall-clock
budget, from a bare source checkout (no install, no network).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m benchmarks.gpu_suite --budget 540 --out DIR
    python3 -m benchmarks.gpu_suite --quick --out DIR        # the goal rows only; budget 270 s
    python3 -m benchmarks.gpu_suite --dry-run --quick --out DIR   # on a CPU: checks the harness

What runs, most important first, each part inside what is left of the budget:
  1. the environment (GPU, versions, TF32 and cuDNN state), printed and written at once;
  2. the GPU test tier (`pytest -m gpu`) in a subprocess with a timeout, its output streamed;
  3. sampling timings at batch 1 and S = 50 (the goals) and DDPM-1000 against DDIM-50;
  4. the kernel benchmarks (benchmarks/bench_kernels.py's cases);
  5. (full run) batch 16 and 256, S = 10, torch.compile at batch 16, max-autotune last.
A row whose cost, estimated from what was measured so far, does not fit in what is left is
recorded as skipped with that estimate. Each row is written to DIR as soon as it is measured
(JSON and Markdown, each rewritten atomically), so a kill keeps everything before it; a watchdog
writes the files and exits at the budget if a row overruns its estimate. DIR gets 3 files:
<stem>.json, <stem>.md and <stem>-tests.log.

The rows (the CIFAR-10 UNet, 35.7M parameters, random weights: speed does not depend on them):
  user_fp32, user_fp16_cl  the loop a user writes (diffusers-style): one network call and the
                           DDIM update per step, no host sync; the honest eager baseline.
  reference_fp16_cl        ddim_fast.sample, the reference loop: the same plus its per-step
                           NaN check (torch.isfinite(x).all(), a host sync per step).
  triton_fp16              Engine(backend="triton"): fused kernels, eager launches.
  cuda_graph_fp16 / _fp32  Engine(backend="cuda_graph"): the whole loop as one CUDA graph.
  compile_reduce_overhead  torch.compile(mode="reduce-overhead") of the fp16 channels_last
  compile_max_autotune     network in the user's loop (mode="max-autotune" last, full run only);
                           each in a subprocess killed at its share of the budget.
  ddpm1000_cuda_graph      DDPM (eta = 1, S = T = 1000) on cuda_graph fp16 at batch 1.
  ort_cuda_fp16            ONNX Runtime's CUDA EP, when onnxruntime-gpu is installed.
fp16 means an fp16 network with the fp32 state; _cl channels_last. Every speedup is against the
user's loop. cuDNN's algorithm search (cudnn.benchmark) is on for every row; TF32 is left as torch
sets it and is stated per row. A time is the median over calls of one whole sampling call at a
fixed batch (x_T drawn on the device included), each call timed with CUDA events and followed by
a synchronize; the first call (compilation, capture, cuDNN search) and one warm-up call come before.

The dry run (--dry-run) fakes CUDA on a CPU to test this harness, not speed: tensors stay on the
CPU, Triton kernels run in the interpreter, graph capture becomes replay of the captured body,
torch.compile is the identity, CUDA-event and do_bench timings are wall-clock, and the model is
the analytic Gaussian denoiser at 3x8x8 with T = 20, S in (2, 3), batch 1-2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path

from benchmarks import fake_cuda
from benchmarks.gpu_harness import (
    FINAL_RESERVE_S,
    KERNEL_RESERVE_S,
    REPS,
    ROW_PREFIX,
    TESTS_SHARE,
    TIMING_S,
    Budget,
    Results,
    Suite,
    run_tests,
    start_watchdog,
)
from benchmarks.gpu_rows import Context, Row, environment, markdown, measure, precision_flags

# The rooms: this file is the command (arguments, the order of the parts, the child-process mode);
# gpu_harness.py the budget, scheduler, watchdog, files and subprocesses; gpu_rows.py the rows, their
# loops and the report; fake_cuda.py the dry run's fakes.
DEFAULT_BUDGET_S = {"full": 540, "quick": 270}


# -- entry points ----------------------------------------------------------------------------------------
def child_main(args) -> int:
    """One compile row (--child-row JSON): measured here, printed as one ROW_PREFIX line."""
    if args.dry_run:
        fake_cuda.install()
    import torch

    torch.backends.cudnn.benchmark = True  # as in the parent
    row = Row(**json.loads(args.child_row))
    budget = Budget(args.budget)
    size = "dry" if args.dry_run else "full"
    try:
        got = measure(row, Context(args.dry_run), lambda: budget.left() - 2, TIMING_S[size], REPS[size])
        got.update(precision_flags())
    except Exception as e:
        got = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(ROW_PREFIX + json.dumps(got), flush=True)
    return 0


def machine_stem(env: dict, dry: bool, date: str) -> str:
    name = "dry-run" if dry else re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower()[:40]
    return f"gpu-suite-{name}-{date}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--budget", type=float, help="wall-clock seconds for everything (default 540; 270 with --quick)")
    ap.add_argument("--out", help="folder for the results (3 files; required)")
    ap.add_argument("--quick", action="store_true", help="the goal rows and the kernels only")
    ap.add_argument("--skip-tests", action="store_true", help="no test tier")
    ap.add_argument("--tests", nargs="+",
                    help="test paths for the tier (default: tests; dry run: tests/backends/test_backend_cuda_graph.py)")
    ap.add_argument("--dry-run", action="store_true", help="on a CPU, CUDA faked: checks the harness, not speed")
    ap.add_argument("--child-row", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_row:
        return child_main(args)
    if not args.out:
        ap.error("--out DIR is required: the folder the 3 result files go to")
    budget = Budget(args.budget or DEFAULT_BUDGET_S["quick" if args.quick else "full"])
    if args.dry_run:
        fake_cuda.install()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; this suite needs a GPU (or --dry-run to check the harness on a CPU)")
        return 2
    _triton_cache()
    torch.backends.cudnn.benchmark = True  # every row gets cuDNN's algorithm search, the baselines too
    env = environment(args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = str(_dt.date.today())
    suite_info = {"budget_s": budget.seconds, "quick": args.quick, "dry_run": args.dry_run, "date": date,
                  "started": _dt.datetime.now().isoformat(timespec="seconds"), "elapsed_s": 0.0, "finished": False,
                  "stopped_by": None, "goal_steps": 3 if args.dry_run else 50,
                  "ddpm_steps": 20 if args.dry_run else 1000,
                  "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.gpu_suite",
                                       *(argv if argv is not None else sys.argv[1:])])}
    results = Results(out, machine_stem(env, args.dry_run, date),
                      {"suite": suite_info, "environment": env, "tests": None, "timings": [], "kernels": []})
    print("gpu_suite environment:", flush=True)
    for k, v in env.items():
        print(f"  {k:<26} {v}", flush=True)
    print(f"  {'budget':<26} {budget.seconds:.0f} s ({'quick' if args.quick else 'full'}"
          f"{', dry run' if args.dry_run else ''}); results in {out}/{results.stem}.{{json,md}}", flush=True)
    results.write()
    suite_ref = []
    watchdog = start_watchdog(results, suite_ref, budget)
    if not args.skip_tests:
        size = "dry" if args.dry_run else ("quick" if args.quick else "full")
        cap = min(TESTS_SHARE * budget.seconds, budget.left() - FINAL_RESERVE_S - KERNEL_RESERVE_S[size])
        print(f"\nGPU test tier (at most {cap:.0f} s) ...", flush=True)
        paths = args.tests or (["tests/backends/test_backend_cuda_graph.py"] if args.dry_run else ["tests"])
        tests = run_tests(paths, max(cap, 1.0), results.log_path)
        print(f"  -> {tests['summary']}", flush=True)
        results.update(tests=tests)
    suite = Suite(args, results, budget)
    suite_ref.append(suite)
    suite.run()
    watchdog.cancel()
    results.update(suite=dict(results.data["suite"], elapsed_s=round(budget.elapsed(), 1), finished=True))
    print("\n" + markdown(results.data), flush=True)
    print(f"wrote {results.json_path}, {results.md_path.name}" + ("" if args.skip_tests else
                                                                f", {results.log_path.name}"), flush=True)
    tests = results.data["tests"]
    return 0 if tests is None or tests["returncode"] in (0, 5) else 1


def _triton_cache():
    """Triton compiles into ~/.triton; on a machine whose home is not writable use a temp folder."""
    home = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".gpu_suite_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError:
        import tempfile

        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")


if __name__ == "__main__":
    sys.exit(main())
