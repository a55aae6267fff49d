"""`ddim-fast serve`: an HTTP server around a Batcher (issue 24), on Starlette and uvicorn (the `serve` extra).

    app = make_app(batcher, model=model, max_n=16, default_timeout_s=30.0, plans={"default": plan})
    serve(batcher, model=model, host="127.0.0.1", port=8000, ...)      # uvicorn; port 0: a free port

Endpoints (docs/serving.md has examples):
  POST /v1/images/generations  JSON {n, seed, steps | plan, sampler, eta, class_label, guidance, response_format};
                               the reply {"created", "seed", "data": [{"b64_json": PNG} | {"b64_npy": .npy}, ...]}.
                               Image i of a request is sample i of its seed: Engine.sample(n, seed) of that request
                               alone, however the Batcher merged it (noise is keyed per row by (seed, index)).
  GET /health                  200 while the process serves
  GET /ready                   200 once warm (one sample through the default plan), else 503
  GET /metrics                 Prometheus text: latency by status, queue depth, rows per batch, rejections by reason

Errors are JSON {"error": {"message", "type"}}: 400 for a bad field (one message), 413 for n > max_n, 503 with
Retry-After at once when the queue is full, the server is warming up or draining, 504 when a request has not
started within its deadline, 500 when sampling itself failed. A client that disconnects has its request
cancelled, so its rows leave the queue.
On shutdown (uvicorn's SIGTERM handling: stop accepting, finish open requests) the lifespan closes the batcher
with drain=True, so every accepted request completes. Each app has its own prometheus CollectorRegistry.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import secrets
import signal
import socket
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager

import numpy as np

from .checks import is_int, is_number
from .rng import SEED_MAX

log = logging.getLogger("ddim_fast.serve")

FIELDS = ("n", "seed", "steps", "sampler", "eta", "plan", "class_label", "guidance", "response_format", "user")
FORMATS = ("b64_json", "npy")
REJECTIONS = ("queue_full", "deadline", "bad_request", "too_large", "disconnect", "not_ready", "server_error")
PLAN_CACHE = 32  # plans built from steps / sampler / eta, kept (LRU): equal requests share one plan object
RETRY_AFTER_S = 1
DISCONNECT = 499  # the status recorded (never sent) for a request whose client went away


def require_serve():
    """Starlette, uvicorn and prometheus_client, or one line naming the extra (checks.MissingExtra)."""
    from .checks import require

    for module in ("starlette", "uvicorn", "prometheus_client"):
        require(module, "serve", "ddim-fast serve")


class BadRequest(ValueError):
    def __init__(self, message, status=400, kind="invalid_request_error", reason="bad_request"):
        super().__init__(message)
        self.status, self.kind, self.reason = status, kind, reason


# -- the request body -----------------------------------------------------------------------------------
class Plans:
    """The server's named plans and the plans built from steps / sampler / eta (an LRU keyed by them)."""

    def __init__(self, model, named: dict, default, T: int, size: int = PLAN_CACHE):
        self.model, self.named, self.default, self.T, self.size = model, dict(named), default, T, size
        self.named.setdefault("default", default)
        self.built = OrderedDict()

    def get(self, name, steps, sampler, eta):
        if name is not None:
            if steps is not None or sampler is not None or eta is not None:
                raise BadRequest("plan names a whole sampler: give either plan or steps/sampler/eta, not both")
            if name not in self.named:
                raise BadRequest(f"plan {name!r} is not loaded here; this server has {', '.join(sorted(self.named))}")
            return self.named[name]
        if steps is None and sampler is None and eta is None:
            return self.default
        if self.model is None:
            raise BadRequest("this server serves named plans only (give plan); steps/sampler/eta need the model")
        steps = len(self.default.timesteps) if steps is None else steps
        key = (steps, sampler or "ddim", 0.0 if eta is None else float(eta))
        plan = self.built.get(key)
        if plan is None:
            from .plan import SamplingPlan

            kw = {"eta": key[2]} if sampler is None else {"eta": key[2], "sampler": sampler}
            try:
                plan = SamplingPlan.for_model(self.model, steps, **kw)
            except ValueError as e:
                raise BadRequest(str(e).splitlines()[0]) from None
            self.built[key] = plan
            while len(self.built) > self.size:
                self.built.popitem(last=False)
        self.built.move_to_end(key)
        return plan


