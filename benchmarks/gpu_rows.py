"""The GPU suite's rows and report: what is measured (the rows, the device and model they run on, the
loops they time, one row's measurement, the machine's settings) and how it is reported (the goals
and the Markdown). The budget, the scheduling and the files are benchmarks/gpu_harness.py.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass


# -- what to run -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One timing: `kind` is user | reference | engine | compile."""

    config: str
    batch: int
    steps: int
    kind: str
    dtype: str = "fp16"
    channels_last: bool = False
    backend: str | None = None  # engine rows
    mode: str | None = None  # compile rows
    eta: float = 0.0

    @property
    def family(self):
        """Rows of one family have the same time per step and sample."""
        return (self.kind, self.backend, self.mode, self.dtype, self.channels_last)

    @property
    def cost_key(self):
        """Rows with one key share a first-call cost estimate."""
        if self.kind == "compile":
            return f"compile:{self.mode}"
        return self.backend if self.kind == "engine" else self.kind


def _rows_at(B, S):
    return [
        Row("user_fp16_cl", B, S, "user", "fp16", True),
        Row("cuda_graph_fp16", B, S, "engine", "fp16", backend="cuda_graph"),
        Row("reference_fp16_cl", B, S, "reference", "fp16", True),
        Row("user_fp32", B, S, "user", "fp32"),
        Row("cuda_graph_fp32", B, S, "engine", "fp32", backend="cuda_graph"),
        Row("triton_fp16", B, S, "engine", "fp16", backend="triton"),
    ]


def plan_rows(quick: bool, dry: bool, ddpm_steps: int):
    """(goal rows, rows after the kernel benchmarks): what matters most first."""
    steps = (2, 3) if dry else (10, 50)
    batches = (1, 2) if dry else (1, 16, 256)
    S = steps[-1]  # the goals' step count
    core = _rows_at(1, S) + [
        Row("ddpm1000_cuda_graph", 1, ddpm_steps, "engine", "fp16", backend="cuda_graph", eta=1.0),
        Row("ort_cuda_fp16", 1, S, "engine", "fp16", backend="onnxruntime"),
        Row("compile_reduce_overhead", 1, S, "compile", "fp16", True, mode="reduce-overhead"),
    ]
    if quick:
        return core, []
    later = _rows_at(1, steps[0])
    for B in batches[1:]:
        for s in steps:
            later += _rows_at(B, s)
    later.append(Row("compile_reduce_overhead", batches[1], S, "compile", "fp16", True, mode="reduce-overhead"))
    later.append(Row("compile_max_autotune", 1, S, "compile", "fp16", True, mode="max-autotune"))
    return core, later


# -- the machine: versions and the settings that change results or speed ------------------------------
def _flag(read):
    try:
        return read()
    except Exception as e:  # newer torch may refuse a legacy flag once the new API was used
        return f"unreadable: {type(e).__name__}"


def precision_flags() -> dict:
    """The settings that change fp32 results or speed: TF32 (cuDNN convolutions, cuBLAS matmuls)
    and cuDNN's algorithm search / determinism."""
    import torch

    b = torch.backends
    return {"tf32_conv": _flag(lambda: b.cudnn.allow_tf32), "tf32_matmul": _flag(lambda: b.cuda.matmul.allow_tf32),
            "cudnn_benchmark": _flag(lambda: b.cudnn.benchmark),
            "cudnn_deterministic": _flag(lambda: b.cudnn.deterministic)}


