"""ONNX export of the eps-model and of the whole sampler, and the ONNX Runtime runner.

    dd.export_onnx(model, "unet.onnx")                    # eps-model: x (B, C, H, W), t (B,) -> prediction
    dd.export_onnx(model, "ddim10.onnx", plan=plan)       # whole sampler: x_T [, noise] -> x0
    runner = OrtRunner("ddim10.onnx")                     # an ONNX Runtime session on torch tensors
    x0 = runner(x_T=x_T)

How the graphs are made. torch.onnx (the torch.export-based exporter) traces only the network,
once per (weights, dtype, opset); that is the slow part (tens of seconds for the CIFAR-10 UNet),
so the result is cached on disk. The sampler around it is written directly in ONNX: one step is
the plan's update (*) of plan.py,

    x' = d0 * clip(cx * x + ce * m) + dx * x + de * m + sigma * z,

with `clip` the identity, a fixed range (Clip) or Imagen's dynamic thresholding (TopK quantile).
Two layouts of the S steps are built from the same network graph:
  unrolled   S copies of the network nodes, sharing one set of weights, each step's coefficients
             and timestep as constants (ORT can fold and plan every step);
  loop       one ONNX Loop whose body is the network plus the step, reading its row of the (S, 6)
             coefficient table and its timestep by the iteration number (graph size independent of S).
`unroll=None` picks unrolled up to UNROLL_MAX_STEPS steps and the Loop above (the NOTE there has
the measurement).

Noise. ONNX has no counter-based generator (Philox), so plans with eta > 0 take an input
`noise` (S, B, C, H, W) that the host fills with ddim_fast.rng.step_noise(seed, i, ...) for
every step i: the same numbers the other backends draw, so a seed gives the same image here.

Precision. dtype=float16 runs the network in fp16 (casts at its input and output); the sampler
state, the coefficients and the step arithmetic stay float32, as in every other backend.
The final state is returned unclamped; the Engine clamps it.

Every export checks itself before the file is written: ONNX Runtime runs the graph on random
inputs and the result must meet DESIGN.md's tolerance rule against a float64 reference
(error <= 2 x the error of the torch reference in the same precision + atol).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from . import __version__, rng
from .checks import MissingExtra, is_int, sample_shape
from .files import atomic_write_bytes
from .plan import COEF_COLUMNS, SamplingPlan

GRAPH_VERSION = 1  # bump when the graph layout changes: part of every cache key
EXPORT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16"}
ATOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}  # DESIGN.md's tolerance rule
META_PREFIX = "ddim_fast."
# NOTE: unrolled vs Loop, CIFAR-10 UNet, batch 1, ORT 1.32 CPU EP, 2-core AMD EPYC VM shared with other
# jobs (bench_cpu_backends.py, graph rows; two runs): one sampling call takes 2.75 / 12.9 / 27.2 s
# unrolled vs 3.08 / 14.5 / 31.3 s as a Loop at S = 10 / 50 / 100 (2 threads), and 2.59 / 12.5 s vs
# 2.60 / 14.0 s at S = 10 / 50 (1 thread): the Loop is 0-15% slower (per-iteration subgraph overhead,
# no cross-step memory planning). Creating the unrolled session takes 2.0-2.4 / 13-18 / 52 s
# (superlinear in S) against 0.1-0.35 s for the Loop. Unrolled up to S=50 (session ~ one sampling
# call, repaid within ~10 calls), the Loop above.
UNROLL_MAX_STEPS = 50
VALIDATE_LOOP_STEPS = 20  # a Loop export is validated on its first steps plus an exact check of its tables
INSTALL_HINT = "pip install 'ddim-fast[onnx]' (CPU) or 'ddim-fast[gpu]' (CUDA, onnxruntime-gpu)"

# Counts of the expensive work, for tests and logs: torch exports of a network, sampler graphs built.
stats = {"torch_exports": 0, "sampler_builds": 0, "cache_hits": 0}


class OnnxRuntimeMissing(MissingExtra):
    """onnxruntime (or onnx / onnxscript) is not installed; the message names the extra to install."""


class ExportValidationError(RuntimeError):
    """ONNX Runtime's result on the exported graph broke the tolerance rule: the file was not written."""


# == 1. imports with clear errors ===================================================================
def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxRuntimeMissing(f"onnxruntime is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise OnnxRuntimeMissing(f"the onnx package is not installed (needed to export): {INSTALL_HINT}") from None
    return onnx


# == 2. fingerprints and the cache ==================================================================
def cache_dir() -> Path:
    """Where exported graphs are kept: $DDIM_FAST_CACHE/onnx, default ~/.cache/ddim-fast/onnx."""
    root = os.environ.get("DDIM_FAST_CACHE")
    if root:
        return Path(root).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ddim-fast" / "onnx"


def _plain(value):
    """A JSON-able stand-in for a model attribute, or None to leave it out of the fingerprint."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    if callable(getattr(value, "to_dict", None)):
        return value.to_dict()
    return None


def model_fingerprint(model) -> str:
    """sha256 of what decides a model's output: class, parameters and buffers (non-persistent ones
    too), and the plain attributes of every submodule (numbers, strings, configs with to_dict)."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    attrs = {}
    for mod_name, mod in model.named_modules():
        for k, v in vars(mod).items():
            if k.startswith("_") or k == "training":
                continue
            plain = _plain(v)
            if plain is not None:
                attrs[f"{mod_name}.{k}"] = plain
    h.update(json.dumps(attrs, sort_keys=True, default=str).encode())
    return h.hexdigest()


