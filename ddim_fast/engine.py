"""Engine: a model, a plan and a backend, ready to sample many times.

    eng = dd.Engine(model, plan, backend="auto", device="cuda", dtype=torch.float16)
    imgs = eng.sample(16, seed=0)        # (16, C, H, W) float32 in [-1, 1]
    imgs = eng(x_T)                      # from a given start
    x_T = eng.invert(imgs)               # DDIM encoding (eta=0 plans)

Backends (all produce the reference sampler's result, within DESIGN.md's tolerance rule):
  reference    eager PyTorch (ddim_fast.sampling) on any device: the truth.
  triton       the UNet with fused Triton GroupNorm(+SiLU) and attention, and the fused step
               kernel (noise drawn in-kernel), launched eagerly. CUDA, or CPU under
               TRITON_INTERPRET=1 (for tests: very slow).
  cuda_graph   the triton backend's whole S-step loop (UNet + step, every step) captured into
               one CUDA graph and replayed: one launch per sample call instead of hundreds.
  onnxruntime  the exported whole sampler in ONNX Runtime (ddim_fast.onnx): CPU EP, or the CUDA
               EP with onnxruntime-gpu.
  auto         cuda_graph on CUDA; on CPU onnxruntime when installed, else reference. The choice
               and the reason are in `eng.backend` and `eng.backend_reason`.

The state x is float32 throughout; `dtype` is the network's precision (fp32, fp16 or bf16).
The Engine works on its own copy of the model (moved to `device` and `dtype`), so the caller's
model is never modified.

CUDA graph costs. A graph is captured on the first call for each (batch size, direction
(sample / invert), start (`sample`: x_T drawn by a kernel inside the graph; `eng(x_T)`: copied
in), noise source (seed / explicit noise=)) and kept in a small LRU cache (`max_graphs`,
default 4; evicting one frees its graph). Capture first runs the whole loop once eagerly
(Triton JIT, cuDNN algorithm search, allocator growth), then records it once more: about two
eager sampling calls of time, plus Triton's one-off compilation on a cold cache. Memory: the
activations of one UNet forward at that batch size (every step reuses them; all graphs share
one pool) plus static buffers for x (and x_T / noise when given) and the output copy. A new
batch size, image shape, dtype or plan (a new Engine) captures again; a new seed or
first_index does not (they live in (1,) device tensors). Replays copy the result out, so a
result the caller holds is never overwritten by the next replay. These costs are stated from
the mechanism; benchmarks/gpu_suite.py reports the measured first-call times.

Settings and limits. The Engine leaves torch's cuDNN and TF32 settings as the caller set them
(torch.backends.cudnn.enabled / deterministic / allow_tf32, torch.backends.cuda.matmul);
graph warm-up only turns on cuDNN's algorithm search (cudnn.benchmark) for its own duration,
and not at all when the caller asked for determinism. A batch larger than the fused kernels'
grid limit (MAX_BATCH = 65535 samples) is run in near-equal chunks (the same images: noise is
keyed by the global sample index); GroupNorm inputs of 2**31 elements or more are split over
the batch by the triton ops.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from collections import OrderedDict

import torch

from . import rng
from .checks import is_int
from .plan import SamplingPlan
from .sampling import NonFiniteError
from .sampling import sample as reference_sample

BACKENDS = ("auto", "reference", "triton", "cuda_graph", "onnxruntime")
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class BackendUnavailable(ValueError):
    """An explicitly requested backend cannot run here; the message says what is missing."""


class Engine:
    def __init__(
        self,
        model,
        plan: SamplingPlan,
        backend: str = "auto",
        device=None,
        dtype: torch.dtype = torch.float32,
        *,
        shape=None,
        channels_last: bool = False,
        max_graphs: int = 4,
        onnx_options: dict | None = None,
    ):
        """model: a UNet (or any nn.Module model(x, t)); plan: a sampling plan (eta=0 plans
        also give `invert`); device: default CUDA when available; dtype: the network's
        precision; shape: (C, H, W) of one sample, read from model.config when omitted;
        channels_last: run the network in NHWC memory format (often faster with fp16 convs);
        onnx_options: keyword arguments of the onnxruntime backend (ddim_fast.onnx.OrtSamplerBackend:
        threads, unroll, opset, cuda_graph)."""
        if not isinstance(plan, SamplingPlan) or plan.direction != "sample":
            raise ValueError("plan must be a sampling SamplingPlan (SamplingPlan.build(...)), not an inversion plan")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        if not is_int(max_graphs) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        self.device = torch.device(device) if device is not None else _default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("device='cuda' but torch sees no CUDA device; use device='cpu'")
        self.plan = plan
        self._inverse_plans = {}
        self.dtype = dtype
        self.shape = sample_shape(model, shape)
        self.channels_last = channels_last
        self.prediction = getattr(model, "prediction", plan.prediction)
        if self.prediction != plan.prediction:
            raise ValueError(
                f"the model predicts {self.prediction!r} but the plan was built for {plan.prediction!r}: "
                f"build the plan with prediction={self.prediction!r}"
            )
        self.backend, self.backend_reason = _choose_backend(backend, self.device)
        if onnx_options and self.backend != "onnxruntime":
            raise ValueError(f"onnx_options apply to the onnxruntime backend only, and this engine runs "
                             f"{self.backend!r} ({self.backend_reason}); drop them or pick backend='onnxruntime'")
        self.config = getattr(model, "config", None)
        self.schedule = getattr(model, "schedule", None)
        if self.backend == "onnxruntime":
            from .onnx import OrtSamplerBackend

            self._runner = OrtSamplerBackend(model, plan, device=self.device, dtype=dtype, shape=self.shape,
                                             **(onnx_options or {}))
            return
        # cuda_graph without Triton captures the PyTorch ops and the PyTorch step instead
        fused = self.backend != "reference" and triton_status(self.device) is None
        net = _prepare_model(model, self.device, dtype, channels_last, "triton" if fused else "reference")
        if self.backend == "reference":
            self._runner = _ReferenceRunner(net, dtype, channels_last)
        elif self.backend == "triton":
            self._runner = _TritonRunner(net, self.device, dtype, channels_last)
        else:
            self._runner = _GraphRunner(net, self.device, dtype, channels_last, fused, max_graphs)

    # -- public -------------------------------------------------------------------------------
    def sample(self, batch_size: int, seed: int = 0, *, first_index: int = 0) -> torch.Tensor:
        """`batch_size` images for samples first_index .. first_index+B-1 of `seed`, as a
        (B, C, H, W) float32 tensor in [-1, 1] on the engine's device. Sample k of a seed is the
        same image whatever the batch size, backend or device (to the tolerance rule)."""
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch_size, first_index = int(batch_size), _check_first_index(first_index, batch_size)
        seed = rng.check_seed(seed)
        if hasattr(self._runner, "sample"):  # triton / cuda_graph: x_T drawn in-kernel
            out = _in_chunks(batch_size, self.max_batch, lambda lo, hi: self._runner.sample(
                hi - lo, self.shape, self.plan, seed=seed, first_index=first_index + lo))
            return _finite(out, self.backend).clamp_(-1.0, 1.0)
        x_T = rng.initial_noise(seed, (batch_size, *self.shape), first_index=first_index, device=self.device)
        return self(x_T, seed=seed, first_index=first_index)

    def __call__(self, x_T: torch.Tensor, *, seed: int | None = None, noise: torch.Tensor | None = None,
                 first_index: int = 0) -> torch.Tensor:
        """Sample from a given start x_T (B, C, H, W); returns float32 images in [-1, 1].

        seed keys the per-step noise of eta > 0 plans (default: 0); noise (S, B, C, H, W)
        replaces it (parity tests)."""
        x_T = self._check_input(x_T, "x_T")
        if seed is not None and noise is not None:
            raise ValueError("give seed= or noise=, not both: noise= replaces the seeded generator")
        if noise is not None:
            want = (self.plan.steps, *x_T.shape)
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != want:
                raise ValueError(f"noise must have shape (steps, *x_T.shape) = {want}, "
                                 f"got {getattr(noise, 'shape', type(noise).__name__)}")
            noise = noise.to(self.device, torch.float32)
        seed = rng.check_seed(0 if seed is None else seed)
        first_index = _check_first_index(first_index, x_T.shape[0])
        out = _in_chunks(x_T.shape[0], self.max_batch, lambda lo, hi: self._runner.run(
            x_T[lo:hi], self.plan, seed=seed, noise=None if noise is None else noise[:, lo:hi].contiguous(),
            first_index=first_index + lo))
        return _finite(out, self.backend).clamp_(-1.0, 1.0)  # checked first: clamp would turn inf into +-1

    def invert(self, x0: torch.Tensor, *, eps_at: str = "current") -> torch.Tensor:
        """DDIM encoding of images x0 (B, C, H, W) to latents x_T (not clamped)."""
        x0 = self._check_input(x0, "x0")
        inv = self._inverse_plan(eps_at)
        out = _in_chunks(x0.shape[0], self.max_batch,
                         lambda lo, hi: self._runner.run(x0[lo:hi], inv, seed=0, noise=None, first_index=0))
        return _finite(out, self.backend)

    @property
    def max_batch(self) -> int | None:
        """The largest batch one launch of this backend's kernels takes (None: no limit); larger
        batches are run in near-equal chunks of at most this many samples."""
        return getattr(self._runner, "max_batch", None)

    @property
    def graph_captures(self) -> int:
        """How many CUDA graphs this engine has captured so far (0 for eager backends)."""
        return getattr(self._runner, "captures", 0)

    def __repr__(self) -> str:
        return (f"Engine(backend={self.backend!r}, device={str(self.device)!r}, dtype={DTYPES[self.dtype]}, "
                f"shape={self.shape}, plan={self.plan!r})")

    # -- internals ------------------------------------------------------------------------------
    def _inverse_plan(self, eps_at):
        if eps_at not in self._inverse_plans:  # one object per eps_at: graph and table caches key on it
            self._inverse_plans[eps_at] = self.plan.inverse(eps_at)
        return self._inverse_plans[eps_at]

    def _check_input(self, x, name):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.shape or x.ndim != len(self.shape) + 1 or x.shape[0] < 1:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        x = x.to(self.device, torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} has NaN or inf values; pass a finite tensor")
        return x


# -- backend choice -------------------------------------------------------------------------------
def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def triton_status(device: torch.device) -> str | None:
    """None when the triton backend can run on `device`, else what is missing."""
    if importlib.util.find_spec("triton") is None:  # found, not imported: importing fixes interpreter mode
        return "Triton is not installed: pip install 'ddim-fast[gpu]' (Linux)"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the triton backend needs a CUDA device, or TRITON_INTERPRET=1 set before import to run its "
            f"kernels in the (slow) interpreter on {device.type}")


def onnxruntime_status(device: torch.device) -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed: pip install 'ddim-fast[onnx]' (CPU) or 'ddim-fast[gpu]' (CUDA)"
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("onnxruntime has no CUDAExecutionProvider here: pip install 'ddim-fast[gpu]' "
                "(onnxruntime-gpu) or use device='cpu'")
    return None


def _choose_backend(backend: str, device: torch.device):
    if backend == "auto":
        if device.type == "cuda":
            if triton_status(device) is None:
                return "cuda_graph", "auto: CUDA device -> whole-loop CUDA graph with Triton kernels"
            return "cuda_graph", "auto: CUDA device -> whole-loop CUDA graph (Triton missing: PyTorch ops)"
        if onnxruntime_status(device) is None:
            return "onnxruntime", "auto: CPU with onnxruntime installed -> ONNX Runtime (fastest measured on CPU)"
        return "reference", "auto: CPU without onnxruntime -> eager PyTorch (pip install 'ddim-fast[onnx]' is faster)"
    missing = None
    if backend == "triton":
        missing = triton_status(device)
    elif backend == "cuda_graph":
        if device.type != "cuda":
            missing = f"the cuda_graph backend needs a CUDA device, got {device.type}"
    elif backend == "onnxruntime":
        missing = onnxruntime_status(device)
    if missing:
        raise BackendUnavailable(f"backend {backend!r} cannot run: {missing}")
    return backend, f"requested: {backend}"


def sample_shape(model, shape=None):
    """(C, H, W) of one sample: `shape` checked, or read from model.config (a UNet)."""
    if shape is None:
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "in_channels"):
            raise ValueError("cannot tell the sample shape from this model: pass shape=(C, H, W)")
        shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape}")
    return shape


def _check_first_index(first_index, batch):
    if not is_int(first_index) or not (0 <= first_index and first_index + batch <= 2**31 - 1):
        raise ValueError(f"first_index must be an int with 0 <= first_index + B < 2**31, got {first_index!r}")
    return int(first_index)


def batch_chunks(n: int, limit: int | None) -> list[tuple[int, int]]:
    """[(lo, hi), ...] covering range(n) in the fewest near-equal chunks of at most `limit`
    (equal sizes let a CUDA graph serve every chunk but possibly the last)."""
    if limit is None or n <= limit:
        return [(0, n)]
    count = -(-n // limit)
    size = -(-n // count)
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _in_chunks(n, limit, run):
    """run(lo, hi) over batch_chunks(n, limit), concatenated along the batch."""
    chunks = batch_chunks(n, limit)
    if len(chunks) == 1:
        return run(0, n)
    return torch.cat([run(lo, hi) for lo, hi in chunks])


@contextlib.contextmanager
def cudnn_algorithm_search():
    """cuDNN's algorithm search (cudnn.benchmark) on for the duration, unless the caller asked for
    determinism; every other cuDNN / TF32 setting (enabled, deterministic, allow_tf32) stays the
    caller's. (torch.backends.cudnn.flags() would reset the ones it is not given to its defaults.)"""
    cudnn = torch.backends.cudnn
    before = cudnn.benchmark
    if not (cudnn.deterministic or torch.are_deterministic_algorithms_enabled()):
        cudnn.benchmark = True
    try:
        yield
    finally:
        cudnn.benchmark = before


