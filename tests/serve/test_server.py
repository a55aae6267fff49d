"""ddim_fast/serve.py and `ddim-fast serve`: every image equals Engine.sample of its request alone (bitwise on
onnxruntime, where a sample does not depend on its batch, also when requests from several threads are merged;
plan files and tuned plans served by name included), every bad request gets 400 (413 for n > max_n) with
one message, overload 503 with Retry-After at once, a request past its deadline 504, a client that
disconnects has its rows dropped, /ready follows the warm-up, /metrics has its series, and SIGTERM on the
command finishes the request in flight and exits 0.

The server runs in-process (uvicorn in a thread, 127.0.0.1, a free port) around the bundled digits model
with a 3-step plan (onnxruntime where images are compared, else the reference backend); the engine is
slowed by a gate where a test needs a busy server."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import ddim_fast as dd  # noqa: E402
from ddim_fast import serve as sv  # noqa: E402
from ddim_fast.batcher import Batcher  # noqa: E402
from ddim_fast.images import to_uint8  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.fixture(scope="module")
def model():
    return dd.load_model("digits")


@pytest.fixture(scope="module")
def plan(model):
    return dd.SamplingPlan.for_model(model, STEPS)


@pytest.fixture(scope="module")
def solo(model, plan):
    """An Engine of its own for the solo results the server's images must equal: on onnxruntime, where a
    sample is bitwise the same at any batch size (on the reference backend a batch of 1 and one of 3 differ
    by float32 rounding, ~1e-6), so a merged batch must give each request exactly its solo images."""
    pytest.importorskip("onnxruntime")
    return dd.Engine(model, plan, backend="onnxruntime", device="cpu")


class Gate:
    """Holds the engine's batches until opened (a busy server on demand); counts the batches it let through."""

    def __init__(self, eng, open_=True):
        self.event, self.calls, self.rows = threading.Event(), 0, 0
        if open_:
            self.event.set()
        run = eng.sample_rows

        def gated(seeds, *a, **k):
            self.calls += 1
            self.rows += len(seeds)
            assert self.event.wait(30), "the test never opened the gate"
            return run(seeds, *a, **k)

        eng.sample_rows = gated

    def open(self):
        self.event.set()


