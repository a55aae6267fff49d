"""ONNX Runtime: clear errors for missing packages, session options, providers, and OrtRunner,
an exported ddim-fast graph called with torch tensors (zero-copy on the CPU, IO binding on CUDA)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from ..checks import MissingExtra

INSTALL_HINT = "pip install 'ddim-fast[onnx]' (CPU) or 'ddim-fast[gpu]' (CUDA, onnxruntime-gpu)"


class OnnxRuntimeMissing(MissingExtra):
    """onnxruntime (or onnx / onnxscript) is not installed; the message names the extra to install."""


# -- imports with clear errors -----------------------------------------------------------------------
def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxRuntimeMissing(f"onnxruntime is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def import_onnx():
    try:
        import onnx
    except ImportError:
        raise OnnxRuntimeMissing(f"the onnx package is not installed (needed to export): {INSTALL_HINT}") from None
    return onnx



def first_line(err) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}: check the path, or export one with dd.export_onnx "
                                "(CLI: ddim-fast export)")
    return path


class DamagedOnnxFile(ValueError):
    """An ONNX file that cannot be read (truncated, zeroed, not protobuf). `path` names it, so the cache can
    repair its own entries by exporting again; a user's file gets the message, which says to re-export."""

    def __init__(self, path, err):
        self.path = Path(path)
        super().__init__(f"{path} is not a readable ONNX model ({first_line(err)}); the file is damaged or "
                         "truncated: re-export it (dd.export_onnx or `ddim-fast export`)")


def damaged(path, err) -> DamagedOnnxFile:
    return DamagedOnnxFile(path, err)


def read_proto(path, load_external_data: bool = True):
    """The onnx.ModelProto of an existing file; DamagedOnnxFile when it does not parse or holds no graph
    (protobuf parses an empty or zeroed file as an empty model)."""
    onnx = import_onnx()
    path = existing(path)
    try:
        proto = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:
        raise damaged(path, e) from None
    if not proto.graph.output:
        raise damaged(path, ValueError("the model has no graph"))
    return proto


# -- sessions ----------------------------------------------------------------------------------------
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


def busy() -> bool:
    """Whether other work is running here: the 1-minute load average at or above the physical cores (False
    where there is no load average)."""
    try:
        return os.getloadavg()[0] >= physical_cores()
    except OSError:
        return False


def spinning_default() -> bool:
    """Whether the CPU EP's intra-op threads spin while they wait for work (ONNX Runtime's default): yes
    unless the machine is busy() (spinning threads then take the cores others' work needs).
    $DDIM_FAST_ORT_SPIN=1 or 0 decides instead. The choice changes the speed only, never a number.
    NOTE: measured (bench_cpu_backends.py and docs/DESIGN.md, "The CPU path: one network session"): on
    the quiet 2-core VM spinning won (CIFAR-10 UNet, whole sampler, B=1: 885 against 1100 ms); under
    load it lost by far (5250 against 3197 ms; the digits network in the sampling loop, DDIM-20 at load
    averages of 4.5-9: 421 against 149 ms at batch 1, 2676 against 1309 at 16, 8799 against 5828 at 64)."""
    forced = os.environ.get("DDIM_FAST_ORT_SPIN")
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"DDIM_FAST_ORT_SPIN must be 1 (spin) or 0 (do not), got {forced!r}")
    return not busy()


@contextlib.contextmanager
def one_torch_thread_when_busy():
    """torch's intra-op threads set to 1 for the duration when the machine is busy(), then restored: eager
    PyTorch with more OpenMP threads than free cores waits on descheduled threads.
    NOTE: measured on the 2-core VM at load averages of 4.5-5: the TorchScript export of the digits UNet took
    3.5-4.8 s with 1 thread against 6.8-7.6 s with 2, the CIFAR-10 UNet's 10.8-10.9 s against 17.8-19.3 s.
    Process-wide while it lasts: other threads' torch calls run on one thread meanwhile."""
    before = torch.get_num_threads()
    if busy() and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def session_options(threads: int | None = None, *, spinning: bool | None = None, parallel: bool = False):
    """CPU EP settings: intra-op threads = physical cores (or $DDIM_FAST_ORT_THREADS), sequential
    execution, full graph optimisation; spinning: None = spinning_default().
    NOTE: bench_cpu_backends.py, CIFAR-10 UNet, S=10, B=1, 2-core shared VM: 2 threads 885 ms vs 1 thread
    1575 ms; parallel execution 1932 ms (the UNet is a chain: nothing to overlap)."""
    ort = import_ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or int(os.environ.get("DDIM_FAST_ORT_THREADS", 0) or 0) or physical_cores()
    so.inter_op_num_threads = 1 if not parallel else so.intra_op_num_threads
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT warns about every initializer it folds
    if not (spinning_default() if spinning is None else spinning):
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def execution_providers(device: torch.device, cuda_graph: bool):
    ort = import_ort()
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
        ort = import_ort()
        self.device = torch.device(device)
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        providers = execution_providers(self.device, self.cuda_graph)
        if isinstance(path_or_proto, (str, Path)):
            self.path = existing(path_or_proto)
            source = str(self.path)
        else:  # a ModelProto, or one already serialized (bytes)
            self.path = None
            source = path_or_proto if isinstance(path_or_proto, bytes) else path_or_proto.SerializeToString()
        try:
            self.session = ort.InferenceSession(source, options or session_options(threads), providers=providers)
        except Exception as e:
            if self.path is not None and _is_load_error(e):
                raise damaged(self.path, e) from None
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
