"""The GPU suite's harness: one wall-clock budget over everything (the budget, the cost estimates,
the scheduler that measures a row or skips it with its estimate), the result files rewritten after
every row, the watchdog that writes them and exits at the budget, and subprocesses (the test tier,
a compile row) streamed and killed at their timeouts. What a row measures is benchmarks/gpu_rows.py.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.gpu_rows import Context, Row, goals, markdown, measure, plan_rows, precision_flags

ROOT = Path(__file__).resolve().parent.parent
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


# -- the scheduler: every row and kernel case inside what is left of the budget -----------------------
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


# -- the watchdog ------------------------------------------------------------------------------------
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