@contextmanager
def running(model, plan, *, max_batch=16, max_wait_ms=5.0, max_queue=64, gate_open=True, warmup=True,
            backend="reference", **app_kw):
    """(port, batcher, app, gate): a server on 127.0.0.1 in a thread; stopped (and the batcher drained) after."""
    eng = dd.Engine(model, plan, backend=backend, device="cpu")
    gate = Gate(eng, gate_open)
    batcher = Batcher(eng, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    app_kw.setdefault("max_n", min(max_batch, 8))
    app = sv.make_app(batcher, model=model, default_timeout_s=app_kw.pop("default_timeout_s", 30.0),
                      warmup=warmup, **app_kw)
    sock = sv.bind("127.0.0.1", 0)
    server = sv.server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        yield sock.getsockname()[1], batcher, app, gate
    finally:
        gate.open()
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


def call(port, method, path, body=None, timeout=60):
    """(status, headers, parsed JSON or text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        raw = r.read()
        kind = r.getheader("Content-Type", "")
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw) if "json" in kind else raw.decode()
    finally:
        conn.close()


def generate(port, body, timeout=60):
    return call(port, "POST", "/v1/images/generations", body, timeout)


def wait_ready(port, timeout=30):
    deadline = time.time() + timeout
    while call(port, "GET", "/ready")[0] != 200:
        assert time.time() < deadline, "never ready"
        time.sleep(0.02)


def wait_for(cond, timeout=20, what="condition"):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def npy_images(reply) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.load(io.BytesIO(base64.b64decode(d["b64_npy"])))) for d in reply["data"]])


def png_images(reply) -> np.ndarray:
    from PIL import Image

    return np.stack([np.array(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in reply["data"]])


def metric(app, name, **labels) -> float:
    value = app.state.metrics["registry"].get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# -- exactness -------------------------------------------------------------------------------------------
def test_png_and_npy_replies_are_the_solo_samples(model, plan, solo):
    with running(model, plan, backend="onnxruntime") as (port, batcher, app, _):
        wait_ready(port)
        status, _, reply = generate(port, {"n": 3, "seed": 7, "response_format": "npy"})
        assert status == 200 and reply["seed"] == 7 and len(reply["data"]) == 3
        assert abs(reply["created"] - time.time()) < 60
        got = npy_images(reply)
        want = solo.sample(3, seed=7)
        assert got.dtype == torch.float32 and got.shape == (3, 1, 16, 16)
        assert torch.equal(got, want)  # bitwise: noise keyed by (seed, index), whatever the batch
        status, _, reply = generate(port, {"n": 2, "seed": 7})  # PNG by default: the first 2 of the same seed
        assert status == 200 and list(reply["data"][0]) == ["b64_json"]
        assert np.array_equal(png_images(reply), to_uint8(want[:2])[..., 0])
        status, _, reply = generate(port, {})  # n = 1, a random seed, echoed: it reproduces the image
        assert status == 200 and 0 <= reply["seed"] < 2**63 and len(reply["data"]) == 1
        again = generate(port, {"seed": reply["seed"]})[2]
        assert again["data"] == reply["data"]
        # a plan built from steps/sampler/eta: the same as an Engine call with that plan; equal requests share it
        body = {"n": 2, "seed": 3, "steps": 4, "sampler": "unipc", "response_format": "npy"}
        got = npy_images(generate(port, body)[2])
        other = dd.SamplingPlan.for_model(model, 4, sampler="unipc")
        assert torch.equal(got, solo.sample(2, seed=3, plan=other))
        assert generate(port, body)[0] == 200 and len(app.state.plans.built) == 1
        body = {"n": 2, "seed": 5, "eta": 1.0, "response_format": "npy"}  # eta > 0 draws step noise per row too
        got = npy_images(generate(port, body)[2])
        assert torch.equal(got, solo.sample(2, seed=5, plan=dd.SamplingPlan.for_model(model, STEPS, eta=1.0)))
        named = npy_images(generate(port, {"n": 1, "seed": 7, "plan": "default", "response_format": "npy"})[2])
        assert torch.equal(named, want[:1])


def test_concurrent_requests_are_merged_and_each_is_its_solo_result(model, plan, solo):
    jobs = [(1, 1), (2, 3), (3, 2), (2**63 - 1, 1), (11, 4), (12, 2), (13, 1), (14, 2)]  # (seed, n): 16 rows
    with running(model, plan, max_wait_ms=150, gate_open=False, warmup=False,
                 backend="onnxruntime") as (port, batcher, app, gate):
        results = {}

        def client(seed, n):
            results[seed] = generate(port, {"n": n, "seed": seed, "response_format": "npy"})

        threads = [threading.Thread(target=client, args=job) for job in jobs]
        for t in threads:
            t.start()
        wait_for(lambda: batcher.queued_rows + gate.rows == sum(n for _, n in jobs), what="every request queued")
        gate.open()
        for t in threads:
            t.join(60)
        batches = metric(app, "ddim_fast_batch_rows_count")
        rows = metric(app, "ddim_fast_batch_rows_sum")
    assert rows == sum(n for _, n in jobs)
    assert batches < len(jobs)  # merged: fewer sampling calls than requests
    for seed, n in jobs:
        status, _, reply = results[seed]
        assert status == 200 and reply["seed"] == seed
        assert torch.equal(npy_images(reply), solo.sample(n, seed=seed))


# -- bad requests ----------------------------------------------------------------------------------------
BAD = [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": "a digit"}, 400, "unknown field 'prompt'"),
    ({"n": 0}, 400, "n must be an integer >= 1"),
    ({"n": "2"}, 400, "n must be an integer"),
    ({"n": 1.5}, 400, "n must be an integer"),
    ({"n": True}, 400, "n must be an integer"),
    ({"n": 9}, 413, "max_n = 8"),
    ({"seed": -1}, 400, "seed must be in [0, 2**63)"),
    ({"seed": 2**63}, 400, "seed must be in [0, 2**63)"),
    ({"seed": "7"}, 400, "seed must be an integer"),
    ({"steps": 0}, 400, "steps must be in [1, 1000]"),
    ({"steps": 1001}, 400, "steps must be in [1, 1000]"),
    ({"steps": 2.0}, 400, "steps must be an integer"),
    ({"sampler": "euler"}, 400, "unknown sampler"),
    ({"eta": -0.5}, 400, "eta must be a finite number >= 0"),
    ({"eta": "1"}, 400, "eta must be a finite number >= 0"),
    ({"eta": 0.5, "sampler": "unipc"}, 400, "eta"),
    ({"plan": "fast"}, 400, "plan 'fast' is not loaded here"),
    ({"plan": "default", "steps": 5}, 400, "either plan or steps"),
    ({"response_format": "url"}, 400, "response_format must be one of"),
    ({"class_label": 3}, 400, "class_label applies to a class-conditional model"),
    ({"guidance": 2.0}, 400, "guidance needs class_label"),
    ({"user": 5}, 400, "user must be a string"),
]


def test_every_bad_request_gets_one_clear_message(model, plan):
    with running(model, plan) as (port, batcher, app, gate):
        wait_ready(port)
        calls = gate.calls
        for body, status, fragment in BAD:
            got, _, reply = generate(port, body)
            assert got == status, (body, reply)
            msg = reply["error"]["message"]
            assert fragment in msg and "\n" not in msg, (body, msg)
            assert reply["error"]["type"] == "invalid_request_error"
        nonfinite = b'{"guidance": NaN, "class_label": 1}'  # Python's json reads NaN: refused all the same
        assert generate(port, nonfinite)[0] == 400
        assert gate.calls == calls  # nothing reached the engine
        assert metric(app, "ddim_fast_rejections_total", reason="too_large") == 1
        assert metric(app, "ddim_fast_rejections_total", reason="bad_request") == len(BAD)  # the 413 apart, and NaN
        assert metric(app, "ddim_fast_request_seconds_count", status="400") == len(BAD)


def test_class_labels_and_guidance_on_the_conditional_model():
    cm = dd.load_model("digits-cond")
    plan = dd.SamplingPlan.for_model(cm, STEPS)
    solo = dd.Engine(cm, plan, backend="reference", device="cpu")
    with running(cm, plan) as (port, *_):
        wait_ready(port)
        for bad, fragment in [({"class_label": 11}, "in [0, 10]"), ({"class_label": [1, 2], "n": 3}, "list of n = 3"),
                              ({"class_label": 1, "guidance": "2"}, "guidance must be a finite number")]:
            status, _, reply = generate(port, bad)
            assert status == 400 and fragment in reply["error"]["message"]
        body = {"n": 3, "seed": 4, "class_label": [3, 5, 10], "guidance": 2.0, "response_format": "npy"}
        status, _, reply = generate(port, body)
        assert status == 200
        want = solo.sample(3, seed=4, cond={"class_labels": torch.tensor([3, 5, 10])}, guidance=2.0)
        assert torch.equal(npy_images(reply), want)


# -- overload, deadline, disconnect, readiness -----------------------------------------------------------------
def test_a_full_queue_gets_503_with_retry_after_at_once(model, plan):
    with running(model, plan, max_batch=1, max_queue=2, max_wait_ms=0, gate_open=False, warmup=False,
                 max_n=1) as (port, batcher, app, gate):
        results = []
        first = threading.Thread(target=lambda: results.append(generate(port, {"seed": 0})))
        first.start()
        wait_for(lambda: gate.calls == 1, what="the first batch")  # running, held by the gate
        queued = [threading.Thread(target=lambda s=s: results.append(generate(port, {"seed": s}))) for s in (1, 2)]
        for t in queued:
            t.start()
        wait_for(lambda: batcher.queued_rows == 2, what="a full queue")
        t0 = time.perf_counter()
        status, headers, reply = generate(port, {"seed": 3})
        assert time.perf_counter() - t0 < 2.0  # at once, while the engine is held
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert "queue is full" in reply["error"]["message"]
        assert metric(app, "ddim_fast_rejections_total", reason="queue_full") == 1
        gate.open()
        for t in (first, *queued):
            t.join(60)
        assert sorted(r[0] for r in results) == [200, 200, 200]
        assert metric(app, "ddim_fast_queued_rows") == 0


def test_a_request_past_its_deadline_gets_504(model, plan):
    with running(model, plan, max_batch=1, max_wait_ms=0, gate_open=False, warmup=False, max_n=1,
                 default_timeout_s=0.3) as (port, batcher, app, gate):
        results = []
        first = threading.Thread(target=lambda: results.append(generate(port, {"seed": 0})))
        first.start()
        wait_for(lambda: gate.calls == 1, what="the first batch")
        late = threading.Thread(target=lambda: results.append(generate(port, {"seed": 1})))
        late.start()
        wait_for(lambda: batcher.queued_rows == 1, what="the second request queued")
        time.sleep(0.5)  # past its 0.3 s deadline while the first batch holds the engine
        gate.open()
        first.join(60)
        late.join(60)
        by_status = {r[0]: r[2] for r in results}
        assert sorted(by_status) == [200, 504]
        assert "deadline of 0.3 s" in by_status[504]["error"]["message"]
        assert metric(app, "ddim_fast_rejections_total", reason="deadline") == 1
        assert gate.calls == 1  # the expired request never ran


def test_a_client_that_disconnects_has_its_rows_dropped(model, plan):
    with running(model, plan, max_batch=4, max_wait_ms=0, gate_open=False, warmup=False,
                 max_n=4) as (port, batcher, app, gate):
        first = threading.Thread(target=lambda: generate(port, {"seed": 0}))
        first.start()
        wait_for(lambda: gate.calls == 1, what="the first batch")
        body = json.dumps({"n": 3, "seed": 9}).encode()
        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: batcher.queued_rows == 3, what="the request queued")
        raw.close()  # the client goes away while its rows wait
        wait_for(lambda: batcher.queued_rows == 0, what="its rows dropped")
        wait_for(lambda: metric(app, "ddim_fast_rejections_total", reason="disconnect") == 1, what="the counter")
        gate.open()
        first.join(60)
        time.sleep(0.1)
        assert gate.calls == 1  # the dropped rows never ran
        assert metric(app, "ddim_fast_batch_rows_sum") == 1


def test_a_failed_batch_is_a_json_500_and_the_server_goes_on(model, plan):
    with running(model, plan, warmup=False) as (port, batcher, app, gate):
        run = batcher.engine.sample_rows

        def fail_once(*a, **k):
            batcher.engine.sample_rows = run
            raise RuntimeError("the network broke\nsecond line")

        batcher.engine.sample_rows = fail_once
        status, _, reply = generate(port, {"seed": 1})
        assert status == 500 and reply["error"] == {"message": "sampling failed: RuntimeError: the network broke",
                                                    "type": "server_error"}
        assert generate(port, {"seed": 1})[0] == 200
        assert metric(app, "ddim_fast_rejections_total", reason="server_error") == 1


def test_ready_only_after_warm_up_and_metrics_series(model, plan):
    with running(model, plan, gate_open=False) as (port, batcher, app, gate):
        assert call(port, "GET", "/health")[0] == 200
        status, headers, reply = call(port, "GET", "/ready")
        assert status == 503 and reply["status"] == "warming up" and "retry-after" in headers
        status, headers, reply = generate(port, {"seed": 1})
        assert status == 503 and "warming up" in reply["error"]["message"] and "retry-after" in headers
        gate.open()
        wait_ready(port)
        assert generate(port, {"n": 2, "seed": 1})[0] == 200
        status, headers, text = call(port, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        for series in ('ddim_fast_request_seconds_bucket{le="0.005",status="200"}', "ddim_fast_queued_rows 0.0",
                       'ddim_fast_batch_rows_bucket{le="2.0"}', 'ddim_fast_rejections_total{reason="queue_full"} 0.0',
                       'ddim_fast_rejections_total{reason="not_ready"} 1.0', "ddim_fast_images_total 2.0"):
            assert series in text, series
        assert re.search(r'ddim_fast_request_seconds_count\{status="200"\} 1\.0', text)
        assert re.search(r"ddim_fast_batch_rows_count 2\.0", text)  # the warm-up's batch and the request's


def test_apps_keep_their_own_metrics(model, plan):
    eng = dd.Engine(model, plan, backend="reference", device="cpu")
    with Batcher(eng) as b:
        one, two = sv.make_app(b, model=model), sv.make_app(b, model=model)
        assert one.state.metrics["registry"] is not two.state.metrics["registry"]
        with pytest.raises(ValueError, match="max_n"):
            sv.make_app(b, max_n=0)


# -- the command -------------------------------------------------------------------------------------------
def test_cli_checks_arguments_before_the_model_loads(capsys):
    from ddim_fast.cli import main

    for argv, fragment in [(["--max-n", "32"], "--max-n (32) must be <= --max-batch (16)"),
                           (["--port", "70000"], "--port must be in [0, 65535]"),
                           (["--timeout", "0"], "--timeout must be"),
                           (["--max-queue", "4"], "--max-queue must be >= 16"),
                           (["--steps", "1001"], "1000")]:
        assert main(["serve", "--model", "digits", *argv]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err


def test_cli_serves_a_plan_file_by_its_name_and_tuned_plans(model, plan, solo, tmp_path, monkeypatch):
    """`--plan FILE` serves the file's plan as "default" and by the file's stem, `--plan tuned` as "tuned";
    a request naming it gets Engine.sample with that plan, bitwise."""
    from ddim_fast.cli import main

    served = []
    monkeypatch.setattr(sv, "serve", lambda batcher, **kw: served.append((batcher, kw)))  # no uvicorn, no port
    fast = dd.SamplingPlan.for_model(model, 4, sampler="unipc", spacing="trailing")
    fast.save(tmp_path / "fast4.json")
    common = ["serve", "--model", "digits", "--port", "0", "--backend", "onnxruntime", "--device", "cpu"]
    assert main([*common, "--plan", str(tmp_path / "fast4.json")]) == 0
    assert main([*common, "--plan", "tuned", "--steps", "5"]) == 0
    (file_batcher, file_kw), (tuned_batcher, tuned_kw) = served
    assert sorted(file_kw["plans"]) == ["default", "fast4"] and sorted(tuned_kw["plans"]) == ["default", "tuned"]
    loaded = file_kw["plans"]["fast4"]
    assert loaded is file_kw["plans"]["default"] and torch.equal(loaded.coef, fast.coef)
    tuned = dd.SamplingPlan.for_model(model, 5, tuned=True)
    assert torch.equal(tuned_kw["plans"]["tuned"].coef, tuned.coef)
    for b in (file_batcher, tuned_batcher):
        b.close()
    plans = {**file_kw["plans"], "tuned": tuned_kw["plans"]["tuned"]}
    with running(model, plan, backend="onnxruntime", plans={**plans, "default": plan}) as (port, *_):
        wait_ready(port)
        for name, want_plan in (("fast4", fast), ("tuned", tuned)):
            status, _, reply = generate(port, {"n": 2, "seed": 11, "plan": name, "response_format": "npy"})
            assert status == 200, reply
            assert torch.equal(npy_images(reply), solo.sample(2, seed=11, plan=want_plan)), name


def test_cli_serves_and_sigterm_finishes_the_request_in_flight(model, plan):
    solo = dd.Engine(model, plan, backend="reference", device="cpu")  # the server's backend, the request's size
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "ddim_fast.cli", "serve", "--port", "0", "--steps", str(STEPS),
                             "--backend", "reference", "--device", "cpu", "--max-wait-ms", "1500", "--no-progress"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines, url = [], None
        deadline = time.time() + 60
        while url is None:
            line = proc.stderr.readline()
            assert line and time.time() < deadline, "".join(lines)
            lines.append(line)
            m = re.match(r"serving on http://127\.0\.0\.1:(\d+)$", line.strip())
            url = m and int(m.group(1))
        port = url
        assert call(port, "GET", "/ready")[0] == 200
        result = []
        client = threading.Thread(target=lambda: result.append(
            generate(port, {"n": 4, "seed": 21, "response_format": "npy"})))
        client.start()
        # the request waits up to 1.5 s for others to join: SIGTERM lands while it is queued
        wait_for(lambda: "ddim_fast_queued_rows 4.0" in call(port, "GET", "/metrics")[2], what="the request queued")
        proc.send_signal(signal.SIGTERM)
        client.join(60)
        assert proc.wait(60) == 0
        status, _, reply = result[0]
        assert status == 200 and torch.equal(npy_images(reply), solo.sample(4, seed=21))
        rest = proc.stderr.read()
        assert "every accepted request was answered" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