def _prepare_model(model, device, dtype, channels_last, ops):
    net = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if hasattr(net, "set_ops"):  # other models keep their own ops; the step is still fused
        net.set_ops(ops)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _net_input(x, dtype, channels_last):
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# -- runners ---------------------------------------------------------------------------------------
class _ReferenceRunner:
    """ddim_fast.sampling.sample with the network in `dtype`; the state stays float32."""

    def __init__(self, net, dtype, channels_last):
        self.net, self.dtype, self.channels_last = net, dtype, channels_last

    def _model(self, x, t):
        return self.net(_net_input(x, self.dtype, self.channels_last), t).float()

    @torch.no_grad()
    def run(self, x, plan, *, seed, noise, first_index):
        if plan.direction == "invert":
            from .sampling import invert

            return invert(self._model, x, plan)
        if noise is not None or not plan.needs_noise:
            return reference_sample(self._model, x, plan, noise=noise)
        return reference_sample(self._model, x, plan, seed=seed, first_index=first_index)


class _TritonRunner:
    """Fused ops in the UNet, the fused step kernel (in-kernel noise), eager launches."""

    def __init__(self, net, device, dtype, channels_last, fused=True):
        self.max_batch = None  # the PyTorch step has no grid limit
        if fused:
            from .kernels import attention as _attention
            from .kernels import ddim_step as _step

            ddim_step, initial_noise = _step.ddim_step, _step.initial_noise
            self.max_batch = min(_step.MAX_BATCH, _attention.MAX_BATCH)  # the batch is a grid axis
        else:
            ddim_step, initial_noise = _torch_step, None
        self.ddim_step, self.initial_noise = ddim_step, initial_noise
        self.net, self.device, self.dtype, self.channels_last = net, device, dtype, channels_last
        self._tables = {}

    def tables(self, plan):
        """Device copies of the plan's tables, made once per plan."""
        key = id(plan)
        if key not in self._tables:
            p = plan.to(self.device, torch.float32)
            steps = torch.arange(plan.steps, dtype=torch.int32, device=self.device)  # (S,) step indices
            self._tables[key] = (plan, p.coef, p.timesteps, steps)
        return self._tables[key][1:]

    def loop(self, x, plan, seed_t, first_t, noise, flag):
        """The S steps on the state x (updated in place): the body captured by _GraphRunner."""
        coef, ts, steps = self.tables(plan)
        B = x.shape[0]
        clip = plan.clip_x0
        threshold = (plan.threshold, plan.threshold_max) if plan.threshold is not None else None
        seeded = seed_t if noise is None and plan.needs_noise else None
        for i in range(plan.steps):
            t = ts[i : i + 1].expand(B)  # (B,) a view of device memory: no host work per step
            m = self.net(_net_input(x, self.dtype, self.channels_last), t).contiguous()
            self.ddim_step(x, m, coef, steps[i : i + 1], seed=seeded, first_index=first_t, clip=clip,
                           threshold=threshold, flag=flag)
            if noise is not None and plan.needs_noise:
                x.add_(coef[i, 5] * noise[i])  # explicit z: sigma_i z_i on top of the noise-free step
        return x

    def _keys(self, seed, first_index):
        return (torch.tensor([seed], dtype=torch.int64, device=self.device),
                torch.tensor([first_index], dtype=torch.int64, device=self.device))

    @torch.no_grad()
    def run(self, x, plan, *, seed, noise, first_index):
        """From a given start x (B, C, H, W)."""
        x = x.clone().contiguous()
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.loop(x, plan, *self._keys(seed, first_index), noise, flag)
        _raise_if_flagged(flag, "triton")
        return x

    @torch.no_grad()
    def sample(self, batch, shape, plan, *, seed, first_index):
        """From the seed: x_T drawn in-kernel (the stream of rng.initial_noise)."""
        if self.initial_noise is None:
            x_T = rng.initial_noise(seed, (batch, *shape), first_index=first_index, device=self.device)
            return self.run(x_T, plan, seed=seed, noise=None, first_index=first_index)
        seed_t, first_t = self._keys(seed, first_index)
        x = self.initial_noise(torch.empty(batch, *shape, device=self.device), seed_t, first_t)
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.loop(x, plan, seed_t, first_t, None, flag)
        _raise_if_flagged(flag, "triton")
        return x


