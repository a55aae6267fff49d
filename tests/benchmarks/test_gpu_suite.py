"""The GPU suite's harness on a CPU: a GPU lease is short and a crash in the harness would waste it.

The suite's dry run (CUDA faked, kernels in the interpreter, capture replayed, compile the
identity) runs from a fresh clone with PYTHONPATH=. and no install, as a bare GPU machine would
run it; the budget bookkeeping, the incremental writes, a kill, the watchdog and the report are
checked on their own. Speed is never asserted: the dry run's times mean nothing.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest

from benchmarks import gpu_harness as gh
from benchmarks import gpu_rows as gr
from benchmarks import gpu_suite as gs
from tests.helpers import INTERPRETER_RANGE_BUG, ROOT, interpreter_range_bug

# Run a module with setuptools' editable-install finders removed, so nothing can come from this
# checkout's `pip install -e .`: only PYTHONPATH and the (non-project) site-packages remain.
NO_EDITABLE = ("import runpy, sys\n"
               "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n")


def _row(config, batch, steps, ms):
    return {"config": config, "batch": batch, "steps": steps, "ms": ms}


# -- goals and the report ------------------------------------------------------------------------------
def test_goals_are_ratios_against_the_users_loop():
    rows = [_row("cuda_graph_fp16", 1, 50, 10.0), _row("user_fp16_cl", 1, 50, 45.0),
            _row("compile_reduce_overhead", 1, 50, 12.0), _row("ddpm1000_cuda_graph", 1, 1000, 200.0),
            _row("reference_fp16_cl", 1, 50, 54.0), _row("user_fp16_cl", 16, 50, 1.0)]
    assert len(gr.goals(rows)) == 4
    graph = next(r for r in gr.goals(rows) if "user's eager loop" in r["goal"])
    assert graph["measured"] == 4.5 and graph["met"] is True and graph["target"] == 3.0
    comp = next(r for r in gr.goals(rows) if "torch.compile" in r["goal"])
    assert comp["measured"] == 1.2 and comp["met"] is False
    ddpm = next(r for r in gr.goals(rows) if "DDPM" in r["goal"])
    assert ddpm["measured"] == 20.0 and ddpm["target"] == 19.0 and ddpm["met"] is True
    sync = next(r for r in gr.goals(rows) if "NaN check" in r["goal"])
    assert sync["measured"] == 1.2 and sync["target"] is None and sync["met"] is None
    dry = gr.goals([_row("cuda_graph_fp16", 1, 3, 2.0), _row("ddpm1000_cuda_graph", 1, 20, 30.0)], 3, 20)
    assert next(r for r in dry if "DDPM" in r["goal"])["measured"] == 15.0


def test_missing_timings_are_reported_not_guessed(tmp_path):
    g = gr.goals([_row("cuda_graph_fp16", 1, 50, None)])
    assert all(r["measured"] is None and r["met"] is None for r in g)
    data = _data(timings=[dict(_row("cuda_graph_fp16", 1, 50, None), status="failed", note="RuntimeError: boom")],
                 kernels=[dict(kernel="attention", case="B=1", status="skipped", note="budget: needs ~9 s, 2 s left")])
    md = gr.markdown(data)
    assert "| cuda_graph_fp16 | 1 | 50 | - | - | - | - | off | failed | RuntimeError: boom |" in md
    assert "| attention | B=1 | - | - | - | - | - | skipped | budget: needs ~9 s, 2 s left |" in md
    assert "still running when this was written" in md


def _data(**kw):
    env = dict(gpu="X", torch="t", cuda="c", cudnn=1, triton="3", numpy="2", onnxruntime=None, python="3",
               tf32_conv=True, tf32_matmul=False, cudnn_benchmark=True, cudnn_deterministic=False)
    suite = dict(budget_s=100.0, quick=True, dry_run=False, date="d", elapsed_s=1.0, finished=False, stopped_by=None,
                 goal_steps=50, ddpm_steps=1000, command="python3 -m benchmarks.gpu_suite")
    return dict(dict(suite=suite, environment=env, tests=None, timings=[], kernels=[]), **kw)


def test_suite_refuses_to_run_without_a_gpu(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "needs a GPU" in run.stdout and "--dry-run" in run.stdout


# -- budget bookkeeping --------------------------------------------------------------------------------
def test_estimates_scale_from_what_was_measured():
    est = gh.Estimator(min_reps=3)
    user = gr.Row("user_fp32", 1, 50, "user", "fp32")
    assert est.call_s(user) == pytest.approx(gh.PRIOR_STEP_S * 50)  # nothing measured: the prior
    assert est.setup_s(user) == gh.PRIOR_SETUP_S["user"]
    est.update(user, first_s=4.0, call_s=0.5)
    assert est.setup_s(user) == pytest.approx(3.5)
    assert est.call_s(gr.Row("user_fp32", 16, 10, "user", "fp32")) == pytest.approx(0.5 * 10 / 50 * 16)
    assert est.call_s(gr.Row("user_fp32", 1, 10, "user", "fp32")) == pytest.approx(0.1)  # batch 1 never scales down
    other = gr.Row("triton_fp16", 1, 50, "engine", "fp16", backend="triton")
    assert est.call_s(other) == pytest.approx(2 * 0.5)  # another config: twice the slowest per step
    graph = gr.Row("cuda_graph_fp16", 1, 50, "engine", "fp16", backend="cuda_graph")
    est.update(other, first_s=30.0, call_s=0.1)
    # a graph's first call: its kind's overhead (a prior here) plus warm-up and capture (two eager loops)
    assert est.setup_s(graph) == pytest.approx(gh.PRIOR_SETUP_S["cuda_graph"] + 2 * 0.1)
    est.update(graph, first_s=20.0, call_s=0.02)
    ddpm = gr.Row("ddpm1000_cuda_graph", 1, 1000, "engine", "fp16", backend="cuda_graph", eta=1.0)
    assert est.call_s(ddpm) == pytest.approx(0.02 * 1000 / 50)  # the family's time per step
    assert est.row_s(ddpm) == pytest.approx(19.98 + 2 * 0.1 * 20 + 5 * 0.4)
    assert gr.reps_that_fit(0.5, 3.0, 3, 25) == 6 and gr.reps_that_fit(0.5, 1.0, 3, 25) == 0
    assert gr.reps_that_fit(0.001, 3.0, 3, 25) == 25


def _suite(tmp_path, clock, seconds=100.0, quick=True):
    budget = gh.Budget(seconds, clock=clock)
    results = gh.Results(tmp_path, "t", _data())
    args = Namespace(dry_run=True, quick=quick, skip_tests=True)
    return gh.Suite(args, results, budget), results


def test_rows_that_do_not_fit_are_skipped_with_their_estimate(tmp_path):
    now = [0.0]
    suite, results = _suite(tmp_path, lambda: now[0])
    fits = gr.Row("user_fp32", 2, 3, "user", "fp32")
    suite.timing(fits)  # plenty of budget: measured
    now[0] = 100.0 - gh.FINAL_RESERVE_S - gh.KERNEL_RESERVE_S["dry"] - 0.05  # 0.05 s left for rows
    big = gr.Row("cuda_graph_fp16", 2, 3, "engine", "fp16", backend="cuda_graph")
    suite.timing(big)
    rows = json.loads(results.json_path.read_text())["timings"]
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    assert rows[0]["ms"] > 0 and rows[0]["calls"] >= 2 and rows[0]["tf32_conv"] in (True, False)
    assert rows[1]["ms"] is None and rows[1]["note"].startswith("budget: needs ~") and "0 s left" in rows[1]["note"]
    assert rows[1]["estimate_s"] > 0.05
    suite.kernels_done = True  # the kernels' reserve is released once they ran
    assert suite.reserve() == gh.FINAL_RESERVE_S


def test_stream_process_kills_at_the_timeout_and_keeps_the_output(tmp_path):
    log = (tmp_path / "log").open("w")
    code = "import time; print('one', flush=True); time.sleep(60)"
    rc, timed_out, lines, seconds = gh.stream_process([sys.executable, "-c", code], 2.0, log, prefix="")
    log.close()
    assert timed_out and rc == -signal.SIGKILL and lines == ["one"] and seconds < 30
    assert (tmp_path / "log").read_text() == "one\n" and not gh._CHILDREN


def test_watchdog_writes_the_files_and_exits_at_the_budget(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    gh._CHILDREN.add(sleeper.pid)
    results = gh.Results(tmp_path, "w", _data(timings=[dict(_row("user_fp32", 1, 50, 3.0), status="ok")]))
    results.write()
    exited = threading.Event()
    suite = Namespace(current=("timings", "compile_max_autotune"))
    budget = gh.Budget(gh.FINAL_RESERVE_S / 2 + 0.3)
    gh.start_watchdog(results, [suite], budget, exit=lambda code: exited.set())
    assert exited.wait(20)
    assert sleeper.wait(timeout=10) == -signal.SIGKILL  # its children die with it
    gh._CHILDREN.discard(sleeper.pid)
    data = json.loads(results.json_path.read_text())
    assert data["suite"]["finished"] is False and "watchdog" in data["suite"]["stopped_by"]
    assert data["suite"]["killed_row"] == {"section": "timings", "label": "compile_max_autotune"}
    assert data["timings"][0]["ms"] == 3.0  # what ran is kept
    assert "stopped by the watchdog at the budget, during compile_max_autotune" in results.md_path.read_text()


def test_a_kill_keeps_every_row_written_so_far(tmp_path):
    """SIGKILL in the middle of the dry run: the JSON on disk is whole and holds the rows so far."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--skip-tests", "--out",
                             str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows, deadline = [], time.monotonic() + 120
    try:
        while len(rows) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            for path in tmp_path.glob("gpu-suite-*.json"):
                rows = json.loads(path.read_text())["timings"]
    finally:
        proc.kill()
        proc.wait()
    assert len(rows) >= 3, "the dry run wrote fewer than 3 rows before it ended"
    (path,) = tmp_path.glob("gpu-suite-*.json")
    data = json.loads(path.read_text())
    assert len(data["timings"]) >= 3 and data["suite"]["finished"] is False
    assert "still running when this was written" in path.with_suffix(".md").read_text()