def plan_fingerprint(plan: SamplingPlan) -> str:
    h = hashlib.sha256(json.dumps(plan.describe(), sort_keys=True).encode())
    h.update(plan.coef.to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _export_key(model_fp: str, plan: SamplingPlan | None, dtype, opset, shape, unroll) -> str:
    parts = {
        "model": model_fp,
        "plan": plan_fingerprint(plan) if plan is not None else None,
        "unroll": unroll if plan is not None else None,
        "dtype": EXPORT_DTYPES[dtype],
        "opset": opset,
        "shape": list(shape),
        "ddim_fast": __version__,
        "graph": GRAPH_VERSION,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cache_path(key: str, plan: SamplingPlan | None, dtype) -> Path:
    if plan is None:
        name = f"eps-{EXPORT_DTYPES[dtype]}-{key[:20]}.onnx"
    else:
        name = f"{plan.direction}-S{plan.steps}-{EXPORT_DTYPES[dtype]}-{key[:20]}.onnx"
    return cache_dir() / name


# == 3. the network, traced once by torch.onnx ======================================================
class _Network(torch.nn.Module):
    """model(x, t) with the network in `dtype` and float32 in and out (the sampler state's precision)."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x, t):
        return self.model(x.to(self.dtype), t).to(torch.float32)


def _eval_copy(model, dtype):
    """A private copy on the CPU in `dtype`, eval mode, reference ops (Triton ops do not export)."""
    net = copy.deepcopy(model).to("cpu", dtype).eval()
    if hasattr(net, "set_ops"):
        net.set_ops("reference")
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs optional-dependency notes (torchvision ops) and deprecations: not ours to show."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _torch_export(model, dtype, opset, shape):
    """The eps-model as an onnx.ModelProto: inputs x (B, C, H, W) float32, t (B,) int64; output
    `prediction` (B, C', H, W) float32. The batch dimension is dynamic."""
    _import_onnx()
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise OnnxRuntimeMissing(f"onnxscript is not installed (torch.onnx needs it): {INSTALL_HINT}") from None
    net = _Network(_eval_copy(model, dtype), dtype).eval()
    x = torch.randn(2, *shape)  # batch 2: torch.export specialises a traced batch of 1
    t = torch.tensor([1, 2], dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=2**20)
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                net, (x, t), None, input_names=["x", "t"], output_names=["prediction"], dynamo=True,
                dynamic_shapes={"x": {0: batch}, "t": {0: batch}}, opset_version=opset, verbose=False,
            )
        except Exception as e:
            raise ValueError(
                f"torch.onnx could not export {type(model).__name__} ({type(e).__name__}: {_first_line(e)}); "
                "the model's forward must be traceable by torch.export (no data-dependent Python control flow)"
            ) from e
    stats["torch_exports"] += 1
    proto = program.model_proto
    if opset is not None and _opset(proto) != opset:
        raise ValueError(f"torch.onnx wrote opset {_opset(proto)}, not the requested {opset}; "
                         "pick an opset it supports (18 or newer) or leave opset unset")
    return proto


def _first_line(err) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# == 4. the sampler, written in ONNX around the network =============================================
class _Builder:
    """Collects nodes and initializers with unique names under a prefix."""

    def __init__(self, prefix="ddim/"):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.prefix = prefix
        self.nodes, self.inits = [], []
        self.n = 0

    def name(self, hint):
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def const(self, value, dtype=np.float32, hint="c"):
        name = self.name(hint)
        self.inits.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, hint=None, n_out=1, **attrs):
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs


def _step_ops(b: _Builder, plan: SamplingPlan, x: str, m: str, c: dict, z: str | None, numel: int) -> str:
    """Append one update (*) to `b`; c maps column names to scalar tensors. Returns the new state.
    The operations and their order are those of ddim_fast.sampling.step (same float32 rounding)."""
    x0 = b.op("Add", [b.op("Mul", [c["cx"], x]), b.op("Mul", [c["ce"], m])], "x0")  # (1) predicted x0
    if plan.threshold is not None:
        x0 = _threshold_ops(b, x0, plan.threshold, plan.threshold_max, numel)
    elif plan.clip_x0 is not None:
        lo, hi = plan.clip_x0
        x0 = b.op("Clip", [x0, b.const(lo), b.const(hi)], "x0_clip")
    # (2) sqrt(a') x0 + (3) the direction pointing to x_t, as coefficients of x0, x and m
    out = b.op("Add", [b.op("Mul", [c["d0"], x0]), b.op("Mul", [c["dx"], x])])
    out = b.op("Add", [out, b.op("Mul", [c["de"], m])], "x_mean")
    if z is not None:
        out = b.op("Add", [out, b.op("Mul", [c["sigma"], z])], "x_next")  # (4) sigma_t z
    return out


def _threshold_ops(b: _Builder, x0: str, p: float, s_max: float, numel: int) -> str:
    """Dynamic thresholding as ddim_fast.sampling.dynamic_threshold: s = quantile(|x0|, p) per sample
    (torch's linear interpolation between order statistics), clamped to [1, s_max]; x0 = clip(x0, -s, s) / s.
    Only the top order statistics are needed, so TopK(largest) replaces a full sort."""
    rank = float(np.float32(p) * np.float32(numel - 1))  # torch computes the rank in float32
    below = int(math.floor(rank))
    above = min(below + 1, numel - 1)
    frac = np.float32(rank - below)
    k = numel - below  # the k largest hold order statistics below..numel-1, descending
    flat = b.op("Reshape", [b.op("Abs", [x0]), b.const([0, -1], np.int64)], "abs_flat")  # (B, N)
    top = b.op("TopK", [flat, b.const([k], np.int64)], "top", n_out=2, axis=1, largest=1, sorted=1)[0]  # (B, k)
    v_lo = b.op("Gather", [top, b.const(k - 1, np.int64)], "q_lo", axis=1)  # (B,) order statistic `below`
    s = v_lo
    if frac != 0 and above != below:
        v_hi = b.op("Gather", [top, b.const(k - 1 - (above - below), np.int64)], "q_hi", axis=1)
        s = b.op("Add", [v_lo, b.op("Mul", [b.const(frac), b.op("Sub", [v_hi, v_lo])])], "q")
    s = b.op("Max", [s, b.const(1.0)], "s")
    if math.isfinite(s_max):
        s = b.op("Min", [s, b.const(s_max)], "s")
    s = b.op("Reshape", [s, b.const([-1, 1, 1, 1], np.int64)], "s4")  # (B, 1, 1, 1)
    clipped = b.op("Max", [b.op("Min", [x0, s]), b.op("Neg", [s])])
    return b.op("Div", [clipped, s], "x0_thr")


def _network_parts(net_proto):
    """(nodes, initializers, x name, t name, output name) of an exported eps-model graph."""
    g = net_proto.graph
    if [i.name for i in g.input] != ["x", "t"] or len(g.output) != 1:
        raise ValueError("not a ddim-fast eps-model graph (inputs x, t; one output): re-export it")
    for node in g.node:
        if any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            raise ValueError(f"the network graph has a control-flow node ({node.op_type}); "
                             "the sampler export supports feed-forward networks only")
    return list(g.node), list(g.initializer), "x", "t", g.output[0].name


def _copy_nodes(nodes, rename, prefix):
    """Copies of `nodes` with every value not in `rename` (weights, constants kept) prefixed."""
    out = []
    for node in nodes:
        n = type(node)()
        n.CopyFrom(node)
        del n.input[:]
        del n.output[:]
        n.input.extend(rename.get(v, prefix + v) if v else v for v in node.input)
        n.output.extend(rename.get(v, prefix + v) if v else v for v in node.output)
        n.name = prefix + (node.name or node.op_type)
        n.doc_string = ""
        del n.metadata_props[:]  # the exporter's per-node stack traces: ~1 KB per node, per copy
        out.append(n)
    return out


def _sampler_proto(net_proto, plan: SamplingPlan, unroll: bool, shape):
    """The whole sampler as an onnx.ModelProto, built around the exported network."""
    onnx = _import_onnx()
    from onnx import TensorProto, helper

    nodes, weights, _, _, pred = _network_parts(net_proto)
    keep = {w.name for w in weights} | {""}
    x_in, x_out = ("x_T", "x0") if plan.direction == "sample" else ("x0", "x_T")
    noise = plan.needs_noise
    C, H, W = shape
    numel = C * H * W
    p32 = plan.to("cpu", torch.float32)
    coef = p32.coef.numpy()  # (S, 6): rounded once to float32, as the reference does
    ts = plan.timesteps.numpy().astype(np.int64)  # (S,)

    b = _Builder()
    batch = b.op("Shape", [x_in], "batch", start=0, end=1)  # (1,) int64
    state_type = helper.make_tensor_type_proto(TensorProto.FLOAT, ["B", C, H, W])

    if unroll:
        x = x_in
        for i in range(plan.steps):
            pre = f"s{i}/"
            t = b.op("Expand", [b.const([ts[i]], np.int64, f"t{i}"), batch], f"{pre}t")  # (B,)
            rename = {"x": x, "t": t, **{k: k for k in keep}}
            b.nodes.extend(_copy_nodes(nodes, rename, pre))
            m = pre + pred  # (B, C, H, W) the model output at step i
            z = None
            if noise and coef[i, 5] != 0:
                z = b.op("Gather", ["noise", b.const(i, np.int64)], f"{pre}z", axis=0)  # (B, C, H, W)
            # sigma only where the step adds noise: an initializer no node reads makes plain onnxruntime
            # warn "Removing initializer ... not used" on every load
            c = {name: b.const(coef[i, j], hint=f"{pre}{name}") for j, name in enumerate(COEF_COLUMNS)
                 if name != "sigma" or z is not None}
            x = _step_ops(b, plan, x, m, c, z, numel)
        b.nodes.append(helper.make_node("Identity", [x], [x_out], name="ddim/out"))
    else:
        # The Loop body reads the weights, the tables, `batch` and `noise` from the outer scope.
        table = b.const(coef, hint="coef_table")  # (S, 6)
        steps_t = b.const(ts, np.int64, "timesteps")  # (S,)
        body = _Builder("ddim/body/")
        i, cond, x = "ddim/body/i", "ddim/body/cond", "ddim/body/x"
        t_i = body.op("Gather", [steps_t, i], "t_i", axis=0)  # () int64
        t = body.op("Expand", [body.op("Unsqueeze", [t_i, body.const([0], np.int64)]), batch], "t")  # (B,)
        row = body.op("Gather", [table, i], "row", axis=0)  # (6,)
        c = {name: body.op("Gather", [row, body.const(j, np.int64)], name, axis=0)
             for j, name in enumerate(COEF_COLUMNS)}
        rename = {"x": x, "t": t, **{k: k for k in keep}}
        body.nodes.extend(_copy_nodes(nodes, rename, "ddim/body/net/"))
        z = body.op("Gather", ["noise", i], "z", axis=0) if noise else None  # (B, C, H, W)
        x_next = _step_ops(body, plan, x, "ddim/body/net/" + pred, c, z, numel)
        cond_out = body.op("Identity", [cond], "cond_out")
        x_next = body.op("Identity", [x_next], "x_out")
        body_graph = helper.make_graph(
            body.nodes, "ddim_step",
            [helper.make_tensor_value_info(i, TensorProto.INT64, []),
             helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
             helper.make_value_info(x, state_type)],
            [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
             helper.make_value_info(x_next, state_type)],
            initializer=body.inits,
        )
        trips = b.const(plan.steps, np.int64, "trips")
        b.nodes.append(helper.make_node("Loop", [trips, "", x_in], [x_out], name="ddim/loop", body=body_graph))

    inputs = [helper.make_value_info(x_in, state_type)]
    if noise:
        inputs.append(helper.make_tensor_value_info("noise", TensorProto.FLOAT, [plan.steps, "B", C, H, W]))
    graph = helper.make_graph(b.nodes, f"ddim_{plan.direction}_{plan.steps}", inputs,
                              [helper.make_value_info(x_out, state_type)], initializer=weights + b.inits)
    model = helper.make_model(graph, opset_imports=list(net_proto.opset_import), producer_name="ddim-fast",
                              producer_version=__version__)
    model.ir_version = net_proto.ir_version
    model.functions.extend(net_proto.functions)
    if model.ByteSize() < 2**31 - 1:  # the checker needs one in-memory message
        onnx.checker.check_model(model)
    stats["sampler_builds"] += 1
    return model


# == 5. metadata ====================================================================================
def _metadata(model, plan, dtype, shape, key, unroll, opset) -> dict:
    cfg = getattr(model, "config", None)
    sched = getattr(model, "schedule", None)
    meta = {
        "version": __version__,
        "kind": "eps_model" if plan is None else "sampler",
        "model_class": type(model).__name__,
        "model_config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        "schedule": sched.to_dict() if hasattr(sched, "to_dict") else None,
        "prediction": getattr(model, "prediction", plan.prediction if plan is not None else "eps"),
        "dtype": EXPORT_DTYPES[dtype],
        "shape": list(shape),
        "opset": opset,
        "key": key,
    }
    if plan is None:
        meta["inputs"] = {"x": "(B, C, H, W) float32", "t": "(B,) int64 training timesteps"}
        meta["outputs"] = {"prediction": f"(B, C, H, W) float32, the model's {meta['prediction']} prediction"}
    else:
        x_in, x_out = ("x_T", "x0") if plan.direction == "sample" else ("x0", "x_T")
        meta["plan"] = plan.describe()
        meta["graph"] = "unrolled" if unroll else "loop"
        meta["inputs"] = {x_in: "(B, C, H, W) float32"}
        if plan.needs_noise:
            meta["inputs"]["noise"] = (
                "(S, B, C, H, W) float32: z for every step; ONNX has no Philox generator, so the host draws "
                "ddim_fast.rng.step_noise(seed, i, (B, C, H, W), first_index=...) for step i (zeros where sigma=0)"
            )
        meta["outputs"] = {x_out: "(B, C, H, W) float32, the final state, not clamped"}
    return meta


def _set_metadata(proto, meta: dict):
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + k, json.dumps(v, sort_keys=True)


def onnx_metadata(path) -> dict:
    """The ddim-fast metadata of an exported file, JSON values decoded (kind, model_config,
    schedule, plan, prediction, dtype, shape, version, ...)."""
    onnx = _import_onnx()
    path = _existing(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise _damaged(path, e) from None
    if not proto.graph.output:  # protobuf parses an empty (or zeroed) file as an empty model
        raise _damaged(path, ValueError("the model has no graph"))
    meta = {p.key[len(META_PREFIX):]: json.loads(p.value)
            for p in proto.metadata_props if p.key.startswith(META_PREFIX)}
    if not meta:
        raise ValueError(f"{path} has no ddim-fast metadata: it was not written by ddim_fast.export_onnx")
    return meta


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}: check the path, or export one with dd.export_onnx "
                                "(CLI: ddim-fast export)")
    return path