class _GraphRunner(_TritonRunner):
    """The triton runner's loop, captured once per (batch, plan, start, noise source) and replayed.

    Two starts: from the seed (`sample`: x_T drawn by a kernel inside the graph) or from a
    given x_T (`run`: copied into a static buffer). The seed and first_index live in (1,) device
    tensors, so new values replay the same graph."""

    def __init__(self, net, device, dtype, channels_last, fused, max_graphs):
        super().__init__(net, device, dtype, channels_last, fused)
        self.max_graphs = max_graphs
        self.graphs = OrderedDict()  # key -> (graph, static buffers)
        self.pool = None
        self.captures = 0

    @torch.no_grad()
    def run(self, x, plan, *, seed, noise, first_index):
        return self._replay(x.shape, plan, x, seed, noise, first_index)

    @torch.no_grad()
    def sample(self, batch, shape, plan, *, seed, first_index):
        if self.initial_noise is None:
            return super().sample(batch, shape, plan, seed=seed, first_index=first_index)
        return self._replay((batch, *shape), plan, None, seed, None, first_index)

    def _replay(self, shape, plan, x_T, seed, noise, first_index):
        key = (tuple(shape), id(plan), x_T is None, noise is not None)
        if key not in self.graphs:
            self._capture(key, shape, plan, x_T, seed, noise, first_index)
        self.graphs.move_to_end(key)
        graph, buf = self.graphs[key]
        buf["seed"].fill_(seed)
        buf["first"].fill_(first_index)
        buf["flag"].zero_()
        if x_T is not None:
            buf["x_T"].copy_(x_T)
        if noise is not None:
            buf["noise"].copy_(noise)
        graph.replay()
        _raise_if_flagged(buf["flag"], "cuda_graph")
        return buf["x"].clone()  # a copy: the next replay overwrites buf["x"]

    def _capture(self, key, shape, plan, x_T, seed, noise, first_index):
        dev = self.device
        buf = {
            "x": torch.empty(shape, device=dev),
            "seed": torch.full((1,), seed, dtype=torch.int64, device=dev),
            "first": torch.full((1,), first_index, dtype=torch.int64, device=dev),
            "flag": torch.zeros(1, dtype=torch.int32, device=dev),
        }
        if x_T is not None:
            buf["x_T"] = x_T.clone()
        if noise is not None:
            buf["noise"] = noise.clone()

        def body():
            if x_T is None:
                self.initial_noise(buf["x"], buf["seed"], buf["first"])
            else:
                buf["x"].copy_(buf["x_T"])
            self.loop(buf["x"], plan, buf["seed"], buf["first"], buf.get("noise"), buf["flag"])

        self._warm_up(body)
        self.graphs[key] = (self._record(body), buf)
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    def _warm_up(self, body):
        """Run once on a side stream: Triton JIT, cuDNN algorithm search, allocator growth."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), cudnn_algorithm_search():
            body()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _record(self, body):
        """Capture body() into a CUDA graph allocated from the pool all graphs share."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            body()
        return graph