# -- a bare checkout: a fresh clone, PYTHONPATH=. and nothing installed ------------------------------------
def _fresh_clone(dest: Path) -> Path:
    """`git clone` of this repository, plus the working tree's uncommitted changes (the same files
    the GPU machine is sent: tracked and untracked-but-not-ignored), so the test sees this code."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout (this is a source distribution or git is missing)")
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, capture_output=True)

    def listed(*flags):
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", *flags], check=True, capture_output=True)
        return [p for p in out.stdout.decode().split("\0") if p]

    for rel in listed("--modified", "--others", "--exclude-standard"):
        src, dst = ROOT / rel, dest / rel
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        if src.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for rel in listed("--deleted"):
        (dest / rel).unlink(missing_ok=True)
    return dest


def _bare_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "DDIM_FAST_CACHE")}
    return dict(env, PYTHONPATH=".", PYTHONUNBUFFERED="1")


def _bare_python(clone, code, timeout=120):
    return subprocess.run([sys.executable, "-c", NO_EDITABLE + code], cwd=clone, env=_bare_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_from_a_fresh_clone_without_install(tmp_path):
    clone = _fresh_clone(tmp_path / "clone")
    assert (clone / "ddim_fast" / "kernels").is_symlink()  # committed as a link, and cloned as one
    where = ("import ddim_fast, ddim_fast.kernels.ddim_step as k, ddim_fast.kernels.aot\n"
             "print(ddim_fast.__file__); print(k.__file__)")
    got = _bare_python(clone, where)
    assert got.returncode == 0, got.stderr
    assert all(Path(line).resolve().is_relative_to(clone.resolve()) for line in got.stdout.split()), got.stdout

    out = tmp_path / "out"
    cmd = NO_EDITABLE + f"sys.argv = ['gpu_suite', '--dry-run', '--quick', '--out', {str(out)!r}]\n" \
                        "runpy.run_module('benchmarks.gpu_suite', run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", cmd], cwd=clone, env=_bare_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.index("gpu_suite environment:") < run.stdout.index("GPU test tier")  # environment first
    files = sorted(p.name for p in out.iterdir())
    stem = files[0].rsplit("-tests.log", 1)[0] if files[0].endswith(".log") else files[0].rsplit(".", 1)[0]
    assert files == sorted([f"{stem}-tests.log", f"{stem}.json", f"{stem}.md"]) and len(files) <= 8
    data = json.loads((out / f"{stem}.json").read_text())
    suite, tests = data["suite"], data["tests"]

    # the budget's bookkeeping: finished inside it, every row started and ended inside it
    assert suite["finished"] is True and suite["dry_run"] and suite["quick"]
    assert 0 < suite["elapsed_s"] <= suite["budget_s"] == gs.DEFAULT_BUDGET_S["quick"]
    rows = data["timings"] + data["kernels"]
    assert all(0 <= r["t_start_s"] <= r["t_end_s"] <= suite["budget_s"] for r in rows)
    assert tests["returncode"] == 0 and tests["counts"]["skipped"] >= 5 and not tests["timed_out"]
    assert tests["timeout_s"] <= gh.TESTS_SHARE * suite["budget_s"]
    log = (out / f"{stem}-tests.log").read_text()
    assert log.startswith("$ ") and " -m pytest " in log and tests["summary"] in log

    # every row ran (the ORT CUDA row skips, saying why), except where this interpreter cannot run loops
    broken = interpreter_range_bug()
    for r in rows:
        if broken and r["status"] == "failed" and INTERPRETER_RANGE_BUG in r.get("note", ""):
            continue
        if r.get("config") == "ort_cuda_fp16":
            assert r["status"] == "skipped" and ("CUDAExecutionProvider" in r["note"] or "not installed" in r["note"])
            continue
        assert r["status"] == "ok", r
    configs = [r["config"] for r in data["timings"]]
    assert configs == [r.config for r in gr.plan_rows(True, True, 20)[0]]
    assert {r["kernel"] for r in data["kernels"]} == {"copy", "ddim_step", "group_norm", "attention"}
    graph = next(r for r in data["timings"] if r["config"] == "cuda_graph_fp16")
    assert graph["captures"] == 1 and graph["ms"] > 0 and graph["tf32_conv"] in (True, False)
    assert len(data["goals"]) == 4 and all(g["measured"] is not None for g in data["goals"]) or broken
    md = (out / f"{stem}.md").read_text()
    assert "**Dry run" in md and "| cuda_graph_fp16 | 1 | 3 |" in md and "finished in" in md
    assert run.stdout.rstrip().endswith(f"{stem}-tests.log")

    # and the import really comes from the link: without it, this clone has no ddim_fast.kernels
    (clone / "ddim_fast" / "kernels").unlink()
    gone = _bare_python(clone, "import ddim_fast.kernels")
    assert gone.returncode != 0 and "No module named 'ddim_fast.kernels'" in gone.stderr