def _damaged(path, err) -> ValueError:
    return ValueError(f"{path} is not a readable ONNX model ({_first_line(err)}); the file is damaged or truncated: "
                      "re-export it (dd.export_onnx or `ddim-fast export`)")


# == 6. export ======================================================================================
def export_onnx(model, path, plan: SamplingPlan | None = None, dtype=torch.float32, opset: int | None = None,
                validate: bool = True, *, shape=None, unroll: bool | None = None, log=None) -> Path:
    """Export `model` (no plan: the eps-model) or the whole sampler of `plan` to `path` (atomically).

    eps-model:  inputs x (B, C, H, W) float32 and t (B,) int64; output `prediction` float32.
    sampler:    input x_T (x0 for an inversion plan from plan.inverse()), plus `noise`
                (S, B, C, H, W) when the plan draws noise (eta > 0; the host generates it with
                ddim_fast.rng, see the module docstring); output x0 (x_T when inverting), unclamped.
                Clipping and dynamic thresholding are part of the graph.
    dtype:      torch.float32 or torch.float16 (the network's precision; the state stays float32).
    opset:      ONNX opset (default: torch.onnx's); shape: (C, H, W), read from model.config if omitted.
    unroll:     None = unrolled up to UNROLL_MAX_STEPS steps, an ONNX Loop above; True / False force it.
    validate:   run the graph in ONNX Runtime (CPU) and check it against the float64 reference.
    log:        a function called with one line at each stage (export, graph, validation), for progress.
    Returns the path. The file carries its config, schedule, plan and version in metadata_props
    (read them with onnx_metadata).
    """
    proto, _ = _build(model, plan, dtype, opset, shape, unroll, validate, log=log)
    return _write(path, proto)


