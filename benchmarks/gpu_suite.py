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
import codecs
import datetime as _dt
import gc
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = {"full": 540, "quick": 270}
TESTS_SHARE = 0.4  # at most this part of the budget goes to the test tier
FINAL_RESERVE_S = 8  # kept back for the last write; the watchdog fires FINAL_RESERVE_S / 2 before the end
KERNEL_RESERVE_S = {"full": 45, "quick": 30, "dry": 4}  # the goal rows leave this much for the kernels
PRIOR_SETUP_S = {  # first-call cost of a row kind before anything like it was measured (guesses)
    "user": 5, "reference": 5, "triton": 45, "cuda_graph": 45, "onnxruntime": 60,
    "compile:reduce-overhead": 150, "compile:max-autotune": 300,
}
PRIOR_STEP_S = 0.02  # seconds per sampling step at batch <= 16 before anything was measured
TIMING_S = {"full": 3.0, "quick": 2.0, "dry": 0.3}  # time spent on the timed calls of one row
REPS = {"full": (3, 25), "quick": (3, 15), "dry": (2, 3)}  # (fewest, most) timed calls of a row
ROW_PREFIX = "GPU_SUITE_ROW "  # how a child process hands its measured row back


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


# -- the budget and the estimates ---------------------------------------------------------------------
class Budget:
    """One wall-clock budget over the whole run."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.seconds, self.clock, self.t0 = float(seconds), clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Estimator:
    """A row's cost from what was measured so far: the first-call overhead of its kind (the last
    one measured, else a prior; for a CUDA graph plus two eager runs of its loop: warm-up and
    capture) and (2 + fewest reps) calls. A call is scaled (linear in steps, and in batch above
    the measured batch) from the last measurement of the same config, else of the same family
    (kind, backend, mode, dtype, layout), else twice the slowest per-step time seen, else a prior."""

    def __init__(self, min_reps: int, prior_scale: float = 1.0):
        self.min_reps, self.prior_scale = min_reps, prior_scale
        self.setup = {}  # cost key -> seconds of first-call overhead
        self.calls = {}  # config -> (batch, steps, seconds per call)
        self.families = {}  # family -> (batch, steps, seconds per call)

    @staticmethod
    def _scaled(measured, batch, steps):
        B0, S0, t = measured
        return t * steps / S0 * max(1.0, batch / B0)

    def call_s(self, row: Row) -> float:
        return self._call_s(row.config, row.family, row.batch, row.steps)

    def _call_s(self, config, family, batch, steps):
        if config in self.calls:
            return self._scaled(self.calls[config], batch, steps)
        if family in self.families:
            return self._scaled(self.families[family], batch, steps)
        if self.calls:
            return 2 * max(self._scaled(m, batch, 1) for m in self.calls.values()) * steps
        return self.prior_scale * PRIOR_STEP_S * steps * max(1.0, batch / 16)

    def setup_s(self, row: Row) -> float:
        s = self.setup.get(row.cost_key, self.prior_scale * PRIOR_SETUP_S.get(row.cost_key, 30))
        if row.backend == "cuda_graph":
            eager = ("engine", "triton", None, row.dtype, row.channels_last)
            s += 2 * self._call_s(None, eager, row.batch, row.steps)
        return s

    def row_s(self, row: Row) -> float:
        return self.setup_s(row) + (2 + self.min_reps) * self.call_s(row)

    def update(self, row: Row, first_s: float, call_s: float):
        self.setup[row.cost_key] = max(first_s - call_s, 0.0)
        self.calls[row.config] = self.families[row.family] = (row.batch, row.steps, call_s)


def reps_that_fit(call_s: float, seconds: float, fewest: int, most: int) -> int:
    """How many timed calls fit in `seconds` (0 when not even `fewest` do), at most `most`."""
    n = int(seconds / max(call_s, 1e-9))
    return 0 if n < fewest else min(n, most)


# -- results on disk ---------------------------------------------------------------------------------
class Results:
    """The JSON and Markdown in DIR, rewritten (atomically) after every change."""

    def __init__(self, out: Path, stem: str, data: dict):
        self.out, self.stem, self.data = out, stem, data
        self.lock = threading.RLock()
        self.json_path, self.md_path = out / f"{stem}.json", out / f"{stem}.md"
        self.log_path = out / f"{stem}-tests.log"

    def update(self, **kw):
        with self.lock:
            self.data.update(kw)
            self.write()

    def add(self, section: str, row: dict):
        with self.lock:
            self.data.setdefault(section, []).append(row)
            self.write()

    def write(self):
        with self.lock:
            self.data["goals"] = goals(self.data.get("timings", []), self.data["suite"]["goal_steps"],
                                       self.data["suite"]["ddpm_steps"])
            _atomic_write(self.json_path, json.dumps(self.data, indent=1, default=str))
            _atomic_write(self.md_path, markdown(self.data))


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- environment -------------------------------------------------------------------------------------
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


# -- subprocesses: the test tier and the compile rows --------------------------------------------------
_CHILDREN = set()  # process ids of running children, killed by the watchdog


def stream_process(cmd, timeout_s, log=None, prefix="  | ", env=None):
    """Run cmd (its own process group), echo its output as it comes, partial lines included (and
    into `log`), kill the group after timeout_s. Returns (returncode, timed_out, lines, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    _CHILDREN.add(proc.pid)
    received = []

    def pump():  # raw reads: a test's name shows before it finishes, so a hang shows where it hangs
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        at_line_start = True
        while chunk := os.read(proc.stdout.fileno(), 65536):
            text = decode(chunk)
            received.append(text)
            for piece in text.splitlines(keepends=True):
                sys.stdout.write((prefix if at_line_start else "") + piece)
                at_line_start = piece.endswith("\n")
            sys.stdout.flush()
            if log is not None:
                log.write(text)
                log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        proc.wait()
    finally:
        _CHILDREN.discard(proc.pid)
    reader.join(timeout=10)
    if received and not received[-1].endswith("\n"):
        print(flush=True)
    return proc.returncode, timed_out, "".join(received).splitlines(), time.monotonic() - t0


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def run_tests(paths, timeout_s, log_path: Path) -> dict:
    """`pytest -m gpu` on `paths` with a timeout (and a per-test one when pytest-timeout is there)."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs", "--durations=15",
           *paths]
    per_test = None
    if importlib.util.find_spec("pytest_timeout") is not None:
        per_test = int(max(30, min(150, timeout_s / 2)))
        cmd.insert(4, f"--timeout={per_test}")
    print(f"  $ {' '.join(cmd[1:])}  (timeout {timeout_s:.0f} s)", flush=True)
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        rc, timed_out, lines, seconds = stream_process(cmd, timeout_s, log, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if timed_out:
            log.write(f"\n[gpu_suite] killed after {seconds:.0f} s: the test tier's timeout\n")
    summary = next((ln.strip("= ") for ln in reversed(lines) if _SUMMARY.search(ln) or "no tests ran" in ln), "")
    counts = {}
    for n, what in _SUMMARY.findall(summary):
        counts["errors" if what.startswith("error") else what] = int(n)
    if timed_out:
        summary = f"TIMED OUT after {seconds:.0f} s (partial output in the log)"
    return {"returncode": rc, "timed_out": timed_out, "summary": summary, "counts": counts,
            "seconds": round(seconds, 1), "timeout_s": round(timeout_s, 1), "per_test_timeout_s": per_test,
            "log": log_path.name}


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


# -- the suite ---------------------------------------------------------------------------------------
class Suite:
    def __init__(self, args, results: Results, budget: Budget):
        self.args, self.results, self.budget = args, results, budget
        self.size = "dry" if args.dry_run else ("quick" if args.quick else "full")
        self.reps = REPS[self.size]
        self.estimator = Estimator(self.reps[0], prior_scale=0.02 if args.dry_run else 1.0)
        self.ctx = Context(args.dry_run)
        self.current = None  # (section, label) of the row in flight, for the watchdog
        self.kernels_done = False

    def reserve(self):
        return FINAL_RESERVE_S + (0 if self.kernels_done else KERNEL_RESERVE_S[self.size])

    def record(self, section, row: dict, started: float):
        row.update(t_start_s=round(started, 2), t_end_s=round(self.budget.elapsed(), 2))
        self.results.add(section, row)
        ms = row.get("ms")
        shown = f"{ms:10.3f} ms" if isinstance(ms, float) else f"{'-':>13}"
        label = row.get("config") or f"{row.get('kernel')} {row.get('case')}"
        extra = f" B={row['batch']:<4} S={row['steps']:<5}" if "batch" in row else ""
        print(f"  {label:<26}{extra} {shown}  {row['status']} {row.get('note', '')}".rstrip(), flush=True)

    # one sampling row
    def timing(self, row: Row):
        import torch

        started = self.budget.elapsed()
        base = dict(asdict(row), ms=None, ms_per_image=None, **precision_flags())
        if row.backend == "onnxruntime":
            from ddim_fast.backends.onnxruntime import OnnxRuntimeBackend

            why = OnnxRuntimeBackend.unavailable(torch.device("cuda"))
            if why is not None:
                return self.record("timings", dict(base, status="skipped", note=why), started)
        est = self.estimator.row_s(row)
        left = self.budget.left() - self.reserve()
        base["estimate_s"] = round(est, 1)
        if est > left:
            return self.record("timings", dict(base, status="skipped",
                                               note=f"budget: needs ~{est:.0f} s, {max(left, 0):.0f} s left"), started)
        self.current = ("timings", row.config)
        try:
            if row.kind == "compile":
                got = self.child_row(row, min(left, max(est * 2, est + 60)))
            else:
                got = measure(row, self.ctx, lambda: self.budget.left() - self.reserve(), TIMING_S[self.size],
                              self.reps)
            self.estimator.update(row, got["first_call_s"], got["call_s"])
            base.update(got, status="ok", ms_per_image=got["ms"] / row.batch)
        except ChildFailed as e:
            base.update(status="failed" if not e.timed_out else "killed", note=str(e))
        except Exception as e:  # recorded, not hidden: the table shows the failure
            base.update(status="failed", note=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            self.current = None
            self.ctx.cleanup()
        self.record("timings", base, started)

    def child_row(self, row: Row, seconds: float) -> dict:
        """A compile row in a subprocess, killed after `seconds` (compilation time is unbounded)."""
        cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--child-row", json.dumps(asdict(row)),
               "--budget", str(int(seconds))] + (["--dry-run"] if self.args.dry_run else [])
        rc, timed_out, lines, took = stream_process(cmd, seconds, prefix="  > ")
        if timed_out:
            raise ChildFailed(f"killed after {took:.0f} s (its share of the budget)", timed_out=True)
        found = [ln[len(ROW_PREFIX):] for ln in lines if ln.startswith(ROW_PREFIX)]
        if rc != 0 or not found:
            tail = " | ".join(lines[-3:])
            raise ChildFailed(f"child exited {rc}: {tail[:300]}")
        got = json.loads(found[-1])
        if "error" in got:
            raise ChildFailed(got["error"])
        return got

    # the kernel benchmarks
    def kernels(self):
        from benchmarks import bench_kernels as bk

        self.kernels_done = True  # from here on nothing is reserved for them
        bench = self.wall_bench if self.args.dry_run else (lambda fn: bk.do_bench_ms(fn, 100 if self.args.quick
                                                                                       else 200))
        sizes = "dry" if self.args.dry_run else "full"
        device = self.ctx.device
        started = self.budget.elapsed()
        try:
            copy_gbs = bk.copy_bandwidth(bk.SIZES[sizes]["copy_bytes"], device=device, bench=bench)
            self.results.update(kernel_copy_GBs=round(copy_gbs, 1))
            self.record("kernels", dict(kernel="copy", case=f"{bk.SIZES[sizes]['copy_bytes'] >> 20} MiB d2d",
                                        GBs=copy_gbs, status="ok"), started)
        except Exception as e:
            return self.record("kernels", dict(kernel="copy", case="", status="failed",
                                               note=f"{type(e).__name__}: {str(e)[:300]}"), started)
        seen = {}  # kernel -> seconds of its cases so far (the first includes Triton's compile)
        prior = 0.5 if self.args.dry_run else 15.0
        for case in bk.cases(sizes, device=device, bench=bench):
            started = self.budget.elapsed()
            est = (max(seen[case.kernel]) if case.kernel in seen else prior)
            left = self.budget.left() - FINAL_RESERVE_S
            if est > left:
                self.record("kernels", dict(kernel=case.kernel, case=case.label, status="skipped",
                                            note=f"budget: needs ~{est:.0f} s, {max(left, 0):.0f} s left"), started)
                continue
            self.current = ("kernels", f"{case.kernel} {case.label}")
            try:
                row = dict(case.run(copy_gbs), status="ok")
            except Exception as e:
                row = dict(kernel=case.kernel, case=case.label, status="failed",
                           note=f"{type(e).__name__}: {str(e)[:300]}")
            finally:
                self.current = None
            seen.setdefault(case.kernel, []).append(self.budget.elapsed() - started)
            self.record("kernels", row, started)
        self.ctx.cleanup()

    def wall_bench(self, fn):
        """The dry run's do_bench: the median wall-clock ms of 2 calls after one."""
        fn()
        return self.ctx.median_ms(fn, 2)

    def run(self):
        core, later = plan_rows(self.args.quick, self.args.dry_run, self.ctx.schedule.T)
        print(f"\nsampling rows (batch 1, S = {core[0].steps}; DDPM S = {self.ctx.schedule.T}) ...", flush=True)
        for row in core:
            self.timing(row)
        print("\nkernel benchmarks ...", flush=True)
        self.kernels()
        if later:
            print("\nthe other sampling rows ...", flush=True)
        for row in later:
            self.timing(row)


class ChildFailed(RuntimeError):
    def __init__(self, msg, timed_out=False):
        super().__init__(msg)
        self.timed_out = timed_out


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


# -- the dry run's fakes -------------------------------------------------------------------------------
def fake_cuda():
    """CUDA faked on a CPU (see the module docstring). Must run before ddim_fast's kernels are imported."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from ddim_fast import engine
    from ddim_fast.backends.cuda_graph import CudaGraphBackend

    class _Replay:  # replaying a "captured" graph runs its body again, eagerly
        def __init__(self, body):
            self.replay = body

    choose = engine.choose_backend

    def choose_backend(backend, device):
        if backend == "cuda_graph" and device.type == "cpu":
            return "cuda_graph", "dry run: the captured body is replayed eagerly"
        return choose(backend, device)

    engine.choose_backend = choose_backend
    CudaGraphBackend._warm_up = lambda self, body: body()
    CudaGraphBackend._record = lambda self, body: _Replay(body)
    torch.compile = lambda model=None, **kw: model


# -- entry points ----------------------------------------------------------------------------------------
def child_main(args) -> int:
    """One compile row (--child-row JSON): measured here, printed as one ROW_PREFIX line."""
    if args.dry_run:
        fake_cuda()
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


def start_watchdog(results: Results, suite_ref: list, budget: Budget, exit=os._exit):
    """At FINAL_RESERVE_S / 2 before the end of the budget: kill the children, note the row in
    flight, write the files and exit (3). The normal path finishes before it fires."""
    def fire():
        for pid in list(_CHILDREN):
            _kill_group(pid)
        suite = suite_ref[0] if suite_ref else None
        inflight = suite.current if suite is not None else None
        with results.lock:
            s = dict(results.data["suite"], elapsed_s=round(budget.elapsed(), 1), finished=False,
                     stopped_by=f"watchdog at the budget, during {inflight[1] if inflight else 'setup'}")
            if inflight:
                s["killed_row"] = {"section": inflight[0], "label": inflight[1]}
            results.update(suite=s)
        print(f"\ngpu_suite: budget reached during {inflight[1] if inflight else 'setup'}; results so far are in "
              f"{results.json_path} and {results.md_path.name}", flush=True)
        exit(3)

    timer = threading.Timer(max(budget.left() - FINAL_RESERVE_S / 2, 0), fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--budget", type=float, help="wall-clock seconds for everything (default 540; 270 with --quick)")
    ap.add_argument("--out", help="folder for the results (3 files; required)")
    ap.add_argument("--quick", action="store_true", help="the goal rows and the kernels only")
    ap.add_argument("--skip-tests", action="store_true", help="no test tier")
    ap.add_argument("--tests", nargs="+",
                    help="test paths for the tier (default: tests; dry run: tests/test_backend_cuda_graph.py)")
    ap.add_argument("--dry-run", action="store_true", help="on a CPU, CUDA faked: checks the harness, not speed")
    ap.add_argument("--child-row", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_row:
        return child_main(args)
    if not args.out:
        ap.error("--out DIR is required: the folder the 3 result files go to")
    budget = Budget(args.budget or DEFAULT_BUDGET_S["quick" if args.quick else "full"])
    if args.dry_run:
        fake_cuda()
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
        paths = args.tests or (["tests/test_backend_cuda_graph.py"] if args.dry_run else ["tests"])
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