def _torch_step(x, m, coef, step, *, seed, first_index, clip, threshold, flag):
    """The reference step in place, for graphs captured without Triton (no seeded noise)."""
    from .sampling import dynamic_threshold

    if seed is not None:
        raise BackendUnavailable("seeded noise inside a CUDA graph needs Triton's in-kernel generator: "
                                 "install triton, or pass noise=, or use an eta=0 plan")
    c = coef.index_select(0, step.long())[0]
    x0 = c[0] * x + c[1] * m.float()
    if threshold is not None:
        x0 = dynamic_threshold(x0, *threshold)
    elif clip is not None:
        x0 = x0.clamp(*clip)
    x.copy_(c[2] * x0 + c[3] * x + c[4] * m.float())
    if flag is not None:
        flag.copy_(torch.maximum(flag, (~torch.isfinite(x)).any().int().view(1)))
    return x


def _raise_if_flagged(flag, backend):
    if int(flag.item()):
        raise NonFiniteError(
            f"the sampler state became NaN or inf ({backend} backend); run backend='reference' "
            "to find the step, and check the model's output and the schedule"
        )


def _finite(out, backend):
    """`out`, or NonFiniteError: every backend's result is checked (ONNX Runtime has no flag), so a
    NaN never leaves the Engine as an image."""
    _raise_if_flagged((~torch.isfinite(out)).any(), backend)
    return out
