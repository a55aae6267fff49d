"""backend="onnxruntime": the exported whole sampler (ddim_fast.onnx) in ONNX Runtime, the CPU EP or
the CUDA EP with IO binding (onnxruntime-gpu).

The sampling plan's graph is exported (or found in the cache) on construction, an inversion plan's
on its first use. On a CPU the graph takes the plan's table and timesteps as inputs (table_inputs):
one graph and one session per (model, dtype, plan structure, S), so a new spacing or eta costs
neither an export nor a new session, and a new S only a graph build (the network's torch export is
cached). Unrolled up to UNROLL_MAX_STEPS steps (batch-invariant to the bit, and the fastest per call),
an ONNX Loop above. On CUDA the graphs are baked and unrolled (ORT's CUDA graph and CUDA-EP partitions
do not survive a Loop). ONNX has no counter-based generator, so for eta > 0 the host draws the noise
with ddim_fast.rng and feeds it in (host_noise): a seed gives the reference backend's samples.
"""

from __future__ import annotations

import json
import warnings

import torch

from .. import rng
from ..conditioning import cond_spec, null_cond
from ..onnx.export import EXPORT_DTYPES, UNROLL_MAX_STEPS, export_cached, model_fingerprint, plan_fingerprint
from ..onnx.graph import layout_key, table_feeds
from ..onnx.network import eval_copy
from ..onnx.runtime import OrtRunner, execution_providers, import_ort
from ..plan import SamplingPlan
from .base import Backend


class OnnxRuntimeBackend(Backend):
    """The whole exported sampler in one ONNX Runtime call.

    The sampling plan's graph is exported (or found in the cache) on construction; an inversion
    plan's graph on its first use. Noise for eta > 0 is generated on the host side with
    ddim_fast.rng (on `device`) and fed in, so a seed gives the reference backend's samples.
    """

    name = "onnxruntime"
    summary = "ONNX Runtime (fastest measured on CPU)"
    options = ("opset", "unroll", "table_inputs", "threads", "cuda_graph", "log")

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
                 opset: int | None = None, unroll: bool | None = None, table_inputs: bool | None = None,
                 threads: int | None = None, cuda_graph: bool = False, log=None):
        """opset, unroll, table_inputs: of the export (ddim_fast.onnx.export_onnx; table_inputs None =
        on a CPU); threads: CPU EP intra-op threads; cuda_graph: ORT's own CUDA graph
        on the CUDA EP; log(line): progress of a fresh export. channels_last and max_graphs do not apply."""
        import_ort()
        if dtype not in EXPORT_DTYPES:
            raise ValueError(f"the onnxruntime backend runs the network in fp32 or fp16, got {dtype}; "
                             "use backend='reference' (or 'cuda_graph' on CUDA) for bfloat16")
        super().__init__(model, plan, device=device, dtype=dtype, shape=shape)
        execution_providers(self.device, cuda_graph)  # fail early on a missing CUDA EP, before any export
        self.model = eval_copy(model, torch.float32)  # the caller's model may change later; this may not
        self.model_fp = model_fingerprint(self.model)
        self.opset, self.unroll = opset, unroll
        self.threads, self.cuda_graph, self.log = threads, cuda_graph, log
        if table_inputs not in (None, True, False):
            raise ValueError(f"table_inputs must be None (automatic), True or False, got {table_inputs!r}")
        self.table_inputs = self.device.type == "cpu" if table_inputs is None else table_inputs
        if self.device.type == "cuda" and unroll is None:
            self.unroll = True  # control flow (Loop) breaks ORT's CUDA graph and splits CUDA-EP partitions
        self._runners = {}  # (plan key, conditioning signature) -> OrtRunner; plan key: table inputs: layout_key
        self.paths = {}
        # A conditional model's graph takes its conditioning inputs; an unconditional call feeds the null
        # ones (null_cond). The guided graph (uncond_*, guidance inputs) is exported on its first use.
        self.spec = cond_spec(self.model) or {}
        self.runner(plan, self._null_example())

    def _null_example(self):
        return null_cond(self.spec, 1) if self.spec else None

    def runner(self, plan: SamplingPlan, example: dict | None = None, guided: bool = False) -> OrtRunner:
        """The session of `plan`'s graph; example: conditioning inputs (their names, shapes, dtypes
        choose the graph), guided: with classifier-free guidance."""
        sig = None if not example else (guided, tuple((k, tuple(v.shape[1:]), str(v.dtype))
                                                      for k, v in sorted(example.items())))
        if self.table_inputs:  # one graph per structure (unrolled: and steps), whatever the table
            unrolled = plan.steps <= UNROLL_MAX_STEPS if self.unroll is None else self.unroll
            key = (json.dumps(layout_key(plan, unrolled), sort_keys=True), sig)
        else:
            key = (plan_fingerprint(plan), sig)
        if key not in self._runners:
            path = self._export(plan, example, guided)
            try:
                runner = OrtRunner(path, device=self.device, threads=self.threads, cuda_graph=self.cuda_graph)
            except ValueError as e:
                if "damaged or truncated" not in str(e):
                    raise
                warnings.warn(f"re-exporting the damaged cache entry {path}", stacklevel=2)
                path.unlink(missing_ok=True)
                path = self._export(plan, example, guided)
                runner = OrtRunner(path, device=self.device, threads=self.threads, cuda_graph=self.cuda_graph)
            self._runners[key] = runner
            self.paths[plan.direction] = path
        return self._runners[key]

    def _export(self, plan, example=None, guided=False):
        cond = {k: v.cpu() for k, v in example.items()} if example else None
        return export_cached(self.model, plan, self.dtype, self.opset, shape=self.shape, unroll=self.unroll,
                             table_inputs=self.table_inputs, model_fp=self.model_fp, log=self.log, guided=guided,
                             cond=cond)

    @torch.no_grad()
    def run(self, x, plan, *, seed, noise, first_index, cond=None):
        """x (B, C, H, W) float32 on the device -> the final state (B, C, H, W), unclamped."""
        x = x.to(self.device, torch.float32).contiguous()
        x_in = "x_T" if plan.direction == "sample" else "x0"
        feeds = {x_in: x}
        if self.table_inputs:
            feeds.update(table_feeds(plan))
        inputs = cond.cond if cond is not None else null_cond(self.spec, x.shape[0], self.device)
        guided = cond is not None and cond.guided
        runner = self.runner(plan, inputs, guided)
        for k, v in (inputs or {}).items():
            feeds[k] = v.float() if v.is_floating_point() else v.long()
        if guided:
            feeds.update({f"uncond_{k}": v.float() if v.is_floating_point() else v.long()
                          for k, v in cond.uncond.items()})
            feeds["guidance"] = torch.tensor(cond.guidance, dtype=torch.float32, device=self.device)
        if plan.needs_noise:
            feeds["noise"] = noise.to(self.device, torch.float32) if noise is not None else \
                host_noise(plan, seed, x.shape, first_index=first_index, device=self.device)
        return runner(**feeds).to(self.device)


def host_noise(plan: SamplingPlan, seed: int, shape, *, first_index: int = 0, device=None) -> torch.Tensor:
    """The (S, B, C, H, W) `noise` input of a sampler graph for `seed`: rng.step_noise for every step
    with sigma != 0 (zeros where the plan draws none), exactly what the other backends draw."""
    z = torch.zeros(plan.steps, *shape, device=device)
    sigma = plan.column("sigma")
    for i in range(plan.steps):
        if sigma[i] != 0:
            z[i] = rng.step_noise(seed, i, shape, first_index=first_index, device=device)
    return z

