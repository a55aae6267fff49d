"""backend="onnxruntime": ONNX Runtime, on a CPU (CPU EP) or CUDA (CUDA EP with IO binding, onnxruntime-gpu).

CPU: the reference sampling loop (ddim_fast.sampling: its step, history, clipping, guidance combine and
host noise from ddim_fast.rng) with the network run by one ONNX Runtime session of the exported eps-model
(onnx.session.NetworkSession). The export (or the cache's copy of it) happens on construction; after that
any plan (steps, spacing, eta, sampler, an explicit table, inversion) and guidance (a doubled batch) run
on the same session: a new plan costs no export and no new session. A seed gives the reference
backend's samples (the same noise), within docs/DESIGN.md's tolerance rule.

CUDA: the exported whole sampler (baked tables, unrolled) in one ONNX Runtime call per run, with IO
binding and optionally ORT's CUDA graph (onnx.session.SamplerGraphs), each graph exported on first use
per direction, so an encode builds only the inversion graph. Unverified: no GPU has run it.
"""

from __future__ import annotations

import torch

from ..conditioning import cond_spec, null_cond
from ..onnx.export import EXPORT_DTYPES, network_fingerprint
from ..onnx.network import eval_copy
from ..onnx.runtime import execution_providers, import_ort
from ..onnx.session import NetworkSession, SamplerGraphs, signature
from ..plan import SamplingPlan
from ..sampling import invert, sample
from .base import Backend

# onnx_options that shape the whole-sampler graphs, which only the CUDA path builds
WHOLE_SAMPLER_OPTIONS = ("unroll", "cuda_graph")


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: on a CPU the network in a session inside the reference loop; on CUDA the whole sampler."""

    name = "onnxruntime"
    summary = "ONNX Runtime (fastest measured on CPU)"
    options = ("opset", "threads", *WHOLE_SAMPLER_OPTIONS)

    @classmethod
    def unavailable(cls, device):
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed: pip install 'ddim-fast[onnx]' (CPU) or 'ddim-fast[gpu]' (CUDA)"
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("onnxruntime has no CUDAExecutionProvider here: pip install 'ddim-fast[gpu]' "
                    "(onnxruntime-gpu) or use device='cpu'")
        return None

    def __init__(self, model, plan: SamplingPlan, *, device, dtype, shape, channels_last=False, max_graphs=4,
                 opset: int | None = None, threads: int | None = None, unroll: bool | None = None,
                 cuda_graph: bool = False, model_fp: str | None = None):
        """opset: of the export; threads: the CPU EP's intra-op threads (default: one per physical core);
        unroll (default True) and cuda_graph (ORT's own CUDA graph): of the CUDA path's whole-sampler graphs.
        channels_last does not apply; max_graphs: whole-sampler sessions kept (CUDA); model_fp:
        export.network_fingerprint(model) when the caller has it (the Engine)."""
        import_ort()
        if dtype not in EXPORT_DTYPES:
            raise ValueError(f"the onnxruntime backend runs the network in fp32 or fp16, got {dtype}; "
                             "use backend='reference' (or 'cuda_graph' on CUDA) for bfloat16")
        super().__init__(model, plan, device=device, dtype=dtype, shape=shape)
        if self.device.type == "cpu":
            given = [k for k, v in (("unroll", unroll), ("cuda_graph", cuda_graph)) if v not in (None, False)]
            if given or unroll is False:
                raise ValueError(f"onnx_options {given[0] if given else 'unroll'!r} shapes the whole-sampler graphs of "
                                 "the CUDA path; on a CPU the onnxruntime backend runs the network alone in the "
                                 "reference loop (one export for every plan): drop it, or write a whole sampler "
                                 "with dd.export_onnx(model, path, plan=plan, unroll=...)")
        execution_providers(self.device, cuda_graph)  # fail early on a missing CUDA EP, before any export
        self.opset, self.threads = opset, threads
        if self.device.type == "cuda":
            self.graphs = SamplerGraphs(model, dtype, shape=self.shape, device=self.device, opset=opset,
                                        unroll=True if unroll is None else unroll, threads=threads,
                                        cuda_graph=cuda_graph, kept=max_graphs)
            return
        spec = cond_spec(model)
        self.spec = spec or {}
        self.model_fp = model_fp or network_fingerprint(model)
        self.networks = {}  # conditioning signature -> NetworkSession
        null = null_cond(self.spec, 1) if self.spec else None
        # The graph an unconditional call needs (an unconditional model, or a conditional one's null inputs) is
        # exported (or found) now, from the caller's model as it is. A known unconditional or class-conditional
        # model needs no other, so no private copy is kept; a model whose conditioning has no null value (text:
        # its length may change per call) or is unknown gets a graph per conditioning shape on first use, from
        # a private copy (the caller's model may change meanwhile).
        text = bool(self.spec) and null is None
        self._source = eval_copy(model, torch.float32) if spec is None or text else None
        if not text:
            self.networks[signature(null)] = self._open(model, null)

    def _open(self, source, example):
        cond = {k: v.detach().cpu() for k, v in example.items()} if example else None
        return NetworkSession(source, self.dtype, shape=self.shape, opset=self.opset, threads=self.threads, cond=cond,
                              model_fp=self.model_fp)

    def network(self, example: dict | None = None) -> NetworkSession:
        """The network session for conditioning inputs like `example` (their names and per-sample shapes
        choose the graph; None: unconditional, or the model's null inputs)."""
        sig = signature(example)
        if sig not in self.networks:
            if self._source is None:  # not reached through the Engine, which checks the conditioning first
                raise ValueError(f"this model's network takes conditioning {next(iter(self.networks))}, not {sig}")
            self.networks[sig] = self._open(self._source, example)
        return self.networks[sig]

    @property
    def paths(self) -> list:
        """The ONNX files in use: the network's (one per conditioning shape) on a CPU, the whole-sampler
        graphs' on CUDA."""
        if self.device.type == "cuda":
            return list(self.graphs.paths.values())
        return [net.path for net in self.networks.values()]

    @torch.no_grad()
    def run(self, x, plan, *, seed, noise, first_index, cond=None):
        """x (B, C, H, W) float32 -> the final state (B, C, H, W), unclamped."""
        if self.device.type == "cuda":
            return self.graphs.run(x, plan, seed=seed, noise=noise, first_index=first_index, cond=cond)
        net = self.network(cond.cond if cond is not None else (null_cond(self.spec, 1) if self.spec else None))
        kw = {} if cond is None else {"cond": cond.cond, "uncond": cond.uncond, "guidance": cond.guidance}
        x = x.to(self.device, torch.float32)
        if plan.direction == "invert":
            return invert(net, x, plan, **kw)
        if noise is not None or not plan.needs_noise:
            return sample(net, x, plan, noise=noise, **kw)
        return sample(net, x, plan, seed=seed, first_index=first_index, **kw)
