"""The GPU suite's bookkeeping (goals, report), checked on CPU with made-up timings: the suite
itself needs a GPU, but a wrong ratio or a crash in the report would waste a GPU lease."""

import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_suite import goals, markdown

ROOT = Path(__file__).resolve().parent.parent


def _row(config, batch, steps, ms):
    per = None if ms is None else ms / batch
    return {"config": config, "batch": batch, "steps": steps, "ms": ms, "ms_per_image": per, "note": ""}


def test_goals_are_ratios_at_batch_1_and_50_steps():
    rows = [_row("cuda_graph_fp16", 1, 50, 10.0), _row("eager_fp16_cl", 1, 50, 45.0),
            _row("compile_reduce_overhead", 1, 50, 12.0), _row("ddpm1000_cuda_graph", 1, 1000, 200.0),
            _row("eager_fp16_cl", 16, 50, 1.0)]
    g = {r["goal"]: r for r in goals(rows)}
    assert g["cuda_graph vs eager fp16 (channels_last)"]["measured"] == 4.5
    assert g["cuda_graph vs eager fp16 (channels_last)"]["met"] is True
    assert g["cuda_graph vs torch.compile reduce-overhead"]["measured"] == 1.2
    assert g["cuda_graph vs torch.compile reduce-overhead"]["met"] is False
    assert g["DDIM-50 vs DDPM-1000 wall clock"]["measured"] == 20.0
    assert g["DDIM-50 vs DDPM-1000 wall clock"]["met"] is True  # target 0.95 x 20 = 19


def test_missing_timings_are_reported_not_guessed():
    g = goals([_row("cuda_graph_fp16", 1, 50, None)])
    assert all(r["measured"] is None and r["met"] is None for r in g)
    md = markdown({"gpu": "X", "torch": "t", "cuda": "c"}, {"summary": "s", "returncode": 0, "seconds": 1},
                  [_row("cuda_graph_fp16", 1, 50, None)], g,
                  {"error": "RuntimeError: boom"})
    assert "| cuda_graph_fp16 | 1 | 50 | - | - |" in md and "Kernel benchmarks FAILED: RuntimeError: boom" in md


def test_suite_refuses_to_run_without_a_gpu():
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--quick"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "needs a GPU" in run.stdout
