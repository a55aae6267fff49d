"""Mixed-seed batches (rng.row_normal, Engine.sample_rows) and dd.Batcher: a merged batch gives every request
its solo result, on every backend; the queue's bounds, deadlines, cancellation, fairness and close."""

import asyncio
import copy
import threading
import time

import pytest
import torch

import ddim_fast as dd
from ddim_fast.checks import sample_shape
from tests.helpers import assert_close_to_reference

SEEDS = [3, 7, 3, 2**62 + 5]
INDICES = [0, 5, 1, 9]


def _solo(eng, plan=None, seeds=SEEDS, indices=INDICES, **kw):
    return torch.cat([eng.sample(1, s, first_index=i, plan=plan, **kw) for s, i in zip(seeds, indices)])


def _truth(model, plan, seeds=SEEDS, indices=INDICES):
    """The float64 reference of each row alone, from the same keyed noise."""
    shape = sample_shape(model, None)
    m = copy.deepcopy(model).double()
    rows = []
    for s, i in zip(seeds, indices):
        x_T = dd.rng.initial_noise(s, (1, *shape), first_index=i).double()
        rows.append(dd.sample(m, x_T, plan, seed=s, first_index=i).clamp(-1, 1))
    return torch.cat(rows)


def test_row_normal_is_each_rows_own_stream():
    shape = (2, 3, 5)
    got = dd.rng.row_normal(SEEDS, INDICES, shape, step=4, purpose=dd.rng.PURPOSE_STEP)
    want = torch.cat([dd.rng.step_noise(s, 4, (1, *shape), first_index=i) for s, i in zip(SEEDS, INDICES)])
    assert torch.equal(got, want)
    x_T = dd.rng.row_normal(SEEDS, INDICES, shape, step=0, purpose=dd.rng.PURPOSE_XT)
    assert torch.equal(x_T[1:2], dd.rng.initial_noise(7, (1, *shape), first_index=5))
    with pytest.raises(ValueError, match="one length"):
        dd.rng.row_normal([1, 2], [0], shape, step=0, purpose=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        dd.rng.row_normal([-1], [0], shape, step=0, purpose=0)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("unipc", 0.0), ("dpmpp_2m_sde", 0.0)])
def test_sample_rows_gives_each_row_its_solo_image_reference(tiny, sampler, eta):
    """Reference backend: to the tolerance rule (its convolutions are not bitwise batch-invariant)."""
    plan = dd.SamplingPlan.build(tiny.schedule, 4, eta=eta, sampler=sampler)
    eng = dd.Engine(tiny, plan, backend="reference", device="cpu")
    rows = eng.sample_rows(SEEDS, INDICES)
    solo = _solo(eng)
    assert_close_to_reference(rows, solo, _truth(tiny, plan), torch.float32, f"rows {sampler} eta={eta}")
    assert not torch.equal(rows[0], rows[2])  # same seed, other index: another image


@pytest.mark.parametrize("sampler,eta", [("ddim", 1.0), ("dpmpp_2m_sde", 0.0), ("unipc", 0.0)])
def test_sample_rows_is_bitwise_solo_on_onnxruntime(onnx_tiny, onnx_cache_env, sampler, eta):
    """ONNX Runtime on a CPU is batch-invariant bit for bit: a merged batch is bitwise each request alone."""
    pytest.importorskip("onnxruntime")
    plan = dd.SamplingPlan.build(onnx_tiny.schedule, 4, eta=eta, sampler=sampler)
    eng = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    assert torch.equal(eng.sample_rows(SEEDS, INDICES), _solo(eng))


def test_sample_rows_on_triton_interpreter(tiny):
    """The triton backend takes the rows' host noise (noise=) where its kernel would draw a single seed's."""
    pytest.importorskip("triton")
    plan = dd.SamplingPlan.build(tiny.schedule, 2, eta=0.8)  # the interpreter is slow: 2 steps, 2 rows
    eng = dd.Engine(tiny, plan, backend="triton", device="cpu")
    seeds, indices = [4, 9], [1, 0]
    got = eng.sample_rows(seeds, indices)
    low = _solo(dd.Engine(tiny, plan, backend="reference", device="cpu"), seeds=seeds, indices=indices)
    assert_close_to_reference(got, low, _truth(tiny, plan, seeds, indices), torch.float32, "triton rows")