def _check_args(model, plan, dtype, opset, shape, unroll):
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"export_onnx takes a torch.nn.Module model(x, t), got {type(model).__name__}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"ONNX export supports dtype torch.float32 or torch.float16, got {dtype}; "
                         "for bfloat16 use the reference, triton or cuda_graph backend")
    if opset is not None and (not is_int(opset) or not 18 <= opset <= 23):
        raise ValueError(f"opset must be an int in [18, 23] (torch.onnx writes opset 18 or newer), got {opset!r}")
    if plan is not None and not isinstance(plan, SamplingPlan):
        raise ValueError(f"plan must be a SamplingPlan or None (eps-model only), got {type(plan).__name__}")
    if plan is not None:
        pred = getattr(model, "prediction", plan.prediction)
        if pred != plan.prediction:
            raise ValueError(f"the model predicts {pred!r} but the plan was built for {plan.prediction!r}: "
                             f"build the plan with prediction={pred!r}")
    if unroll not in (None, True, False):
        raise ValueError(f"unroll must be None (automatic), True or False, got {unroll!r}")
    return sample_shape(model, shape)


def _build(model, plan, dtype, opset, shape, unroll, validate, model_fp=None, log=None):
    """(proto with metadata, key), validated when asked; log(line) at each stage."""
    say = log or (lambda line: None)
    shape = _check_args(model, plan, dtype, opset, shape, unroll)
    unroll = _resolve_unroll(plan, unroll)
    model_fp = model_fp or model_fingerprint(model)
    net_proto = _network(model, model_fp, dtype, opset, shape, say)
    if plan is not None:
        say(f"building the {plan.steps}-step sampler graph ({'unrolled' if unroll else 'one ONNX Loop'})")
    proto = net_proto if plan is None else _sampler_proto(net_proto, plan, unroll, shape)
    if validate:
        say("validating the graph in ONNX Runtime against the float64 reference")
    key = _export_key(model_fp, plan, dtype, opset, shape, unroll)
    _set_metadata(proto, _metadata(model, plan, dtype, shape, key, unroll, _opset(proto)))
    if validate and plan is not None and not unroll and plan.steps > VALIDATE_LOOP_STEPS:
        # A Loop runs one body S times, reading row i of its tables: validating the body on the
        # first steps and the tables exactly costs VALIDATE_LOOP_STEPS reference steps, not S
        # (a float64 DDPM-1000 reference of the CIFAR-10 UNet took 20 minutes on 2 CPU cores).
        head = _head(plan, VALIDATE_LOOP_STEPS)
        validate_export(_sampler_proto(net_proto, head, False, shape), model, head, dtype, shape)
        _check_loop_tables(proto, plan)
    elif validate:
        validate_export(proto, model, plan, dtype, shape)
    return proto, key


