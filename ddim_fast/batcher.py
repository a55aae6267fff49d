"""Dynamic batching that changes no image: concurrent requests merged into one sampling call.

    b = dd.Batcher(engine, max_batch=16, max_wait_ms=10)
    fut = b.submit(4, seed=7)                 # a concurrent.futures.Future of a (4, C, H, W) CPU tensor
    imgs = await b.asubmit(4, seed=7)         # the same from asyncio
    b.close()                                 # finishes what was accepted

Why merging is exact: a sample's noise is keyed by (seed, index) alone (ddim_fast.rng), so a batch of rows
from different requests (Engine.sample_rows) gives every request what `engine.sample(n, seed)` gives it
alone: bitwise on the backends that are batch-invariant bit for bit (ONNX Runtime on a CPU), to the
tolerance rule on the others (docs/DESIGN.md).

What is merged: requests with the same plan (by content), guidance scale and conditioning signature (input
names, per-sample shapes, dtypes) form a group; a group runs when it holds `max_batch` rows or its oldest
request has waited `max_wait_ms`. Among the groups that are due, the one whose oldest request is oldest runs
first, so no group waits behind another for long. A scheduler thread forms batches (and expires deadlines
while a batch runs); one runner thread calls the engine; submit() is thread-safe and never blocks on
sampling.

Bounds: at most `max_queue` rows wait (submit raises QueueFull at once beyond it); a request may carry a
deadline (timeout_s): not started by then, its future fails with DeadlineExceeded and it never runs; a
cancelled future (a client that went away) leaves the queue at once. close(drain=True) stops accepting
and finishes every accepted request; close(drain=False) fails the queued ones with BatcherClosed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import math
import queue
import threading
import time

import torch

from . import rng
from .backends.base import plan_key
from .checks import check, is_number, positive_int

log = logging.getLogger("ddim_fast")


class QueueFull(RuntimeError):
    """The queue holds max_queue rows: retry later (an HTTP server answers 503 with Retry-After)."""


class DeadlineExceeded(TimeoutError):
    """The request did not start within its timeout_s; it never ran."""


class BatcherClosed(RuntimeError):
    """The batcher is closed (or closing): it accepts no new requests."""


@dataclasses.dataclass(eq=False)
class _Request:
    n: int
    seed: int
    first_index: int
    cond: dict | None
    guidance: float | None
    plan: object
    key: tuple
    future: concurrent.futures.Future
    submitted: float
    deadline: float  # monotonic seconds; inf: none
    queued: bool = True


class Batcher:
    def __init__(self, engine_or_model, plan=None, *, max_batch: int = 16, max_wait_ms: float = 10.0,
                 max_queue: int = 256, backend: str = "auto", device=None):
        """engine_or_model: a dd.Engine, or a model (an Engine is built with plan, backend and device; plan
        is then required); plan: the requests' default plan (default: the engine's). max_batch: rows per
        sampling call; max_wait_ms: how long a request may wait for others to join it; max_queue: rows that
        may wait (>= max_batch)."""
        from .engine import Engine  # the engine imports torch's heavy parts; this module stays light

        positive_int("max_batch", max_batch)
        positive_int("max_queue", max_queue)
        check(is_number(max_wait_ms) and math.isfinite(max_wait_ms) and max_wait_ms >= 0,
              f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
        check(max_queue >= max_batch, f"max_queue ({max_queue}) must be >= max_batch ({max_batch}): "
                                      "a full batch must fit in the queue")
        if isinstance(engine_or_model, Engine):
            self.engine = engine_or_model
        else:
            check(plan is not None, "Batcher(model, plan): a plan is needed to build the Engine "
                                    "(or pass a dd.Engine)")
            self.engine = Engine(engine_or_model, plan, backend=backend, device=device)
        self.plan = self.engine._plan(plan)
        self.max_batch, self.max_queue, self.max_wait_s = int(max_batch), int(max_queue), max_wait_ms / 1e3
        self.on_batch = None  # fn(rows, requests, seconds), called by the runner thread after each batch
        self.batches = 0  # sampling calls made
        self.rows_run = 0  # rows they sampled
        self._groups: dict[tuple, collections.deque] = {}
        self._queued = 0
        self._closed = False
        self._cv = threading.Condition(threading.RLock())
        self._keys: dict[int, tuple] = {}  # id(plan) -> (plan, its content key), recent plans only
        self._busy = False  # the runner is sampling a batch
        self._batches: queue.Queue = queue.Queue()  # scheduler -> runner (at most one batch at a time)
        self._threads = [threading.Thread(target=self._schedule, name="ddim-fast-batcher-scheduler", daemon=True),
                         threading.Thread(target=self._runner, name="ddim-fast-batcher-runner", daemon=True)]
        for t in self._threads:
            t.start()

    # -- public -------------------------------------------------------------------------------------
    def submit(self, n: int, seed: int = 0, *, first_index: int = 0, cond: dict | None = None,
               guidance: float | None = None, plan=None, timeout_s: float | None = None
               ) -> concurrent.futures.Future:
        """Queue samples first_index .. first_index+n-1 of `seed`; the future's result is their (n, C, H, W)
        float32 CPU tensor in [-1, 1], what engine.sample(n, seed, ...) gives alone. Bad arguments raise
        ValueError here, a full queue QueueFull, a closed batcher BatcherClosed; the future fails with
        DeadlineExceeded when the request has not started within timeout_s."""
        from .engine import _check_first_index

        n = positive_int("n", n)
        check(n <= self.max_batch, f"n={n} is more than max_batch={self.max_batch}: split the request or raise "
                                   "max_batch")
        seed = rng.check_seed(seed)
        first_index = _check_first_index(first_index, n)
        if timeout_s is not None:
            check(is_number(timeout_s) and timeout_s > 0 and not math.isnan(timeout_s),
                  f"timeout_s must be > 0 or None, got {timeout_s!r}")
        plan = self.engine._plan(plan if plan is not None else self.plan)
        cc = self.engine._conditioning(n, cond, None, guidance)  # every conditioning error, now
        w = None if cc is None else cc.guidance
        signature = tuple(sorted((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in (cond or {}).items()))
        now = time.monotonic()
        fut = concurrent.futures.Future()
        req = _Request(n, seed, first_index, cond, w, plan, (self._plan_key(plan), w, signature), fut, now,
                       now + timeout_s if timeout_s is not None else math.inf)
        with self._cv:
            if self._closed:
                raise BatcherClosed("the batcher is closed: it accepts no new requests")
            if self._queued + n > self.max_queue:
                raise QueueFull(f"the queue holds {self._queued} of {self.max_queue} rows, no room for {n} more: "
                                "retry later")
            self._groups.setdefault(req.key, collections.deque()).append(req)
            self._queued += n
            self._cv.notify_all()
        fut.add_done_callback(lambda f, req=req: self._forget(req) if f.cancelled() else None)
        return fut

    async def asubmit(self, n: int, seed: int = 0, **kw) -> torch.Tensor:
        """submit() for asyncio: awaits the images; cancelling the awaiting task cancels the request (its
        rows leave the queue if it has not started)."""
        return await asyncio.wrap_future(self.submit(n, seed, **kw))

    @property
    def queued_rows(self) -> int:
        """Rows waiting to run."""
        return self._queued

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting. drain=True: run every queued request, then return; drain=False: fail the queued
        ones with BatcherClosed (a batch already running finishes). timeout: how long to wait for the threads."""
        with self._cv:
            self._closed = True
            if not drain:
                for group in self._groups.values():
                    for req in group:
                        req.queued = False
                        if req.future.set_running_or_notify_cancel():
                            req.future.set_exception(BatcherClosed("the batcher closed before this request ran"))
                self._groups.clear()
                self._queued = 0
            self._cv.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the worker ---------------------------------------------------------------------------------
    def _plan_key(self, plan) -> tuple:
        got = self._keys.get(id(plan))
        if got is None or got[0] is not plan:
            got = (plan, plan_key(plan))
            if len(self._keys) > 64:
                self._keys.clear()
            self._keys[id(plan)] = got
        return got[1]

    def _forget(self, req: _Request) -> None:
        """A cancelled request leaves the queue at once."""
        with self._cv:
            if req.queued:
                req.queued = False
                self._groups[req.key].remove(req)
                if not self._groups[req.key]:
                    del self._groups[req.key]
                self._queued -= req.n
                self._cv.notify_all()

    def _expire(self, now: float) -> float:
        """Fail the queued requests past their deadline; returns the next deadline (inf: none)."""
        nearest = math.inf
        for key in list(self._groups):
            group = self._groups[key]
            for req in [r for r in group if r.deadline <= now]:
                group.remove(req)
                req.queued = False
                self._queued -= req.n
                if req.future.set_running_or_notify_cancel():
                    req.future.set_exception(DeadlineExceeded(
                        f"the request waited {now - req.submitted:.3f} s, past its timeout; it did not run"))
            if group:
                nearest = min(nearest, min(r.deadline for r in group))
            else:
                del self._groups[key]
        return nearest

    def _next_batch(self) -> list[_Request] | None:
        """Wait until the runner is idle and a group is due, and take up to max_batch rows of it; None when
        closed and empty. Deadlines expire meanwhile, also while the runner is busy."""
        with self._cv:
            while True:
                now = time.monotonic()
                deadline = self._expire(now)
                if not self._groups:
                    if self._closed:
                        return None
                    self._cv.wait(None if deadline == math.inf else deadline - now)
                    continue
                due = [] if self._busy else [
                    (g[0].submitted, k) for k, g in self._groups.items()
                    if self._closed or sum(r.n for r in g) >= self.max_batch or now >= g[0].submitted + self.max_wait_s]
                if due:
                    break
                ready_at = math.inf if self._busy else (
                    min(g[0].submitted for g in self._groups.values()) + self.max_wait_s)
                wake = min(ready_at, deadline)
                self._cv.wait(None if wake == math.inf else max(0.0, wake - now))
            key = min(due)[1]
            group, batch, rows = self._groups[key], [], 0
            while group and rows + group[0].n <= self.max_batch:
                req = group.popleft()
                req.queued = False
                self._queued -= req.n
                if req.future.set_running_or_notify_cancel():
                    batch.append(req)
                    rows += req.n
            if not group:
                del self._groups[key]
            self._busy = bool(batch)
            return batch

    def _schedule(self) -> None:
        """The scheduler thread: forms batches and hands them to the runner, one at a time."""
        while True:
            batch = self._next_batch()
            if batch is None:
                self._batches.put(None)
                return
            if batch:
                self._batches.put(batch)

    def _runner(self) -> None:
        """The runner thread: the only caller of the engine."""
        while (batch := self._batches.get()) is not None:
            try:
                self._run(batch)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _run(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        try:
            seeds = [r.seed for r in batch for _ in range(r.n)]
            indices = [r.first_index + k for r in batch for k in range(r.n)]
            cond = None
            if batch[0].cond:
                cond = {k: torch.cat([torch.as_tensor(r.cond[k]).to(self.engine.device) for r in batch])
                        for k in batch[0].cond}
            out = self.engine.sample_rows(seeds, indices, cond=cond, guidance=batch[0].guidance,
                                          plan=batch[0].plan).cpu()
        except BaseException as e:  # the engine's error goes to every request of the batch
            for req in batch:
                req.future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        lo = 0
        for req in batch:
            req.future.set_result(out[lo:lo + req.n].clone())
            lo += req.n
        rows = lo
        self.batches += 1
        self.rows_run += rows
        if self.on_batch is not None:
            try:
                self.on_batch(rows, len(batch), time.perf_counter() - t0)
            except Exception:  # a metrics hook must not stop the runner
                log.exception("Batcher.on_batch failed")