@pytest.mark.gpu
def test_sample_rows_on_cuda_graph(tiny):
    plan = dd.SamplingPlan.build(tiny.schedule, 10, eta=0.5)
    eng = dd.Engine(tiny, plan, backend="cuda_graph", device="cuda")
    got = eng.sample_rows(SEEDS, INDICES).cpu()
    low = _solo(dd.Engine(tiny, plan, backend="reference", device="cuda")).cpu()
    assert_close_to_reference(got, low, _truth(tiny, plan), torch.float32, "cuda_graph rows")


def test_sample_rows_with_per_row_labels_and_guidance():
    model = dd.load_model("digits-cond")
    plan = dd.SamplingPlan.build(model.schedule, 3)
    eng = dd.Engine(model, plan, backend="reference", device="cpu")
    y = torch.tensor([1, 4, 7, 2])
    rows = eng.sample_rows(SEEDS, INDICES, cond={"class_labels": y}, guidance=2.0)
    solo = torch.cat([eng.sample(1, s, first_index=i, cond={"class_labels": y[k:k + 1]}, guidance=2.0)
                      for k, (s, i) in enumerate(zip(SEEDS, INDICES))])
    assert (rows - solo).abs().max().item() < 1e-4


# -- the Batcher ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ort_engine(onnx_tiny, onnx_cache):
    pytest.importorskip("onnxruntime")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDIM_FAST_CACHE", str(onnx_cache))
        plan = dd.SamplingPlan.build(onnx_tiny.schedule, 3, eta=0.5)
        yield dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")


class _Slow:
    """An engine stand-in's wrapper: each sampling call waits for `gate` (to hold the worker busy)."""

    def __init__(self, eng):
        self.eng, self.gate, self.calls = eng, threading.Event(), []

    def __call__(self, seeds, indices, **kw):
        self.calls.append(len(seeds))
        assert self.gate.wait(30)
        return self.eng.__class__.sample_rows(self.eng, seeds, indices, **kw)


def test_batcher_merges_concurrent_requests_bitwise(ort_engine):
    b = dd.Batcher(ort_engine, max_batch=8, max_wait_ms=200)
    requests = [(1, 3, 0), (2, 7, 4), (3, 3, 1), (2, 11, 0)]
    futs = [b.submit(n, s, first_index=i) for n, s, i in requests]
    outs = [f.result(60) for f in futs]
    b.close()
    assert b.batches == 1 and b.rows_run == 8  # one sampling call for all four
    for (n, s, i), out in zip(requests, outs):
        assert out.shape == (n, 3, 16, 16) and out.device.type == "cpu"
        assert torch.equal(out, ort_engine.sample(n, s, first_index=i))


def test_batcher_from_threads_and_asyncio(ort_engine):
    b = dd.Batcher(ort_engine, max_batch=4, max_wait_ms=5)
    results = {}

    def client(k):
        results[k] = b.submit(1 + k % 3, seed=k).result(60)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    async def many():
        return await asyncio.gather(*(b.asubmit(2, seed=100 + k) for k in range(3)))

    aouts = asyncio.run(many())
    b.close()
    for k in range(8):
        assert torch.equal(results[k], ort_engine.sample(1 + k % 3, k))
    for k, out in enumerate(aouts):
        assert torch.equal(out, ort_engine.sample(2, 100 + k))
    assert b.rows_run == sum(1 + k % 3 for k in range(8)) + 6 and b.queued_rows == 0


def test_different_plans_and_guidance_queue_apart(ort_engine, onnx_tiny):
    other = dd.SamplingPlan.build(onnx_tiny.schedule, 2)
    b = dd.Batcher(ort_engine, max_batch=8, max_wait_ms=100)
    f1, f2, f3 = b.submit(1, 1), b.submit(1, 2, plan=other), b.submit(1, 3)
    out2 = f2.result(60)
    f1.result(60), f3.result(60)
    b.close()
    assert b.batches == 2  # the two default-plan requests together, the other plan alone
    assert torch.equal(out2, ort_engine.sample(1, 2, plan=other))