def _head(plan: SamplingPlan, k: int) -> SamplingPlan:
    """The first k steps of a plan (same variance, clipping and noise flag), for validation."""
    import dataclasses

    head = dataclasses.replace(plan, timesteps=plan.timesteps[:k], alpha=plan.alpha[:k],
                               alpha_next=plan.alpha_next[:k], coef=plan.coef[:k])
    if head.needs_noise != plan.needs_noise:  # the noise input would differ: validate with noise on
        head = dataclasses.replace(head, coef=torch.cat([head.coef[:, :5], head.coef[:, 5:] + 1e-3], dim=1))
    return head


def _check_loop_tables(proto, plan: SamplingPlan):
    """The Loop's trip count, coefficient table and timesteps are exactly the plan's (float32)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}

    def one(hint):
        names = [n for n in inits if n.startswith(f"ddim/{hint}_")]
        if len(names) != 1:
            raise ExportValidationError(f"the exported Loop has {len(names)} '{hint}' tables; please report this")
        return numpy_helper.to_array(inits[names[0]])

    coef = plan.to("cpu", torch.float32).coef.numpy()
    ok = (np.array_equal(one("coef_table"), coef) and np.array_equal(one("timesteps"), plan.timesteps.numpy())
          and int(one("trips")) == plan.steps)
    if not ok:
        raise ExportValidationError("the exported Loop's tables differ from the plan's; nothing was written. "
                                    "Please report this with the model config")


def _resolve_unroll(plan, unroll):
    if plan is None:
        return None
    return plan.steps <= UNROLL_MAX_STEPS if unroll is None else unroll


def _network(model, model_fp, dtype, opset, shape, say=lambda line: None):
    """The eps-model graph, from the cache when this (model, dtype, opset, shape) was exported before."""
    onnx = _import_onnx()
    key = _export_key(model_fp, None, dtype, opset, shape, None)
    path = _cache_path(key, None, dtype)
    if path.is_file():
        try:
            proto = onnx.load(str(path))
            stats["cache_hits"] += 1
            return proto
        except Exception as e:  # a damaged cache entry is rebuilt, not fatal
            warnings.warn(f"ignoring the damaged cache entry {path} ({type(e).__name__}); re-exporting", stacklevel=3)
    say(f"exporting the network with torch.onnx ({EXPORT_DTYPES[dtype]}; the slow part: seconds for a small "
        "model, a minute for a large one)")
    proto = _torch_export(model, dtype, opset, shape)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next export
        path.parent.mkdir(parents=True, exist_ok=True)
        _set_metadata(proto, _metadata(model, None, dtype, shape, key, None, _opset(proto)))
        atomic_write_bytes(path, proto.SerializeToString())
    return proto


def _write(path, proto) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / 'model.onnx'}")
    size = proto.ByteSize()
    if size >= 2**31 - 1:
        raise ValueError(f"the graph is {size / 2**30:.1f} GiB, over protobuf's 2 GiB limit for one file; "
                         "export the eps-model, or use fewer steps with unroll=False")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, proto.SerializeToString())


def export_cached(model, plan: SamplingPlan | None = None, dtype=torch.float32, opset: int | None = None, *,
                  shape=None, unroll: bool | None = None, model_fp: str | None = None) -> Path:
    """export_onnx into the cache folder (cache_dir()), keyed by a content hash of the weights, config,
    plan, dtype, opset and ddim-fast version: a second call with the same inputs returns the file
    without exporting. model_fp: model_fingerprint(model), when the caller already has it."""
    shape = _check_args(model, plan, dtype, opset, shape, unroll)
    unroll = _resolve_unroll(plan, unroll)
    model_fp = model_fp or model_fingerprint(model)
    path = _cache_path(_export_key(model_fp, plan, dtype, opset, shape, unroll), plan, dtype)
    if path.is_file():
        stats["cache_hits"] += 1
        return path
    proto, _ = _build(model, plan, dtype, opset, shape, unroll, True, model_fp)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write(path, proto)


# == 7. validation under DESIGN.md's tolerance rule =================================================
def tolerance_ok(err_fast: float, err_low: float, dtype) -> bool:
    """DESIGN.md: error vs float64 <= 2 x the reference's error in the same precision + atol."""
    atol = ATOL[EXPORT_DTYPES.get(dtype, "bf16") if isinstance(dtype, torch.dtype) else dtype]
    return err_fast <= 2 * err_low + atol


