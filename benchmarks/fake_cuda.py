"""CUDA faked on a CPU, for the GPU suite's dry run (`python -m benchmarks.gpu_suite --dry-run`): it
tests the harness, not speed. Tensors stay on the CPU, Triton kernels run in the interpreter, graph
capture becomes replay of the captured body, torch.compile is the identity. Nothing is imported
until install() runs: it sets TRITON_INTERPRET before ddim_fast's kernels are imported.
"""

from __future__ import annotations

import os


def install():
    """CUDA faked on a CPU for this process (see the module docstring). Must run before ddim_fast's kernels
    are imported."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from ddim_fast import engine
    from ddim_fast.backends.cuda_graph import CudaGraphBackend

    class _Replay:  # replaying a "captured" graph runs its body again, eagerly
        def __init__(self, body):
            self.replay = body

    choose = engine.choose_backend

    def choose_backend(backend, device):
        if backend == "cuda_graph" and device.type == "cpu":
            return "cuda_graph", "dry run: the captured body is replayed eagerly"
        return choose(backend, device)

    engine.choose_backend = choose_backend
    CudaGraphBackend._warm_up = lambda self, body: body()
    CudaGraphBackend._record = lambda self, body: _Replay(body)
    torch.compile = lambda model=None, **kw: model
