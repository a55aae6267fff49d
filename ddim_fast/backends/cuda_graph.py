"""backend="cuda_graph": the triton backend's whole S-step loop (UNet + step, every step) captured
into one CUDA graph and replayed: one launch per sampling call instead of hundreds.

A graph is captured once per (batch, plan (by content: plans may be given per call), start, noise source,
conditioning inputs' names and shapes, guided or not) and kept in a small LRU cache (max_graphs).
Two starts: from the seed (`sample`: x_T drawn by a kernel inside the graph) or from a given x_T
(`run`: copied into a static buffer). The seed and first_index live in (1,)
device tensors, so new values replay the same graph; so do the conditioning inputs (static buffers,
[uncond; cond] when guided) and the guidance scale (a (1,) float32 device tensor): new labels,
prompts or a new scale do not recapture. Capture first runs the loop once eagerly on
a side stream (Triton JIT, cuDNN algorithm search, allocator growth), then records it; all graphs
share one memory pool. Replays copy the result out, so a result the caller holds is never
overwritten by the next replay.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

from .base import plan_key, raise_if_flagged
from .triton import TritonBackend


class CudaGraphBackend(TritonBackend):
    name = "cuda_graph"
    summary = "whole-loop CUDA graph with Triton kernels"

    @classmethod
    def unavailable(cls, device):
        if device.type != "cuda":
            return f"the cuda_graph backend needs a CUDA device, got {device.type}"
        return TritonBackend.unavailable(device)  # it captures the triton backend's loop

    def __init__(self, model, plan, *, device, dtype, shape, channels_last=False, max_graphs=4):
        super().__init__(model, plan, device=device, dtype=dtype, shape=shape, channels_last=channels_last)
        self.max_graphs = max_graphs
        self.graphs = OrderedDict()  # key -> (graph, static buffers)
        self.pool = None
        self.captures = 0

    @torch.no_grad()
    def run(self, x, plan, *, seed, noise, first_index, cond=None):
        return self._replay(x.shape, plan, x, seed, noise, first_index, cond)

    @torch.no_grad()
    def sample(self, batch, plan, *, seed, first_index, cond=None):
        return self._replay((batch, *self.shape), plan, None, seed, None, first_index, cond)

    def _replay(self, shape, plan, x_T, seed, noise, first_index, cond=None):
        inputs, w = self.conditioning(cond)
        key = (tuple(shape), plan_key(plan), x_T is None, noise is not None,
               None if cond is None else cond.signature())
        if key not in self.graphs:
            self._capture(key, shape, plan, x_T, seed, noise, first_index, inputs, w)
        self.graphs.move_to_end(key)
        graph, buf = self.graphs[key]
        buf["seed"].fill_(seed)
        buf["first"].fill_(first_index)
        buf["flag"].zero_()
        for k, v in (inputs or {}).items():  # new labels / prompts: copied into the static buffers
            buf["cond"][k].copy_(v)
        if w is not None:
            buf["w"].copy_(w)  # a new guidance scale: the same graph
        if x_T is not None:
            buf["x_T"].copy_(x_T)
        if noise is not None:
            buf["noise"].copy_(noise)
        graph.replay()
        raise_if_flagged(buf["flag"], self.name)
        return buf["x"].clone()  # a copy: the next replay overwrites buf["x"]

    def _capture(self, key, shape, plan, x_T, seed, noise, first_index, inputs=None, w=None):
        dev = self.device
        buf = {
            "x": torch.empty(shape, device=dev),
            "seed": torch.full((1,), seed, dtype=torch.int64, device=dev),
            "first": torch.full((1,), first_index, dtype=torch.int64, device=dev),
            "flag": torch.zeros(1, dtype=torch.int32, device=dev),
        }
        if x_T is not None:
            buf["x_T"] = x_T.clone()
        if noise is not None:
            buf["noise"] = noise.clone()
        buf["cond"] = {k: v.clone() for k, v in (inputs or {}).items()}  # the network's (doubled) inputs
        buf["w"] = w.clone() if w is not None else None  # (1,) float32: the guidance scale on the device
        buf["tables"] = self.tables(plan)  # the plan's device tables live as long as the graph that reads them

        def body():
            if x_T is None:
                self.initial_noise(buf["x"], buf["seed"], buf["first"])
            else:
                buf["x"].copy_(buf["x_T"])
            self.loop(buf["x"], plan, buf["seed"], buf["first"], buf.get("noise"), buf["flag"], buf["cond"],
                      buf["w"])

        warm_up(body, self.device)
        self.graphs[key] = (self._record(body), buf)
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    # The capture itself; on a CPU the dry run and the tests replace it and warm_up (benchmarks/fake_cuda.py).
    def _record(self, body):
        """Capture body() into a CUDA graph allocated from the pool all graphs share."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            body()
        return graph


def warm_up(body, device):
    """Run body() once on a side stream before capture: Triton JIT, cuDNN algorithm search, allocator growth."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), cudnn_algorithm_search():
        body()
    torch.cuda.current_stream(device).wait_stream(side)


@contextlib.contextmanager
def cudnn_algorithm_search():
    """cuDNN's algorithm search (cudnn.benchmark) on for the duration, unless the caller asked for
    determinism; every other cuDNN / TF32 setting (enabled, deterministic, allow_tf32) stays the
    caller's. (torch.backends.cudnn.flags() would reset the ones it is not given to its defaults.)"""
    cudnn = torch.backends.cudnn
    before = cudnn.benchmark
    if not (cudnn.deterministic or torch.are_deterministic_algorithms_enabled()):
        cudnn.benchmark = True
    try:
        yield
    finally:
        cudnn.benchmark = before
