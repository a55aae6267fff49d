"""ONNX export of the eps-model and of the whole sampler, the ONNX Runtime runner, and the network session
the CPU onnxruntime backend samples with.

    dd.export_onnx(model, "unet.onnx")                    # eps-model: x (B, C, H, W), t (B,) -> prediction
    dd.export_onnx(model, "ddim10.onnx", plan=plan)       # whole sampler: x_T [, noise] -> x0
    runner = OrtRunner("ddim10.onnx")                     # an ONNX Runtime session on torch tensors
    x0 = runner(x_T=x_T)
    net = NetworkSession(model)                           # the cached, checked eps-model in a kept session
    x0 = dd.sample(net, x_T, plan)                        # the reference loop with ONNX Runtime's network

    network.py    the network as exported (a CPU copy in the export dtype), traced by torch.onnx (TorchScript,
                  dynamo as the fallback)
    graph.py      the sampler written in ONNX around it: the step and the layouts (unrolled, Loop, and a
                  Loop taking the plan's table as inputs, which serves every plan of one structure)
    validate.py   every export checked in ONNX Runtime against the float64 reference first
    cache.py      the on-disk cache (folder, size limit, unwritable fallback) and the fingerprints keying it
    export.py     export_onnx / export_cached: keys, metadata, validation, the write
    runtime.py    session options, providers, OrtRunner (CPU EP, or the CUDA EP with IO binding), DamagedOnnxFile
    session.py    NetworkSession (get or export, check, open, feed, run, repair) and SamplerGraphs (the CUDA
                  path's whole-sampler graphs, built per direction on first use)

Noise. ONNX has no counter-based generator (Philox), so plans with eta > 0 take an input
`noise` (S, B, C, H, W) that the host fills with ddim_fast.rng.step_noise(seed, i, ...) for
every step i: the same numbers the other backends draw, so a seed gives the same image here.

Precision. dtype=float16 runs the network in fp16 (casts at its input and output); the sampler
state, the coefficients and the step arithmetic stay float32, as in every other backend.
The final state is returned unclamped; the Engine clamps it.
"""

from .export import (
    EXPORT_DTYPES,
    GRAPH_VERSION,
    UNROLL_MAX_STEPS,
    cache_dir,
    cache_limit_bytes,
    export_cached,
    export_estimate_s,
    export_onnx,
    model_fingerprint,
    network_cached,
    onnx_metadata,
    plan_fingerprint,
    prune_cache,
    stats,
)
from .graph import structure, table_feeds
from .runtime import DamagedOnnxFile, OnnxRuntimeMissing, OrtRunner, physical_cores, session_options
from .session import NetworkSession
from .validate import ExportValidationError, validate_export

__all__ = [
    "EXPORT_DTYPES", "GRAPH_VERSION", "UNROLL_MAX_STEPS", "DamagedOnnxFile", "ExportValidationError", "NetworkSession",
    "OnnxRuntimeMissing", "OrtRunner",
    "cache_dir", "cache_limit_bytes", "export_cached", "export_estimate_s", "export_onnx", "model_fingerprint",
    "network_cached", "onnx_metadata", "physical_cores", "plan_fingerprint", "prune_cache", "session_options", "stats",
    "structure", "table_feeds", "validate_export",
]