def _int_field(body, name, lo, hi, what):
    v = body[name]
    if not is_int(v):
        raise BadRequest(f"{name} must be an integer {what}, got {json.dumps(v)}")
    if not lo <= v <= hi:
        raise BadRequest(f"{name} must be {what}, got {v}")
    return int(v)


def parse_request(raw: bytes, *, max_n: int, plans: Plans, num_classes: int | None) -> dict:
    """The checked request: n, seed, plan, cond, guidance, format; BadRequest (one message) otherwise."""
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
    n = body.get("n", 1)
    if not is_int(n) or n < 1:
        raise BadRequest(f"n must be an integer >= 1, got {json.dumps(n)}")
    if n > max_n:
        raise BadRequest(f"n = {n} is more than this server's max_n = {max_n}", status=413, reason="too_large")
    seed = secrets.randbelow(SEED_MAX + 1) if body.get("seed") is None else \
        _int_field(body, "seed", 0, SEED_MAX, "in [0, 2**63)")
    steps = None if body.get("steps") is None else _int_field(body, "steps", 1, plans.T, f"in [1, {plans.T}] (T)")
    sampler = body.get("sampler")
    if sampler is not None:
        from .plan import SAMPLERS

        if sampler not in SAMPLERS:
            raise BadRequest(f"unknown sampler {json.dumps(sampler)}; use one of {', '.join(SAMPLERS)}")
    eta = body.get("eta")
    if eta is not None:
        if not (is_number(eta) and math.isfinite(eta) and eta >= 0):
            raise BadRequest(f"eta must be a finite number >= 0, got {json.dumps(eta)}")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadRequest(f"user must be a string, got {json.dumps(body['user'])}")
    name = body.get("plan")
    if name is not None and not isinstance(name, str):
        raise BadRequest(f"plan must be the name of a plan loaded here, got {json.dumps(name)}")
    fmt = body.get("response_format", "b64_json")
    if fmt not in FORMATS:
        raise BadRequest(f"response_format must be one of {', '.join(FORMATS)}, got {json.dumps(fmt)}")
    labels, guidance = body.get("class_label"), body.get("guidance")
    cond = None
    if labels is not None:
        if num_classes is None:
            raise BadRequest("class_label applies to a class-conditional model; this model takes no class labels")
        many = labels if isinstance(labels, list) else [labels]
        if isinstance(labels, list) and len(labels) != n:
            raise BadRequest(f"class_label: give one label for all images or a list of n = {n}, got {len(labels)}")
        for y in many:
            if not is_int(y) or not 0 <= y <= num_classes:
                raise BadRequest(f"class_label must be an integer in [0, {num_classes}] ({num_classes}: the null "
                                 f"label), got {json.dumps(y)}")
        import torch

        cond = {"class_labels": torch.tensor([int(y) for y in many] * (n if len(many) == 1 else 1), dtype=torch.long)}
    if guidance is not None:
        if not (is_number(guidance) and math.isfinite(guidance)):
            raise BadRequest(f"guidance must be a finite number (e.g. 2), got {json.dumps(guidance)}")
        if cond is None:
            raise BadRequest("guidance needs class_label (the class to guide towards)")
        guidance = float(guidance)
    plan = plans.get(name, steps, sampler, eta)
    return {"n": int(n), "seed": seed, "plan": plan, "cond": cond, "guidance": guidance, "format": fmt}


# -- images out -----------------------------------------------------------------------------------------
def encode_images(images, fmt: str) -> list[dict]:
    """(n, C, H, W) float32 in [-1, 1] -> one item per image: {"b64_json": PNG} or {"b64_npy": .npy}."""
    out = []
    if fmt == "npy":
        arr = images.detach().float().cpu().numpy()
        for a in arr:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(a, dtype=np.float32))
            out.append({"b64_npy": base64.b64encode(buf.getvalue()).decode("ascii")})
        return out
    from .images import png_bytes, single_image

    for im in images:
        out.append({"b64_json": base64.b64encode(png_bytes(single_image(im))).decode("ascii")})
    return out