def test_bad_requests_are_refused_at_submit(ort_engine):
    b = dd.Batcher(ort_engine, max_batch=4, max_queue=8)
    for kw, match in [({"n": 0}, "n must be"), ({"n": 5}, "more than max_batch=4"),
                      ({"n": 1, "seed": -1}, "seed must be"), ({"n": 1, "timeout_s": 0}, "timeout_s"),
                      ({"n": 1, "guidance": float("nan")}, "guidance"),
                      ({"n": 1, "cond": {"class_labels": torch.tensor([1])}}, "does not take")]:
        with pytest.raises(ValueError, match=match):
            b.submit(**kw)
    assert b.queued_rows == 0
    b.close()
    with pytest.raises(dd.BatcherClosed):
        b.submit(1)
    for kw, match in [({"max_batch": 0}, "max_batch"), ({"max_wait_ms": -1}, "max_wait_ms"),
                      ({"max_batch": 8, "max_queue": 4}, "max_queue")]:
        with pytest.raises(ValueError, match=match):
            dd.Batcher(ort_engine, **kw)


def test_full_queue_deadline_cancel_and_drain(ort_engine, monkeypatch):
    slow = _Slow(ort_engine)
    monkeypatch.setattr(ort_engine, "sample_rows", slow)
    b = dd.Batcher(ort_engine, max_batch=2, max_wait_ms=0, max_queue=4)
    running = b.submit(2, 1)  # the worker takes it and blocks on the gate
    t0 = time.monotonic()
    while not slow.calls and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert slow.calls == [2]
    queued = b.submit(2, 2)
    late = b.submit(1, 3, timeout_s=0.05)
    t1 = time.perf_counter()
    with pytest.raises(dd.QueueFull, match="3 of 4 rows, no room for 2"):
        b.submit(2, 4)
    assert time.perf_counter() - t1 < 0.5  # answered at once, not after the running batch
    with pytest.raises(dd.DeadlineExceeded):
        late.result(10)  # expired in the queue while the worker was busy
    assert b.queued_rows == 2
    gone = b.submit(2, 5)
    assert gone.cancel() and b.queued_rows == 2  # a cancelled request leaves the queue at once
    slow.gate.set()
    b.close(drain=True)  # finishes the accepted, uncancelled requests
    assert torch.equal(running.result(1), ort_engine.sample(2, 1))
    assert torch.equal(queued.result(1), ort_engine.sample(2, 2))
    assert slow.calls == [2, 2]  # the cancelled and the late request never ran


def test_close_without_drain_fails_the_queue(ort_engine, monkeypatch):
    slow = _Slow(ort_engine)
    monkeypatch.setattr(ort_engine, "sample_rows", slow)
    b = dd.Batcher(ort_engine, max_batch=1, max_wait_ms=0)
    first = b.submit(1, 1)
    while not slow.calls:
        time.sleep(0.01)
    waiting = b.submit(1, 2)
    closer = threading.Thread(target=b.close, kwargs={"drain": False})
    closer.start()
    with pytest.raises(dd.BatcherClosed):
        waiting.result(10)
    slow.gate.set()
    closer.join(30)
    assert first.result(1).shape == (1, 3, 16, 16) and slow.calls == [1]


def test_an_engine_error_reaches_every_request_and_the_worker_goes_on(ort_engine, monkeypatch):
    calls = []

    def broken(seeds, indices, **kw):
        calls.append(len(seeds))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return ort_engine.__class__.sample_rows(ort_engine, seeds, indices, **kw)

    monkeypatch.setattr(ort_engine, "sample_rows", broken)
    b = dd.Batcher(ort_engine, max_batch=4, max_wait_ms=100)
    a, c = b.submit(1, 1), b.submit(2, 2)
    for f in (a, c):
        with pytest.raises(RuntimeError, match="boom"):
            f.result(30)
    assert b.submit(1, 3).result(30).shape == (1, 3, 16, 16)
    b.close()


def test_a_busy_group_does_not_starve_another(ort_engine, onnx_tiny):
    """Group A always has a full batch waiting; B's lone request still runs within a few batches."""
    other = dd.SamplingPlan.build(onnx_tiny.schedule, 2)
    b = dd.Batcher(ort_engine, max_batch=2, max_wait_ms=1, max_queue=64)
    order = []
    b.on_batch = lambda rows, reqs, s: order.append(rows)
    flood = [b.submit(2, k) for k in range(6)]
    lone = b.submit(1, 99, plan=other)
    flood += [b.submit(2, 10 + k) for k in range(6)]
    lone.result(60)
    done_before = sum(f.done() for f in flood)
    for f in flood:
        f.result(60)
    b.close()
    assert done_before <= 7  # it ran after the requests older than it, before the later flood
