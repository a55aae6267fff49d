"""CPU backends side by side: per-sample latency of DDIM-S sampling with the CIFAR-10 UNet.

    python -m benchmarks.bench_cpu_backends            # CIFAR-10 UNet (random weights), S=10, batch 1 and 8
    python -m benchmarks.bench_cpu_backends --quick    # smoke run: the tiny UNet, S=3, batch 1, 2 repeats

Rows (all on the same weights, measured round-robin in one process so load drifts hit all alike):
  reference        dd.Engine(backend="reference"): eager PyTorch, the truth
  ort_eps          the exported eps-model in ONNX Runtime, the sampler loop in Python (dd.sample)
  ort_unrolled     the exported whole sampler, S unrolled copies of the network, one ORT call
  ort_loop         the exported whole sampler as one ONNX Loop, one ORT call
  engine_auto      dd.Engine(backend="auto") (on CPU: onnxruntime when installed)
  diffusers        diffusers' DDIMPipeline on a UNet2DModel holding the same weights (if installed)
Also measured at batch 1: ORT session settings (threads, spinning, parallel execution), and
for the unrolled and Loop graphs at several S (--graph-steps): build time (no validation), file
size, session creation and one sampling call, which decides UNROLL_MAX_STEPS in ddim_fast/onnx/export.py.
Latency is the median wall-clock time of a whole sampling call divided by the batch size. Prints a
table; writes benchmarks/results/cpu-backends-<host>-<date>.json with the machine and load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import ddim_fast as dd
from benchmarks.common import machine_info
from ddim_fast import onnx as dox

RESULTS = Path(__file__).resolve().parent / "results"

# google/ddpm-cifar10-32's UNet2DModel layout (its model card config.json): the official CIFAR-10 UNet.
DIFFUSERS_CIFAR10 = {
    "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
DIFFUSERS_TINY = {**DIFFUSERS_CIFAR10, "block_out_channels": [32, 64], "sample_size": 16, "layers_per_block": 1,
                  "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8}


def machine() -> dict:
    """benchmarks.common.machine_info plus what this benchmark's rows depend on."""
    info = machine_info() | {"host": socket.gethostname(), "physical_cores": dox.physical_cores(),
                             "ddim_fast": dd.__version__}
    for pkg in ("onnx", "diffusers"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = None
    return info


def build_models(quick: bool):
    """(our UNet, diffusers UNet2DModel or None): the same random weights in both when diffusers is here."""
    sched = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
    layout = DIFFUSERS_TINY if quick else DIFFUSERS_CIFAR10
    try:
        import diffusers
    except ImportError:
        diffusers = None
    if diffusers is None:
        torch.manual_seed(0)
        ours = dd.UNet(dd.UNetConfig.tiny() if quick else dd.UNetConfig.cifar10()).eval()
        ours.schedule = sched
        return ours, None
    from ddim_fast.models.convert import load_diffusers

    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**layout).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = load_diffusers(tmp).eval()  # our UNet holding diffusers' weights
    x = torch.randn(1, 3, layout["sample_size"], layout["sample_size"])
    t = torch.tensor([500])
    with torch.no_grad():
        diff = (ours(x, t) - theirs(x, t).sample).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"weight import check failed: our UNet and diffusers' differ by {diff}")
    return ours, theirs


def diffusers_runner(unet, steps):
    from diffusers import DDIMPipeline, DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=True, set_alpha_to_one=True)
    pipe = DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)

    def run(B):
        g = torch.Generator().manual_seed(0)
        return pipe(batch_size=B, generator=g, num_inference_steps=steps, eta=0.0, output_type="np").images

    return run


def time_round_robin(runners: dict, batches, repeats: int) -> tuple[dict, dict]:
    """({(name, B): [wall seconds per call]}, {(name, B): [process CPU seconds per call]}): one warm-up
    call each, then `repeats` rounds over all runners. CPU time counts every thread (and spinning)."""
    wall, cpu = {}, {}
    for B in batches:
        for name, run in runners.items():
            run(B)  # warm-up: allocator growth, ORT's first-run planning
            wall[(name, B)], cpu[(name, B)] = [], []
        for _ in range(repeats):
            for name, run in runners.items():
                c0, t0 = time.process_time(), time.perf_counter()
                run(B)
                wall[(name, B)].append(time.perf_counter() - t0)
                cpu[(name, B)].append(time.process_time() - c0)
    return wall, cpu