@torch.no_grad()
def validate_export(proto_or_path, model, plan: SamplingPlan | None, dtype=torch.float32, shape=None, *,
                    batch: int | None = None, seed: int = 0) -> dict:
    """Run the exported graph in ONNX Runtime (CPU EP) on random inputs and compare it with the
    float64 reference (the model in float64; ddim_fast.sampling for a sampler). Raises
    ExportValidationError when the tolerance rule fails; returns the errors otherwise."""
    from .sampling import invert, sample

    shape = sample_shape(model, shape)
    # batch 3 for the network (traced at 2: checks the dynamic batch); 2 for a sampler, whose float64
    # reference costs S network calls (per-sample ops such as thresholding still see two samples)
    batch = batch or (3 if plan is None else 2)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen)  # (B, C, H, W)
    m64 = _eval_copy(model, torch.float64)
    low = _Network(_eval_copy(model, dtype), dtype)
    runner = OrtRunner(proto_or_path, device="cpu")
    if plan is None:
        T = getattr(getattr(model, "schedule", None), "T", 1000)
        t = torch.randint(0, T, (batch,), generator=gen)
        ref64 = m64(x.double(), t)
        ref_low = low(x, t)
        fast = runner(x=x, t=t)
    else:
        noise = torch.randn(plan.steps, *x.shape, generator=gen) if plan.needs_noise else None
        if plan.direction == "invert":
            ref64, ref_low = invert(m64, x.double(), plan), invert(low, x, plan)
            fast = runner(x0=x)
        else:
            n64 = noise.double() if noise is not None else None
            ref64, ref_low = sample(m64, x.double(), plan, noise=n64), sample(low, x, plan, noise=noise)
            feeds = {"x_T": x} if noise is None else {"x_T": x, "noise": noise}
            fast = runner(**feeds)
    err_fast = (fast.double() - ref64).abs().max().item()
    err_low = (ref_low.double() - ref64).abs().max().item()
    what = "eps-model" if plan is None else f"{plan.direction} sampler ({plan.steps} steps)"
    if not (math.isfinite(err_fast) and tolerance_ok(err_fast, err_low, dtype)):
        raise ExportValidationError(
            f"the exported {what} does not match the reference: max error vs float64 {err_fast:.3g}, but the "
            f"torch reference in {EXPORT_DTYPES[dtype]} has {err_low:.3g} (allowed: 2 x that + "
            f"{ATOL[EXPORT_DTYPES[dtype]]:g}). Nothing was written; please report this with the model config"
        )
    return {"err_onnx": err_fast, "err_torch": err_low}


