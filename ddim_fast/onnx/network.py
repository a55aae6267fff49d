"""The network as it is exported: a private CPU copy in the export precision with float32 in and out
(the sampler state's precision), traced once by torch.onnx (the torch.export-based exporter)."""

from __future__ import annotations

import contextlib
import copy
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


def torch_export(model, dtype, opset, shape, cond=None):
    """The eps-model as an onnx.ModelProto: inputs x (B, C, H, W) float32, t (B,) int64, and one input
    per conditioning tensor of `cond` (an example dict, {name: (2, ...) tensor}: its dtypes and its
    shapes after the batch are fixed in the graph; float ones are float32 inputs); output
    `prediction` (B, C', H, W) float32. The batch dimension is dynamic."""
    import_onnx()
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise OnnxRuntimeMissing(f"onnxscript is not installed (torch.onnx needs it): {INSTALL_HINT}") from None
    cond = dict(cond or {})
    names = list(cond)
    net = _Positional(Network(eval_copy(model, dtype), dtype), names).eval()
    x = torch.randn(2, *shape)  # batch 2: torch.export specialises a traced batch of 1
    t = torch.tensor([1, 2], dtype=torch.int64)
    conds = tuple(v.float() if v.is_floating_point() else v.long() for v in cond.values())
    batch = torch.export.Dim("batch", min=1, max=2**20)
    dynamic = {"x": {0: batch}, "t": {0: batch}}
    if names:
        dynamic["conds"] = tuple({0: batch} for _ in names)
    with quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                net, (x, t, *conds), None, input_names=["x", "t", *names], output_names=["prediction"],
                dynamo=True, dynamic_shapes=dynamic, opset_version=opset, verbose=False,
            )
        except Exception as e:
            raise ValueError(
                f"torch.onnx could not export {type(model).__name__} ({type(e).__name__}: {first_line(e)}); "
                "the model's forward must be traceable by torch.export (no data-dependent Python control flow)"
            ) from e
    proto = program.model_proto
    if opset is not None and opset_of(proto) != opset:
        raise ValueError(f"torch.onnx wrote opset {opset_of(proto)}, not the requested {opset}; "
                         "pick an opset it supports (18 or newer) or leave opset unset")
    return proto


def opset_of(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
