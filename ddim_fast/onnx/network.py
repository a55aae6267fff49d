"""The network as it is exported: a private CPU copy in the export precision with float32 in and out
(the sampler state's precision), traced once by torch.onnx: its TorchScript exporter, or torch.export's
(dynamo) where that fails."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings

import torch

from .runtime import INSTALL_HINT, OnnxRuntimeMissing, first_line, import_onnx


class Network(torch.nn.Module):
    """model(x, t, **cond) with the network in `dtype` and float32 in and out (the sampler state's
    precision); floating-point conditioning inputs are cast to `dtype` too."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x, t, **cond):
        cond = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}
        return self.model(x.to(self.dtype), t, **cond).to(torch.float32)


class _Positional(torch.nn.Module):
    """The network with its conditioning inputs as positional arguments, in `names` order (the graph's
    inputs x, t, *names): torch.export names graph inputs after positional arguments."""

    def __init__(self, net, names):
        super().__init__()
        self.net, self.names = net, tuple(names)

    def forward(self, x, t, *conds):
        return self.net(x, t, **dict(zip(self.names, conds)))


def eval_copy(model, dtype):
    """A private copy on the CPU in `dtype`, eval mode, reference ops (Triton ops do not export)."""
    net = copy.deepcopy(model).to("cpu", dtype).eval()
    if hasattr(net, "set_ops"):
        net.set_ops("reference")
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@contextlib.contextmanager
def quiet_exporter():
    """The exporters log optional-dependency notes (torchvision ops), deprecations and the tracer's notes on
    Python booleans (the UNet's input checks, constant for a traced batch): not ours to show."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning, torch.jit.TracerWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        logger.setLevel(level)


# The two exporters of torch.onnx, tried in this order (export.py validates each result and falls back).
# NOTE: measured on the 2-core VM, torch 2.13, each export in a fresh process (docs/DESIGN.md, "The exporters"):
# the TorchScript exporter (dynamo=False) traced the bundled digits UNet in 9.4 s against 46.7 s for
# dynamo=True, and the CIFAR-10 UNet in 11.7 s against 61.1 s (under load averages of 4.7-6.6), with equal
# errors against the float64 reference (digits 1.0e-6 and 9.7e-7, CIFAR-10 8.8e-7 and 1.0e-6) and graphs
# that are bitwise batch-invariant (batch 16 against 16 x batch 1) from both.
EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx's TorchScript exporter writes opsets up to 20


def exporters_for(opset) -> tuple:
    """The exporters to try for `opset`, in order: TorchScript only where it can write that opset."""
    return EXPORTERS if opset is None or opset <= TORCHSCRIPT_MAX_OPSET else ("dynamo",)


TRACE_BATCH = 3


def torch_export(model, dtype, opset, shape, cond=None, exporter: str = "torchscript", copy=None):
    """The eps-model as an onnx.ModelProto: inputs x (B, C, H, W) float32, t (B,) int64, and one input
    per conditioning tensor of `cond` (an example dict, {name: (n, ...) tensor}, its rows repeated to the
    traced batch: its dtypes and its shapes after the batch are fixed in the graph; float ones are float32
    inputs); output `prediction` (B, C', H, W) float32. The batch dimension is dynamic. exporter: "torchscript"
    (torch.onnx.export(dynamo=False): a trace) or "dynamo" (torch.export); ValueError when it fails.
    copy: eval_copy(model, dtype) when the caller has one (tracing leaves it as it is)."""
    onnx = import_onnx()
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        except ImportError:
            raise OnnxRuntimeMissing(f"onnxscript is not installed (torch.onnx needs it): {INSTALL_HINT}") from None
    cond = dict(cond or {})
    names = list(cond)
    net = _Positional(Network(copy if copy is not None else eval_copy(model, dtype), dtype), names).eval()
    # traced at TRACE_BATCH; torch.export specialises a batch of 1, and the check runs another batch (2)
    x = torch.randn(TRACE_BATCH, *shape)
    t = torch.arange(1, TRACE_BATCH + 1, dtype=torch.int64)
    rows = torch.arange(TRACE_BATCH)
    conds = tuple((v.float() if v.is_floating_point() else v.long())[rows % v.shape[0]] for v in cond.values())
    inputs = ["x", "t", *names]
    with quiet_exporter(), torch.no_grad():
        try:
            if exporter == "torchscript":
                buf = io.BytesIO()
                torch.onnx.export(net, (x, t, *conds), buf, input_names=inputs, output_names=["prediction"],
                                  dynamo=False, dynamic_axes={k: {0: "B"} for k in (*inputs, "prediction")},
                                  opset_version=opset, verbose=False)
                proto = onnx.load_from_string(buf.getvalue())
            else:
                batch = torch.export.Dim("batch", min=1, max=2**20)
                dynamic = {"x": {0: batch}, "t": {0: batch}}
                if names:
                    dynamic["conds"] = tuple({0: batch} for _ in names)
                proto = torch.onnx.export(
                    net, (x, t, *conds), None, input_names=inputs, output_names=["prediction"],
                    dynamo=True, dynamic_shapes=dynamic, opset_version=opset, verbose=False,
                ).model_proto
        except Exception as e:
            raise ValueError(
                f"torch.onnx ({exporter}) could not export {type(model).__name__} ({type(e).__name__}: "
                f"{first_line(e)}); the model's forward must be traceable (no data-dependent Python control flow)"
            ) from e
    got = [i.name for i in proto.graph.input]
    if got != inputs or [o.name for o in proto.graph.output] != ["prediction"]:
        raise ValueError(f"torch.onnx ({exporter}) wrote a graph with inputs {got}, not {inputs} (an input the "
                         "model does not use is dropped)")
    if opset is not None and opset_of(proto) != opset:
        raise ValueError(f"torch.onnx wrote opset {opset_of(proto)}, not the requested {opset}; "
                         "pick an opset it supports (18 or newer) or leave opset unset")
    return proto


def opset_of(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