# == 8. ONNX Runtime sessions =======================================================================
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((base / "physical_package_id").read_text().strip(), (base / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def session_options(threads: int | None = None, *, spinning: bool = True, parallel: bool = False):
    """CPU EP settings: intra-op threads = physical cores (or $DDIM_FAST_ORT_THREADS), sequential
    execution, full graph optimisation.
    NOTE: bench_cpu_backends.py, CIFAR-10 UNet, S=10, B=1, 2-core shared VM: 2 threads 885 ms vs 1 thread
    1575 ms; parallel execution 1932 ms (the UNet is a chain: nothing to overlap). Spinning threads won
    (885 vs 1100 ms) in the quietest run and lost (5250 vs 3197 ms) under heavy load: left on (ORT's
    default, for dedicated cores); spinning=False is the choice for a shared machine."""
    ort = _import_ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or int(os.environ.get("DDIM_FAST_ORT_THREADS", 0) or 0) or physical_cores()
    so.inter_op_num_threads = 1 if not parallel else so.intra_op_num_threads
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT warns about every initializer it folds
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _providers(device: torch.device, cuda_graph: bool):
    ort = _import_ort()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise ValueError(f"the onnxruntime backend runs on cpu or cuda, got device {device}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError(
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider here (it has "
            f"{', '.join(ort.get_available_providers())}): pip install 'ddim-fast[gpu]' (onnxruntime-gpu "
            "instead of onnxruntime) or use device='cpu'"
        )
    opts = {"device_id": device.index or 0, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]


class OrtRunner:
    """An exported ddim-fast graph in an ONNX Runtime session, called with torch tensors.

    device cpu:  the CPU EP (session_options); inputs go in as zero-copy numpy views.
    device cuda: the CUDA EP with IO binding: inputs and outputs are bound by their CUDA pointers,
                 so nothing goes through the host. cuda_graph=True adds ORT's CUDA graph (static
                 input/output buffers per batch size; the graph must run entirely on the CUDA EP).
    """

    def __init__(self, path_or_proto, *, device="cpu", threads: int | None = None, cuda_graph: bool = False,
                 options=None):
        """options: an onnxruntime.SessionOptions replacing session_options(threads)."""
        ort = _import_ort()
        self.device = torch.device(device)
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        providers = _providers(self.device, self.cuda_graph)
        if isinstance(path_or_proto, (str, Path)):
            self.path = _existing(path_or_proto)
            source = str(self.path)
        else:
            self.path = None
            source = path_or_proto.SerializeToString()
        try:
            self.session = ort.InferenceSession(source, options or session_options(threads), providers=providers)
        except Exception as e:
            if self.path is not None and _is_load_error(e):
                raise _damaged(self.path, e) from None
            raise
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ValueError(
                "onnxruntime could not load its CUDAExecutionProvider (missing or mismatched CUDA / cuDNN "
                "libraries; see onnxruntime's log) and fell back to the CPU: install the onnxruntime-gpu build "
                "that matches your CUDA (pip install 'ddim-fast[gpu]') or use device='cpu'"
            )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name
        self._out_shape = self.session.get_outputs()[0].shape
        self._static = {}  # CUDA graph: batch -> (binding, inputs, output)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        if sorted(inputs) != sorted(self.inputs):
            raise ValueError(f"this graph takes inputs {self.inputs}, got {sorted(inputs)}")
        if self.device.type == "cpu":
            feeds = {k: v.detach().to("cpu").contiguous().numpy() for k, v in inputs.items()}
            return torch.from_numpy(self.session.run([self.output], feeds)[0])
        return self._run_cuda(inputs)

    def _output_shape(self, inputs):
        first = inputs[self.inputs[0]]
        if self.inputs[0] == "noise":
            first = inputs[self.inputs[1]]
        B = first.shape[0]
        return tuple(B if not isinstance(d, int) else d for d in self._out_shape)

    def _run_cuda(self, inputs):
        inputs = {k: v.detach().to(self.device).contiguous() for k, v in inputs.items()}
        out_shape = self._output_shape(inputs)
        if self.cuda_graph:
            return self._run_graph(inputs, out_shape)
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        binding = self._bind(inputs, out)
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    def _bind(self, inputs, out):
        binding = self.session.io_binding()
        idx = self.device.index or 0
        for name, v in inputs.items():
            binding.bind_input(name, "cuda", idx, _np_dtype(v.dtype), tuple(v.shape), v.data_ptr())
        binding.bind_output(self.output, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
        return binding

    def _run_graph(self, inputs, out_shape):
        key = tuple((k, tuple(v.shape)) for k, v in sorted(inputs.items()))
        if key not in self._static:  # ORT captures on the first run with these addresses
            static = {k: torch.empty_like(v) for k, v in inputs.items()}
            out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
            self._static[key] = (self._bind(static, out), static, out)
        binding, static, out = self._static[key]
        for k, v in inputs.items():
            static[k].copy_(v)
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out.clone()  # the next replay overwrites `out`


def _np_dtype(dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


def _is_load_error(e) -> bool:
    name = type(e).__name__
    text = str(e)
    return name in ("InvalidProtobuf", "InvalidGraph", "Fail", "NoSuchFile") or "protobuf" in text.lower() \
        or "Load model" in text


# == 9. the Engine backend ==========================================================================
class OrtSamplerBackend:
    """backend="onnxruntime" of dd.Engine: the whole exported sampler in one ONNX Runtime call.

    The sampling plan's graph is exported (or found in the cache) on construction; an inversion
    plan's graph on its first use. Noise for eta > 0 is generated on the host side with
    ddim_fast.rng (on `device`) and fed in, so a seed gives the reference backend's samples.
    """

    def __init__(self, model, plan: SamplingPlan, *, device, dtype, shape, opset: int | None = None,
                 unroll: bool | None = None, threads: int | None = None, cuda_graph: bool = False):
        _import_ort()
        if dtype not in EXPORT_DTYPES:
            raise ValueError(f"the onnxruntime backend runs the network in fp32 or fp16, got {dtype}; "
                             "use backend='reference' (or 'cuda_graph' on CUDA) for bfloat16")
        self.device = torch.device(device)
        _providers(self.device, cuda_graph)  # fail early on a missing CUDA EP, before any export
        self.model = _eval_copy(model, torch.float32)  # the caller's model may change later; this may not
        self.model_fp = model_fingerprint(self.model)
        self.dtype, self.shape, self.opset, self.unroll = dtype, tuple(shape), opset, unroll
        self.threads, self.cuda_graph = threads, cuda_graph
        if self.device.type == "cuda" and unroll is None:
            self.unroll = True  # control flow (Loop) breaks ORT's CUDA graph and splits CUDA-EP partitions
        self._runners = {}  # plan fingerprint -> (plan, OrtRunner)
        self.paths = {}
        self.runner(plan)

    def runner(self, plan: SamplingPlan) -> OrtRunner:
        key = plan_fingerprint(plan)
        if key not in self._runners:
            path = self._export(plan)
            try:
                runner = OrtRunner(path, device=self.device, threads=self.threads, cuda_graph=self.cuda_graph)
            except ValueError as e:
                if "damaged or truncated" not in str(e):
                    raise
                warnings.warn(f"re-exporting the damaged cache entry {path}", stacklevel=2)
                path.unlink(missing_ok=True)
                path = self._export(plan)
                runner = OrtRunner(path, device=self.device, threads=self.threads, cuda_graph=self.cuda_graph)
            self._runners[key] = (plan, runner)
            self.paths[plan.direction] = path
        return self._runners[key][1]

    def _export(self, plan):
        return export_cached(self.model, plan, self.dtype, self.opset, shape=self.shape, unroll=self.unroll,
                             model_fp=self.model_fp)

    @torch.no_grad()
    def run(self, x, plan, *, seed, noise, first_index):
        """x (B, C, H, W) float32 on the device -> the final state (B, C, H, W), unclamped."""
        runner = self.runner(plan)
        x = x.to(self.device, torch.float32).contiguous()
        x_in = "x_T" if plan.direction == "sample" else "x0"
        feeds = {x_in: x}
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


# == 10. the `ddim-fast export` command =============================================================
def add_cli_arguments(p):
    import argparse

    from .commands import clip_arg
    from .plan import VARIANCES
    from .schedule import SPACINGS

    p.add_argument("--model", default="digits", help="checkpoint folder, official ckpt.pth, diffusers folder "
                   "or bundled name (default: digits)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--whole-sampler", action="store_true",
                   help="export the whole S-step sampler (x_T [, noise] -> x0) instead of the eps-model")
    p.add_argument("--invert", action="store_true", help="with --whole-sampler: export the DDIM encoder x0 -> x_T")
    p.add_argument("--steps", type=int, default=None, help="sampling steps S (default: 20)")
    p.add_argument("--eta", type=float, default=None, help="0 = DDIM (default), 1 = DDPM; > 0 adds a noise input")
    p.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="timestep sub-sequence (default: the model's own, e.g. a diffusers scheduler's, else uniform)")
    p.add_argument("--variance", default=None, choices=VARIANCES, help="'large' = the paper's sigma-hat")
    p.add_argument("--clip-x0", type=clip_arg, default=argparse.SUPPRESS, metavar="C",
                   help="clip the x0 estimate to [-C, C], or 'none' (default: the model's own setting, else none)")
    p.add_argument("--threshold", type=float, default=None, metavar="P", help="dynamic thresholding quantile")
    p.add_argument("--graph", default="auto", choices=("auto", "unrolled", "loop"), help="layout of the S steps")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="network precision")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's)")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the ONNX Runtime check against the reference")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")


def cli_main(args) -> int:
    import time

    from .commands import _load

    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out must name an .onnx file, got {out}")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write {out}: {parent} is not a writable folder; choose another --out")
    sampler_opts = {k: getattr(args, k, None) for k in ("steps", "eta", "spacing", "variance", "clip_x0", "threshold")}
    given = [k for k, v in sampler_opts.items() if v is not None or (k == "clip_x0" and hasattr(args, k))]
    given += ["invert"] if args.invert else []
    if not args.whole_sampler and given:
        raise ValueError(f"--{given[0].replace('_', '-')} only applies to --whole-sampler; add --whole-sampler "
                         "or drop it")
    _import_onnx()  # the extras, before any work
    _import_ort()
    model = _load(args)
    plan = None
    if args.whole_sampler:
        if model.schedule is None:
            raise ValueError(f"{args.model} carries no noise schedule; convert it with `ddim-fast convert`")
        steps = 20 if sampler_opts["steps"] is None else sampler_opts["steps"]
        eta = 0.0 if sampler_opts["eta"] is None else sampler_opts["eta"]
        overrides = {k: sampler_opts[k] for k in given if k in ("spacing", "clip_x0", "threshold")}
        plan = SamplingPlan.for_model(model, steps, eta=eta, variance=sampler_opts["variance"] or "ddim", **overrides)
        if args.invert:
            plan = plan.inverse()
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    unroll = {"auto": None, "unrolled": True, "loop": False}[args.graph]
    t0 = time.perf_counter()

    def log(line):
        print(f"  [{time.perf_counter() - t0:5.1f} s] {line}...", flush=True)

    export_onnx(model, out, plan, dtype=dtype, opset=args.opset, validate=args.validate, unroll=unroll, log=log)
    meta = onnx_metadata(out)
    kind = "sampler" if plan is not None and plan.direction == "sample" else "DDIM encoder"
    what = "eps-model" if plan is None else f"{kind}, {plan.steps} steps, {meta['graph']}"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; {what}; {meta['dtype']}; opset {meta['opset']}"
          f"{'; validated against the reference' if args.validate else ''}) in {time.perf_counter() - t0:.1f} s")
    inputs = sorted(meta["inputs"].items(), key=lambda kv: kv[0] == "noise")  # the state first
    print("inputs: " + "; ".join(f"{k} {v}" for k, v in inputs))
    return 0
