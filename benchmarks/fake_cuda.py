"""CUDA faked on a CPU, for the GPU suite's dry run (`python -m benchmarks.gpu_suite --dry-run`): it
tests the harness, not speed. Tensors stay on the CPU, Triton kernels run in the interpreter, graph
capture becomes replay of the captured body, torch.compile is the identity. The CPU tests of the
cuda_graph backend fake its capture with the same pieces (replay_graphs, cuda_graph_on_cpu), through
pytest's monkeypatch.setattr, so they check what the dry run runs.

Nothing is imported until a function runs: install() sets TRITON_INTERPRET before ddim_fast's
kernels are imported.
"""

from __future__ import annotations

import os


class ReplayedGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() runs the captured body again, eagerly. The graph
    cache, static buffers and copies run as on a GPU; the real capture is the GPU tier's."""

    def __init__(self, body):
        self.replay = body


def replay_graphs(setattr=setattr):
    """The cuda_graph backend without CUDA: its warm-up runs the body once (no side stream), its
    capture keeps the body to replay. `setattr`: a test's monkeypatch.setattr (undone after it)."""
    from ddim_fast.backends import cuda_graph

    setattr(cuda_graph, "warm_up", lambda body, device: body())
    setattr(cuda_graph.CudaGraphBackend, "_record", lambda self, body: ReplayedGraph(body))


def cuda_graph_on_cpu(setattr=setattr):
    """Engine(backend="cuda_graph") accepted on a CPU device (every other choice as before)."""
    from ddim_fast import engine

    choose = engine.choose_backend

    def choose_backend(backend, device, **kw):
        if backend == "cuda_graph" and device.type == "cpu":
            return "cuda_graph", "dry run: the captured body is replayed eagerly"
        return choose(backend, device, **kw)

    setattr(engine, "choose_backend", choose_backend)


def install():
    """CUDA faked on a CPU for this process (see the module docstring). Must run before ddim_fast's kernels
    are imported."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    cuda_graph_on_cpu()
    replay_graphs()
    torch.compile = lambda model=None, **kw: model
