"""The ONNX side of the onnxruntime backend, one object per job:

    net = NetworkSession(model, torch.float32)      # gets or exports the eps-model, checks it, opens a session
    m = net(x, t)                                   # (B, C, H, W) float32 in and out, like model(x, t)
    x0 = dd.sample(net, x_T, plan)                  # so the reference loop runs with ONNX Runtime's network

NetworkSession: the network (the eps-model) in ONNX Runtime. It finds its checked export in the cache or
exports it (export.network_file: TorchScript first, dynamo as the fallback, both checked against the
float64 reference), opens the session, builds the feeds from torch tensors, runs, and repairs a damaged
cache entry by exporting again when the session cannot read the file (runtime.DamagedOnnxFile, typed).
On a CPU the backend runs ddim_fast.sampling's loop around it, so every plan (any steps, spacing, eta,
sampler, table; inversion) and guidance (a doubled batch) use one export and one session per (weights,
dtype, opset, shape, conditioning inputs). Sessions are kept in a small process-wide LRU keyed by the
cache file, the device and the threads, so a second Engine on the same model opens none.

SamplerGraphs: the whole-sampler graphs of the CUDA path (baked, unrolled, IO binding, optionally ORT's
CUDA graph), exported and opened on first use per (plan, conditioning inputs, guided): `encode` builds
only the inversion graph. host_noise fills their `noise` input from ddim_fast.rng.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from .. import rng
from ..conditioning import cond_spec, null_cond
from ..plan import SamplingPlan
from .cache import plan_fingerprint
from .export import discard_damaged, export_cached, network_file, network_fingerprint, network_job, stats
from .network import eval_copy
from .runtime import DamagedOnnxFile, OrtRunner

# Network sessions kept open in this process, least recently used dropped first: one per model, precision
# and conditioning shape in use (each holds its weights: 4 MB for the digits model, 143 MB for CIFAR-10's).
SESSIONS_KEPT = 4
_sessions: OrderedDict = OrderedDict()  # (path, device, threads) -> OrtRunner
_lock = threading.Lock()


def _session(key, open_runner):
    """The kept session of `key`, or open_runner() remembered under it."""
    with _lock:
        if key in _sessions:
            _sessions.move_to_end(key)
            return _sessions[key]
    runner = open_runner()
    with _lock:
        _sessions[key] = runner
        while len(_sessions) > SESSIONS_KEPT:
            _sessions.popitem(last=False)
    return runner


def clear_sessions():
    """Close every kept network session (the next NetworkSession opens its own)."""
    with _lock:
        _sessions.clear()


def signature(example: dict | None) -> tuple | None:
    """What a network graph depends on of its conditioning inputs: names, per-sample shapes, and whether
    each is floating point (the graph takes float32 or int64, whatever the caller's dtype)."""
    if not example:
        return None
    return tuple((k, tuple(v.shape[1:]), v.is_floating_point()) for k, v in sorted(example.items()))


class NetworkSession:
    """The network (eps-model) of `model` in an ONNX Runtime session, called like the model:
    net(x, t, **cond) -> the prediction (B, C, H, W) float32.

    dtype: the network's precision (fp32 or fp16; float32 in and out); shape: (C, H, W), from the model's
    config when omitted; cond: example conditioning inputs fixing the graph's (their shapes after the batch;
    default: the model's cond_spec, a length of 77 for encoder_hidden_states); device, threads: of the
    session; model_fp: export.network_fingerprint(model) when the caller has it. Exports on construction
    when the cache holds no checked export; a model that changes later does not change this session.
    """

    def __init__(self, model, dtype=torch.float32, *, shape=None, opset: int | None = None, device="cpu",
                 threads: int | None = None, cond: dict | None = None, model_fp: str | None = None):
        self.job = network_job(model, dtype, opset, shape=shape, cond=cond, model_fp=model_fp)
        self.device, self.threads = torch.device(device), threads
        self.names = list(self.job.example)  # the conditioning inputs, in the graph's order after x and t
        self.null = null_cond(cond_spec(self.job.model) or {}, 1) or {}
        self.key = (str(self.job.path), str(self.device), threads)
        self.runner = _session(self.key, self._open)
        self.path = self.runner.path or self.job.path

    def _open(self) -> OrtRunner:
        path, runner = network_file(self.job, self.threads)  # runner: the check's CPU session of a fresh export
        if runner is None or self.device.type != "cpu":
            try:
                runner = OrtRunner(path, device=self.device, threads=self.threads)
            except DamagedOnnxFile as e:  # a cache entry damaged on disk: export it again
                discard_damaged(e)
                path, runner = network_file(self.job, self.threads)
                if runner is None or self.device.type != "cpu":
                    runner = OrtRunner(path, device=self.device, threads=self.threads)
        runner.path = path
        stats["sessions"] += 1
        return runner

    @property
    def exporter(self) -> str | None:
        """Which torch.onnx exporter made the graph (from its metadata): "torchscript" or "dynamo"."""
        from .export import onnx_metadata

        return onnx_metadata(self.path).get("exporter")

    def feeds(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> dict:
        """The session's inputs for state x (B, C, H, W), timesteps t (B,) and conditioning `cond`
        (a missing input takes the model's null value)."""
        extra = sorted(set(cond) - set(self.names))
        if extra:
            raise ValueError(f"this network takes {', '.join(self.names) or 'no conditioning'}, not {', '.join(extra)}")
        B = x.shape[0]
        feeds = {"x": x, "t": t.expand(B)}
        for name in self.names:
            v = cond.get(name)
            if v is None:
                if name not in self.null:
                    raise ValueError(f"this network needs {name} (the model has no null value for it)")
                v = self.null[name].expand(B)
            feeds[name] = v.float() if v.is_floating_point() else v.long()
        return feeds

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        feeds = self.feeds(x, t, cond)
        if self.device.type != "cpu":
            return self.runner(**feeds)
        # the CPU EP reads numpy views of the tensors (no copy for contiguous float32 / int64 tensors)
        arrays = {k: _numpy(v, np.float32 if k == "x" or v.is_floating_point() else np.int64) for k, v in feeds.items()}
        return torch.from_numpy(self.runner.session.run([self.runner.output], arrays)[0])


def _numpy(v: torch.Tensor, dtype):
    return np.ascontiguousarray(v.detach().to("cpu").numpy(), dtype=dtype)


class SamplerGraphs:
    """The whole-sampler graphs of one model (the CUDA path of the onnxruntime backend): baked tables,
    unrolled by default (ORT's CUDA graph and CUDA-EP partitions do not survive a Loop), in sessions with
    IO binding. Each is exported (or found in the cache) and opened on first use per (plan, conditioning
    inputs, guided), and at most `kept` stay open."""

    def __init__(self, model, dtype, *, shape, device, opset=None, unroll=True, threads=None, cuda_graph=False,
                 kept: int = 4):
        self.model = eval_copy(model, torch.float32)  # the caller's model may change later; this may not
        self.model_fp = network_fingerprint(self.model)
        self.dtype, self.shape, self.device = dtype, tuple(shape), torch.device(device)
        self.opset, self.unroll, self.threads, self.cuda_graph = opset, unroll, threads, cuda_graph
        self.spec = cond_spec(self.model) or {}
        self.kept = kept
        self._runners = OrderedDict()  # (plan fingerprint, conditioning signature, guided) -> OrtRunner
        self.paths = {}  # direction -> the file last opened for it

    def runner(self, plan: SamplingPlan, example: dict | None = None, guided: bool = False) -> OrtRunner:
        """The session of `plan`'s graph; example: conditioning inputs (their names, shapes and dtypes
        choose the graph), guided: with classifier-free guidance."""
        key = (plan_fingerprint(plan), signature(example), guided)
        if key not in self._runners:
            cond = {k: v.cpu() for k, v in example.items()} if example else None

            def export():
                return export_cached(self.model, plan, self.dtype, self.opset, shape=self.shape, unroll=self.unroll,
                                     model_fp=self.model_fp, guided=guided, cond=cond)

            path = export()
            try:
                runner = OrtRunner(path, device=self.device, threads=self.threads, cuda_graph=self.cuda_graph)
            except DamagedOnnxFile as e:
                discard_damaged(e)
                path = export()
                runner = OrtRunner(path, device=self.device, threads=self.threads, cuda_graph=self.cuda_graph)
            self._runners[key] = runner
            self.paths[plan.direction] = path
            while len(self._runners) > self.kept:
                self._runners.popitem(last=False)
        self._runners.move_to_end(key)
        return self._runners[key]

    def run(self, x, plan, *, seed, noise, first_index, cond=None):
        """x (B, C, H, W) float32 -> the final state (B, C, H, W), unclamped; cond: a checked Conditioning."""
        x = x.to(self.device, torch.float32).contiguous()
        feeds = {"x_T" if plan.direction == "sample" else "x0": x}
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
