"""`ddim-fast serve`: the HTTP server of ddim_fast.serve around one model's Batcher (the `serve` extra).

    ddim-fast serve --model digits --steps 10 --host 127.0.0.1 --port 8000
    ddim-fast serve --model digits --plan tuned --steps 5 --port 0      # port 0: a free port

Prints `serving on http://HOST:PORT` to stderr once warm (one sample through the default plan); SIGTERM or
Ctrl-C stops accepting, finishes every accepted request and exits 0. Endpoints: docs/serving.md.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from . import checks
from .checks import ModelFacts, check_with_model
from .common import add_model_options, add_plan_option, add_sampler_options, engine, load, plan_summary


class Serve:
    """`ddim-fast serve`: POST /v1/images/generations, GET /health, /ready, /metrics."""

    @staticmethod
    def add_arguments(p):
        add_model_options(p, steps=10)
        add_sampler_options(p)
        add_plan_option(p)
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
        p.add_argument("--port", type=int, default=8000, help="port; 0 = a free port (the URL line says which)")
        p.add_argument("--max-batch", type=int, default=16, help="rows (images) per merged sampling call")
        p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for others to join")
        p.add_argument("--max-queue", type=int, default=256, help="rows that may wait; beyond: 503 with Retry-After")
        p.add_argument("--max-n", type=int, default=16, help="the most images one request may ask for (above: 413)")
        p.add_argument("--timeout", type=float, default=30.0,
                       help="seconds a request may wait to start (then 504); a request cannot extend it")
        p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                       help="uvicorn's log level")

    @staticmethod
    def check(args) -> ModelFacts | None:
        """Every argument before the model loads (cli/checks.py); the extra is checked first."""
        from ..serve import require_serve

        require_serve()
        checks.sampling(args, eta=args.eta, variance=args.variance)
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535] (0: a free port), got {args.port}")
        checks.at_least(args.max_batch, 1, "--max-batch")
        checks.at_least(args.max_n, 1, "--max-n")
        checks.at_least(args.max_queue, args.max_batch, "--max-queue", " (--max-batch: a full batch must fit)")
        if args.max_n > args.max_queue:
            raise ValueError(f"--max-n ({args.max_n}) must be <= --max-queue ({args.max_queue})")
        if args.max_n > args.max_batch:
            raise ValueError(f"--max-n ({args.max_n}) must be <= --max-batch ({args.max_batch}): a request is "
                             "one batch at most")
        if not (math.isfinite(args.max_wait_ms) and args.max_wait_ms >= 0):
            raise ValueError(f"--max-wait-ms must be a finite number >= 0, got {args.max_wait_ms}")
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise ValueError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
        facts = ModelFacts.of_config(args.model)
        check_with_model(args, facts, steps=args.steps)
        return facts

    @staticmethod
    def run(args):
        Serve.check(args)
        from ..batcher import Batcher
        from ..serve import serve

        model = load(args)
        check_with_model(args, ModelFacts.of_model(model), steps=args.steps)
        eng, model = engine(args, eta=args.eta, variance=args.variance, model=model)
        plans = {"default": eng.plan}
        if args.plan is not None:  # also by the name it was given: "tuned", or the file's stem
            plans["tuned" if args.plan == "tuned" else Path(args.plan).stem] = eng.plan
        print(f"model {args.model}, {plan_summary(eng.plan)}, backend {eng.backend} ({eng.backend_reason}), "
              f"device {eng.device}; warming up", file=sys.stderr, flush=True)
        batcher = Batcher(eng, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
        serve(batcher, model=model, host=args.host, port=args.port, log_level=args.log_level,
              max_n=args.max_n, default_timeout_s=args.timeout, plans=plans,
              on_ready=lambda url: print(f"serving on {url}", file=sys.stderr, flush=True))
        print("stopped: every accepted request was answered", file=sys.stderr, flush=True)
        return 0