def environment(dry: bool) -> dict:
    import numpy
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "numpy": numpy.__version__, "host": platform.node(), "cpus": os.cpu_count(),
           "cudnn": _flag(torch.backends.cudnn.version), "cudnn_enabled": _flag(lambda: torch.backends.cudnn.enabled),
           "float32_matmul_precision": _flag(torch.get_float32_matmul_precision)}
    env.update(precision_flags())
    if dry:
        env.update(gpu="dry run: CPU, CUDA faked", sm=None, multiprocessors=None, memory_gib=None, driver=None)
    else:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), driver=_driver())
    for name in ("triton", "onnxruntime", "pytest"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if env["onnxruntime"]:
        import onnxruntime

        env["ort_providers"] = onnxruntime.get_available_providers()
    env["pytest_timeout"] = importlib.util.find_spec("pytest_timeout") is not None
    return env


def _driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- measuring a row -----------------------------------------------------------------------------------
class Context:
    """The device, the model, the timer, and the dry run's fakes."""

    def __init__(self, dry: bool):
        import torch

        import ddim_fast as dd

        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        if dry:
            from ddim_fast.models.analytic import GaussianEps

            self.schedule = dd.NoiseSchedule.linear(20, 1e-3, 0.2)
            self.model = GaussianEps(self.schedule)
            self.shape = (3, 8, 8)
        else:
            torch.manual_seed(0)
            self.model = dd.UNet(dd.UNetConfig.cifar10())
            self.schedule = self.model.schedule = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
            self.shape = (3, 32, 32)
        self.plans = {}

    def plan(self, steps, eta):
        import ddim_fast as dd

        key = (steps, eta)
        if key not in self.plans:
            self.plans[key] = dd.SamplingPlan.build(self.schedule, steps, eta=eta)
        return self.plans[key]

    def sync(self):
        import torch

        if not self.dry:
            torch.cuda.synchronize()

    def call_s(self, fn) -> float:
        """Wall-clock seconds of one call, synchronized."""
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def median_ms(self, fn, n: int) -> float:
        """Median of n calls, each timed with CUDA events (wall clock in the dry run) and synchronized."""
        import torch

        times = []
        for _ in range(n):
            if self.dry:
                times.append(self.call_s(fn) * 1e3)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def network(self, dtype, channels_last):
        import copy

        import torch

        net = copy.deepcopy(self.model).to(self.device, dtype).eval().requires_grad_(False)
        return net.to(memory_format=torch.channels_last) if channels_last else net

    def cleanup(self):
        import torch

        gc.collect()
        if not self.dry:
            torch.cuda.empty_cache()


def user_loop(net, plan, shape, dtype, channels_last, device):
    """The loop a user writes (diffusers-style): x_T on the device, then per step one network call
    and the update (ddim_fast.sampling.step), no host sync anywhere. Returns x_0 (B, C, H, W)."""
    import torch

    from ddim_fast.sampling import step

    coef, ts = plan.coef.to(device, torch.float32), plan.timesteps.to(device)
    x = torch.randn(shape, device=device)
    for i in range(plan.steps):
        h = x.to(dtype)
        m = net(h.contiguous(memory_format=torch.channels_last) if channels_last else h, ts[i].expand(shape[0]))
        z = torch.randn(shape, device=device) if plan.needs_noise else None
        x, _ = step(x, m.float(), coef[i], plan, z)
    return x


def reference_loop(net, plan, shape, dtype, channels_last, device):
    """ddim_fast.sample (the reference sampler, its per-step NaN check included) on the same network."""
    import torch

    import ddim_fast as dd

    def model(x, t):
        h = x.to(dtype)
        return net(h.contiguous(memory_format=torch.channels_last) if channels_last else h, t).float()

    return dd.sample(model, torch.randn(shape, device=device), plan)


def make_call(row: Row, ctx: Context):
    """The callable one timed call runs, built (not yet called) for `row`."""
    import functools

    import torch

    import ddim_fast as dd
    from ddim_fast.precision import DTYPES

    dtype = DTYPES[row.dtype]
    plan = ctx.plan(row.steps, row.eta)
    shape = (row.batch, *ctx.shape)
    if row.kind == "engine":
        eng = dd.Engine(ctx.model, plan, backend=row.backend, device=ctx.device, dtype=dtype,
                        channels_last=row.channels_last, shape=ctx.shape)
        call = functools.partial(eng.sample, row.batch, seed=0)
        call.engine = eng
        return call
    net = ctx.network(dtype, row.channels_last)
    if row.kind == "compile":
        net = torch.compile(net, mode=row.mode)
    loop = reference_loop if row.kind == "reference" else user_loop
    return torch.no_grad()(functools.partial(loop, net, plan, shape, dtype, row.channels_last, ctx.device))


def measure(row: Row, ctx: Context, seconds_left, timing_s: float, reps: tuple) -> dict:
    """First call, one warm-up call, then as many timed calls as fit (at least reps[0])."""
    out = {}
    call = make_call(row, ctx)
    first = ctx.call_s(call)
    second = ctx.call_s(call)  # the warm-up: one call, whatever the first one cost
    window = min(max(timing_s, reps[0] * second), seconds_left() - second)  # the fewest reps if they fit
    n = reps_that_fit(second, window, *reps)
    ms = ctx.median_ms(call, n) if n else second * 1e3
    eng = getattr(call, "engine", None)
    if eng is not None and eng.graph_captures:
        out["captures"] = eng.graph_captures
    out.update(ms=ms, first_call_s=first, call_s=second, calls=n or 1,
               note="" if n else "budget: only the warm-up call was timed (wall clock)")
    return out


def reps_that_fit(call_s: float, seconds: float, fewest: int, most: int) -> int:
    """How many timed calls fit in `seconds` (0 when not even `fewest` do), at most `most`."""
    n = int(seconds / max(call_s, 1e-9))
    return 0 if n < fewest else min(n, most)


# -- goals and the report ------------------------------------------------------------------------------
def goals(rows, steps=50, ddpm_steps=1000):
    """The goals at batch 1 and `steps`: ratios of medians, each against the honest baseline."""
    t = {(r["config"], r["batch"], r["steps"]): r["ms"] for r in rows if r.get("ms") is not None}
    out = []

    def ratio(goal, slower, faster, target, slower_steps=steps):
        a, b = t.get((slower, 1, slower_steps)), t.get((faster, 1, steps))
        measured = round(a / b, 2) if a and b else None
        met = None if measured is None or target is None else measured >= target
        out.append({"goal": goal, "measured": measured, "target": target, "met": met})

    ratio("cuda_graph fp16 vs the user's eager loop fp16 channels_last", "user_fp16_cl", "cuda_graph_fp16", 3.0)
    ratio("cuda_graph fp16 vs torch.compile reduce-overhead", "compile_reduce_overhead", "cuda_graph_fp16", 1.5)
    target = round(0.95 * ddpm_steps / steps, 2)
    ratio(f"DDIM-{steps} vs DDPM-{ddpm_steps} wall clock (cuda_graph fp16)", "ddpm1000_cuda_graph",
          "cuda_graph_fp16", target, slower_steps=ddpm_steps)
    ratio("cost of the reference loop's per-step NaN check (reference / user loop, fp16 cl)", "reference_fp16_cl",
          "user_fp16_cl", None)
    return out


def _fmt(v, spec=".3f"):
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def _tf32(r):
    conv, mm = r.get("tf32_conv"), r.get("tf32_matmul")
    on = [name for name, v in (("conv", conv), ("matmul", mm)) if v is True]
    return "+".join(on) if on else "off"


def markdown(data: dict) -> str:
    env, suite, tests = data["environment"], data["suite"], data.get("tests")
    if suite.get("finished"):
        state = f"finished in {suite['elapsed_s']:.0f} s"
    elif suite.get("stopped_by"):
        state = f"stopped by the {suite['stopped_by']} after {suite['elapsed_s']:.0f} s"
    else:
        state = "still running when this was written (a kill keeps this state)"
    dry = "**Dry run: CUDA faked on a CPU; the times say nothing about speed.** " if suite["dry_run"] else ""
    lines = [f"# GPU suite: {env['gpu']} ({suite['date']})", "",
             f"{dry}Budget {suite['budget_s']:.0f} s, {'quick' if suite['quick'] else 'full'} run, {state}.",
             f"Command: `{suite['command']}`", "",
             f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), triton {env['triton']}, "
             f"numpy {env['numpy']}, onnxruntime {env['onnxruntime']}, Python {env['python']}, "
             f"driver {env.get('driver')}; "
             f"GPU {env['gpu']} (sm {env.get('sm')}, {env.get('multiprocessors')} SMs, {env.get('memory_gib')} GiB).",
             f"TF32: convolutions {env['tf32_conv']}, matmuls {env['tf32_matmul']}; cuDNN benchmark "
             f"{env['cudnn_benchmark']} (set by the suite), deterministic {env['cudnn_deterministic']}.", ""]
    if tests:
        lines += [f"GPU tests: {tests['summary']} (exit {tests['returncode']}, {tests['seconds']} s of "
                  f"{tests['timeout_s']} s allowed; log {tests['log']})", ""]
    rows = data.get("timings", [])
    if rows:
        lines += ["| config | batch | steps | ms / call | ms / image | first call s | calls | TF32 | status | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['config']} | {r['batch']} | {r['steps']} | {_fmt(r.get('ms'), '.2f')} | "
                         f"{_fmt(r.get('ms_per_image'))} | {_fmt(r.get('first_call_s'), '.1f')} | "
                         f"{_fmt(r.get('calls'))} | {_tf32(r)} | {r['status']} | {r.get('note', '')} |")
    lines += ["", f"| goal (batch 1, S={suite['goal_steps']}) | measured | target | met |", "|---|---|---|---|"]
    for g in data.get("goals", []):
        lines.append(f"| {g['goal']} | {_fmt(g['measured'])} | {_fmt(g['target'])} | {_fmt(g['met'])} |")
    kernels = data.get("kernels", [])
    if kernels:
        lines += ["", f"Kernels (device-to-device copy: {_fmt(data.get('kernel_copy_GBs'), '.0f')} GB/s; speedup = "
                  "baseline / kernel; baseline: eager reference, SDPA for attention):", "",
                  "| kernel | case | ms | baseline ms | speedup | GB/s | % of copy | status | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in kernels:
            lines.append(f"| {r['kernel']} | {r['case']} | {_fmt(r.get('ms'), '.4f')} | "
                         f"{_fmt(r.get('baseline_ms'), '.4f')} | {_fmt(r.get('speedup'), '.2f')} | "
                         f"{_fmt(r.get('GBs'), '.0f')} | {_fmt(r.get('pct_copy'), '.0f')} | {r['status']} | "
                         f"{r.get('note', '')} |")
    return "\n".join(lines) + "\n"
