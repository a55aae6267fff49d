"""`ddim-fast bench NAME [ARGS]`: run a benchmark script of a source checkout (benchmarks/NAME.py)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "speedup_vs_ddpm": "DDPM-1000 against DDIM-S wall clock per backend (the paper's Figure 4)",
    "paper_tables": "Tables 1 and 2 of the paper on the bundled digits model",
    "bench_cpu_backends": "per-sample latency of the CPU backends (and diffusers, if installed)",
    "first_result": "time to the first result on a CPU from an empty ONNX cache: Engine, new plans, the CLI",
    "bench_kernels": "Triton kernel bandwidth and attention against SDPA (GPU)",
    "gpu_suite": "the GPU test tier plus every GPU timing (GPU)",
}


class Bench:
    """`ddim-fast bench`: a benchmark script of the source tree, its arguments passed on."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("name", choices=sorted(BENCHMARKS),
                       help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
        p.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the script (try: NAME --help)")

    @staticmethod
    def run(args):
        root = Path(__file__).resolve().parents[2]  # the checkout: ddim_fast/cli/bench.py -> .
        if not (root / "benchmarks" / f"{args.name}.py").is_file():
            raise FileNotFoundError("the benchmarks ship with the source tree, not the wheel: run from a checkout "
                                    "(git clone ...; pip install -e .)")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        module = importlib.import_module(f"benchmarks.{args.name}")
        return module.main(args.args)