def say(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def graph_scaling(model, steps_list, start, threads=None) -> list:
    """Unrolled vs Loop at each S: build (export_onnx without validation), file size, session, run."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in steps_list:
            plan = dd.SamplingPlan.build(model.schedule, steps, eta=0.0)
            for unroll in (True, False):
                say(f"graph scaling: S={steps} {'unrolled' if unroll else 'loop'}")
                path = Path(tmp) / f"s{steps}-{unroll}.onnx"
                t0 = time.perf_counter()
                dox.export_onnx(model, path, plan, validate=False, unroll=unroll)
                t1 = time.perf_counter()
                runner = dox.OrtRunner(path, threads=threads)
                t2 = time.perf_counter()
                runner(x_T=start(1))  # first run: ORT's allocation planning
                t3 = time.perf_counter()
                runner(x_T=start(1))
                t4 = time.perf_counter()
                rows.append({"steps": steps, "graph": "unrolled" if unroll else "loop", "build_s": t1 - t0,
                             "file_mib": path.stat().st_size / 2**20, "session_s": t2 - t1,
                             "first_run_ms": 1e3 * (t3 - t2), "run_ms": 1e3 * (t4 - t3)})
                del runner
                path.unlink()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny UNet, S=3, batch 1, 2 repeats")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps S (default 10; quick: 3)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8; quick: 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; quick: 2)")
    ap.add_argument("--graph-steps", type=int, nargs="*", default=None,
                    help="S values for the unrolled-vs-Loop build/session measurement (default 10 50; quick: 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads of torch and ORT (default: one per physical core). --threads 1 makes "
                    "the CPU-time column a load-robust comparison on a shared machine. NOTE: on a busy 2-core "
                    "machine 2 torch threads made eager PyTorch up to ~50x slower than 1 (OpenMP waits)")
    ap.add_argument("--cache", default=None, help="ONNX cache folder to reuse (default: a fresh one, so the "
                    "export times are cold)")
    ap.add_argument("--out", default=None, help="JSON path (default: results/cpu-backends-<host>-<date>.json)")
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    batches = args.batches or ([1] if args.quick else [1, 8])
    repeats = args.repeats or (2 if args.quick else 3)
    graph_steps = args.graph_steps if args.graph_steps is not None else ([3] if args.quick else [10, 50])
    saved_env = {k: os.environ.get(k) for k in ("DDIM_FAST_CACHE", "DDIM_FAST_ORT_THREADS")}
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["DDIM_FAST_ORT_THREADS"] = str(args.threads)  # the Engine's sessions
    load_start = os.getloadavg()
    info = machine()
    print(f"# {info['cpu']}, {info['physical_cores']} cores, torch {info['torch']}, ort {info['onnxruntime']}, "
          f"diffusers {info['diffusers']}; load average {load_start[0]:.2f}", flush=True)

    ours, theirs = build_models(args.quick)
    plan = dd.SamplingPlan.build(ours.schedule, steps, eta=0.0)
    shape = (ours.config.in_channels, ours.config.resolution, ours.config.resolution)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DDIM_FAST_CACHE"] = args.cache or cache  # default cold: the export times below are real
        setup = {"cache": "given" if args.cache else "cold"}
        say("exporting the eps-model and the two sampler graphs (validated against float64)")
        t0 = time.perf_counter()
        eps_path = dox.export_cached(ours)
        setup["export_eps_s"] = time.perf_counter() - t0
        paths = {}
        for unroll in (True, False):
            t0 = time.perf_counter()
            paths[unroll] = dox.export_cached(ours, plan, unroll=unroll)
            setup[f"export_{'unrolled' if unroll else 'loop'}_s"] = time.perf_counter() - t0
        sessions = {}
        for label, path in (("eps", eps_path), ("unrolled", paths[True]), ("loop", paths[False])):
            t0 = time.perf_counter()
            sessions[label] = dox.OrtRunner(path, threads=args.threads)
            setup[f"session_{label}_s"] = time.perf_counter() - t0
            setup[f"file_{label}_mib"] = path.stat().st_size / 2**20
        t0 = time.perf_counter()
        auto = dd.Engine(ours, plan, backend="auto", device="cpu")
        setup["engine_auto_s"] = time.perf_counter() - t0
        setup["engine_auto_backend"] = auto.backend
        ref = dd.Engine(ours, plan, backend="reference", device="cpu")

        def start(B):
            return dd.rng.initial_noise(0, (B, *shape))

        eps_model = lambda x, t: sessions["eps"](x=x, t=t)
        runners = {
            "reference": lambda B: ref.sample(B, seed=0),
            "ort_eps": lambda B: dd.sample(eps_model, start(B), plan).clamp(-1, 1),
            "ort_unrolled": lambda B: sessions["unrolled"](x_T=start(B)).clamp(-1, 1),
            "ort_loop": lambda B: sessions["loop"](x_T=start(B)).clamp(-1, 1),
            "engine_auto": lambda B: auto.sample(B, seed=0),
        }
        if theirs is not None:
            runners["diffusers"] = diffusers_runner(theirs, steps)
        say(f"timing {', '.join(runners)} at B={batches}, {repeats} rounds")
        times, cpu_times = time_round_robin(runners, batches, repeats)

        # ORT session settings, whole sampler (unrolled), batch 1.
        cores = dox.physical_cores()
        variants = {f"threads={cores} spinning": dox.session_options(cores, spinning=True),
                    f"threads={cores} no spinning": dox.session_options(cores, spinning=False),
                    f"threads={cores} parallel": dox.session_options(cores, parallel=True),
                    "threads=1": dox.session_options(1)}
        opt_runners = {}
        for label, so in variants.items():
            runner = dox.OrtRunner(paths[True], options=so)
            opt_runners[label] = lambda B, r=runner: r(x_T=start(B))
        say("timing ORT session settings")
        opt_times, _ = time_round_robin(opt_runners, [1], repeats)
        graph_rows = graph_scaling(ours, graph_steps, start, args.threads)

    for k, v in saved_env.items():  # `ddim-fast bench` runs this in the caller's process
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    load_end = os.getloadavg()
    rows = []
    for (name, B), ts in times.items():
        cs = cpu_times[(name, B)]
        rows.append({"backend": name, "batch": B, "median_ms_per_sample": 1e3 * statistics.median(ts) / B,
                     "min_ms_per_sample": 1e3 * min(ts) / B, "cpu_ms_per_sample": 1e3 * statistics.median(cs) / B,
                     "runs_s": ts, "cpu_runs_s": cs})
    opt_rows = [{"settings": name, "median_ms_per_sample": 1e3 * statistics.median(ts), "runs_s": ts}
                for (name, _), ts in opt_times.items()]
    med = {(r["backend"], r["batch"]): r["median_ms_per_sample"] for r in rows}
    cpu_med = {(r["backend"], r["batch"]): r["cpu_ms_per_sample"] for r in rows}
    has_ratio = ("diffusers", 1) in med
    ratio = med[("diffusers", 1)] / med[("engine_auto", 1)] if has_ratio else None
    cpu_ratio = cpu_med[("diffusers", 1)] / cpu_med[("engine_auto", 1)] if has_ratio else None

    best = {(r["backend"], r["batch"]): r["min_ms_per_sample"] for r in rows}
    print(f"\nper-sample latency (ms), S={steps}, {'tiny' if args.quick else 'CIFAR-10'} UNet, "
          f"wall median (min) [CPU time median] of {repeats}")
    print(f"{'backend':<14}" + "".join(f"{'B=' + str(B):>30}" for B in batches))
    for name in runners:
        print(f"{name:<14}" + "".join(f"{med[(name, B)]:>11.1f} ({best[(name, B)]:>7.1f}) [{cpu_med[(name, B)]:>7.1f}]"
                                      for B in batches))
    print("\nORT settings (whole sampler, unrolled, B=1)")
    for r in opt_rows:
        print(f"{r['settings']:<28}{r['median_ms_per_sample']:>10.1f} ms")
    print("\nunrolled vs Loop (B=1): S, graph, build s, file MiB, session s, run ms")
    for r in graph_rows:
        print(f"  S={r['steps']:<4} {r['graph']:<9} {r['build_s']:>7.2f} {r['file_mib']:>8.1f} {r['session_s']:>8.2f}"
              f" {r['run_ms']:>9.1f}")
    print("\nsetup: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in setup.items()))
    if ratio is not None:
        print(f"\nEngine(auto) [{auto.backend}] vs diffusers DDIMPipeline at batch 1: {ratio:.2f}x wall-clock, "
              f"{cpu_ratio:.2f}x CPU time (goal >= 1.5x)")
    print(f"load average: start {load_start[0]:.2f}, end {load_end[0]:.2f} (shared machine: noisy numbers)")

    date = datetime.date.today().isoformat()
    name = f"cpu-backends-{socket.gethostname()}-{date}{'-quick' if args.quick else ''}.json"
    out = Path(args.out) if args.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "cpu_backends", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": info, "load_average": {"start": load_start, "end": load_end},
        "model": "tiny" if args.quick else "cifar10", "steps": steps, "batches": batches, "repeats": repeats,
        "plan": plan.describe(), "rows": rows, "ort_settings": opt_rows, "graphs": graph_rows, "setup": setup,
        "engine_auto_vs_diffusers_b1": ratio, "engine_auto_vs_diffusers_b1_cpu_time": cpu_ratio,
        "threads": args.threads, "argv": list(sys.argv[1:] if argv is None else argv),
    }
    from ddim_fast.files import atomic_write_json

    atomic_write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