# -- the app ----------------------------------------------------------------------------------------------
def _metrics(batcher, max_batch):
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    m = {
        "registry": reg,
        "latency": Histogram("ddim_fast_request_seconds", "seconds from a generation request to its reply",
                             ["status"], registry=reg,
                             buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, float("inf"))),
        "queue": Gauge("ddim_fast_queued_rows", "rows (images) waiting in the batcher's queue", registry=reg),
        "batch": Histogram("ddim_fast_batch_rows", "rows (images) per batch run", registry=reg,
                           buckets=tuple(range(1, max(2, max_batch) + 1)) + (float("inf"),)),
        "batch_seconds": Histogram("ddim_fast_batch_seconds", "seconds per batch run", registry=reg),
        "rejected": Counter("ddim_fast_rejections", "generation requests not answered with images, by reason",
                            ["reason"], registry=reg),
        "images": Counter("ddim_fast_images", "images returned", registry=reg),
    }
    m["queue"].set_function(lambda: batcher.queued_rows)
    for r in REJECTIONS:
        m["rejected"].labels(r)
    return m


def make_app(batcher, *, model=None, max_n: int = 16, default_timeout_s: float = 30.0, plans: dict | None = None,
             warmup: bool = True, retry_after_s: int = RETRY_AFTER_S, on_ready=None):
    """The Starlette app serving `batcher` (a ddim_fast Batcher). model: the model, for plans built from
    steps/sampler/eta (None: named plans only); plans: name -> SamplingPlan ("default": the batcher's plan
    unless given); default_timeout_s: each request's deadline to start (a request cannot extend it);
    warmup: one sample through the default plan at start-up before /ready says 200 (False: ready at once);
    on_ready(): called once warm. app.state.metrics holds the registry and the series."""
    require_serve()
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from .batcher import BatcherClosed, DeadlineExceeded, QueueFull

    if not is_int(max_n) or max_n < 1:
        raise ValueError(f"max_n must be an int >= 1, got {max_n!r}")
    if not (default_timeout_s > 0):
        raise ValueError(f"default_timeout_s must be > 0, got {default_timeout_s!r}")
    max_batch = getattr(batcher, "max_batch", max_n)
    plans = dict(plans or {})
    default = plans.get("default", batcher.plan)
    spec = getattr(batcher.engine, "cond_spec", None) or {}
    labels = spec.get("class_labels")
    num_classes = labels["range"][1] if labels else None
    book = Plans(model, plans, default, int(default.T))
    metrics = _metrics(batcher, max_batch)
    state = {"ready": not warmup, "draining": False, "warmup_error": None}
    before = getattr(batcher, "on_batch", None)

    def on_batch(rows, requests, seconds):
        metrics["batch"].observe(rows)
        metrics["batch_seconds"].observe(seconds)
        if before is not None:
            before(rows, requests, seconds)

    batcher.on_batch = on_batch

    def error(status, message, kind, reason, headers=None):
        metrics["rejected"].labels(reason).inc()
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)

    def busy(message, reason):
        return error(503, message, "server_busy", reason, {"Retry-After": str(int(retry_after_s))})

    def shutting_down():
        return busy("the server is shutting down; retry on another replica", "not_ready")

    async def generate(request):
        t0 = time.perf_counter()
        response = await _generate(request)
        metrics["latency"].labels(str(response.status_code)).observe(time.perf_counter() - t0)
        return response

    async def _generate(request):
        if state["draining"]:
            return shutting_down()
        if not state["ready"]:
            return busy("the server is warming up; retry shortly", "not_ready")
        raw = await request.body()
        try:
            req = parse_request(raw, max_n=max_n, plans=book, num_classes=num_classes)
            fut = batcher.submit(req["n"], seed=req["seed"], cond=req["cond"], guidance=req["guidance"],
                                 plan=req["plan"], timeout_s=default_timeout_s)
        except BadRequest as e:
            return error(e.status, str(e), e.kind, e.reason)
        except QueueFull as e:
            return busy(f"the queue is full ({e}); retry after {retry_after_s} s", "queue_full")
        except BatcherClosed:
            return shutting_down()
        except ValueError as e:  # the batcher's own argument checks
            return error(400, str(e).splitlines()[0], "invalid_request_error", "bad_request")
        done = asyncio.wrap_future(fut)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not done.done():  # the client went away (or this task was cancelled): drop its rows
                fut.cancel()
            gone.cancel()
        if not done.done():
            metrics["rejected"].labels("disconnect").inc()
            return Response(status_code=DISCONNECT)
        try:
            images = done.result()
        except DeadlineExceeded:
            return error(504, f"the request did not start within its deadline of {default_timeout_s:g} s",
                         "timeout", "deadline")
        except asyncio.CancelledError:
            metrics["rejected"].labels("disconnect").inc()
            return Response(status_code=DISCONNECT)
        except BatcherClosed:
            return shutting_down()
        except Exception as e:  # noqa: BLE001 - the engine failed (e.g. NonFiniteError): a JSON 500, logged
            log.exception("sampling failed")
            return error(500, f"sampling failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         "server_error", "server_error")
        data = await asyncio.get_running_loop().run_in_executor(None, encode_images, images, req["format"])
        metrics["images"].inc(len(data))
        return JSONResponse({"created": int(time.time()), "seed": req["seed"], "data": data})

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def ready(request):
        if state["ready"] and not state["draining"]:
            return JSONResponse({"status": "ready"})
        why = "draining" if state["draining"] else (f"warm-up failed: {state['warmup_error']}"
                                                    if state["warmup_error"] else "warming up")
        return JSONResponse({"status": why}, status_code=503, headers={"Retry-After": str(int(retry_after_s))})

    async def metrics_text(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics["registry"]), media_type=CONTENT_TYPE_LATEST)

    async def warm():
        try:
            await asyncio.wrap_future(batcher.submit(1, seed=0, plan=default, timeout_s=None))
        except Exception as e:  # noqa: BLE001 - reported by /ready and the log
            state["warmup_error"] = f"{type(e).__name__}: {e}"
            log.error("warm-up failed: %s", state["warmup_error"])
            return
        state["ready"] = True
        if on_ready is not None:
            on_ready()

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.ensure_future(warm()) if warmup else None
        if not warmup and on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            state["draining"] = True
            if task is not None and not task.done():
                await asyncio.wait({task})
            # uvicorn has finished every open request by now; drain=True finishes anything still queued
            await asyncio.get_running_loop().run_in_executor(None, lambda: batcher.close(drain=True))

    app = Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"]),
                            Route("/health", health), Route("/ready", ready), Route("/metrics", metrics_text)],
                    lifespan=lifespan)
    app.state.metrics = metrics
    app.state.serving = state
    app.state.plans = book
    return app


async def _disconnected(request):
    """Returns when the client has gone: after the body, the next ASGI message is http.disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- uvicorn -------------------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0: a free port (sock.getsockname()[1])."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def server(app, sock=None, *, log_level: str = "warning", **config):
    """A uvicorn.Server for `app` (run it with .run(sockets=[sock]))."""
    import uvicorn

    cfg = uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False, **config)
    return uvicorn.Server(cfg)


def serve(batcher, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", on_ready=None,
          **app_options) -> None:
    """Serve `batcher` with uvicorn until SIGTERM / SIGINT (then: stop accepting, finish every accepted
    request, close the batcher). on_ready(url): called once the server is warm."""
    require_serve()
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}"
    app = make_app(batcher, on_ready=(lambda: on_ready(url)) if on_ready else None, **app_options)
    # uvicorn catches SIGTERM for its graceful shutdown, then raises it again under the handler it found, so
    # that the default one would end the process by the signal; a handler that does nothing lets it exit 0
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        server(app, log_level=log_level).run(sockets=[sock])
    finally:
        sock.close()
        if main:
            signal.signal(signal.SIGTERM, before)
