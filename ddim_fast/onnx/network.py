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
    """model(x, t) with the network in `dtype` and float32 in and out (the sampler state's precision)."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x, t):
        return self.model(x.to(self.dtype), t).to(torch.float32)


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


def torch_export(model, dtype, opset, shape):
    """The eps-model as an onnx.ModelProto: inputs x (B, C, H, W) float32, t (B,) int64; output
    `prediction` (B, C', H, W) float32. The batch dimension is dynamic."""
    import_onnx()
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise OnnxRuntimeMissing(f"onnxscript is not installed (torch.onnx needs it): {INSTALL_HINT}") from None
    net = Network(eval_copy(model, dtype), dtype).eval()
    x = torch.randn(2, *shape)  # batch 2: torch.export specialises a traced batch of 1
    t = torch.tensor([1, 2], dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=2**20)
    with quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                net, (x, t), None, input_names=["x", "t"], output_names=["prediction"], dynamo=True,
                dynamic_shapes={"x": {0: batch}, "t": {0: batch}}, opset_version=opset, verbose=False,
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
