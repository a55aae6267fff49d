"""Shared test setup: the Triton interpreter on CPU, the gpu marker, docs/DESIGN.md's tolerance rule."""

import atexit
import os
import shutil
import tempfile

# One intra-op thread per process unless the caller says otherwise: the suite's tensors are
# small, the 2-core CI machine also runs subprocesses (torchrun, the interpreter), and two
# OpenMP threads per process on a busy 2-core machine made small ops 10-30x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Exports made by tests go to a throw-away cache, not the user's ~/.cache/ddim-fast.
if "DDIM_FAST_CACHE" not in os.environ:
    os.environ["DDIM_FAST_CACHE"] = tempfile.mkdtemp(prefix="ddim-fast-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DDIM_FAST_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Triton kernels run on a CPU only in the interpreter, chosen when they are defined: set it
# before any test module imports ddim_fast.kernels. With a GPU the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Triton 3.6's interpreter with numpy >= 2.4 cannot run range() with a runtime bound (triton issue
# #9171, fixed upstream by PR #9172): every such loop raises "only 0-dimensional arrays can be
# converted to Python scalars". Compiled kernels are unaffected. On such a machine a test that hits
# it is skipped with this reason (after a probe confirms the bug), never failed by accident.
INTERPRETER_RANGE_BUG = "only 0-dimensional arrays can be converted to Python scalars"
_probe = {}


def interpreter_range_bug() -> str | None:
    """Why this Triton interpreter cannot run our kernels' loops (the skip reason), or None."""
    if "reason" not in _probe:
        _probe["reason"] = None
        if os.environ.get("TRITON_INTERPRET") == "1":
            try:
                import numpy
                import triton
                import triton.language as tl

                @triton.jit
                def _range_probe(OUT, n):
                    acc = 0
                    for i in range(0, n):
                        acc += i
                    tl.store(OUT, acc)

                out = torch.zeros(1, dtype=torch.int32)
                _range_probe[(1,)](out, 3)
            except Exception as e:  # the probe fails only in the known way on a broken interpreter
                if INTERPRETER_RANGE_BUG in repr(e):
                    _probe["reason"] = (
                        f"triton {triton.__version__}'s interpreter with numpy {numpy.__version__} cannot run "
                        "range() with a runtime bound (triton issue #9171, fixed by triton PR #9172); "
                        "compiled kernels are unaffected: use another triton or numpy < 2.4 for this tier")
    return _probe["reason"]


@pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: any pytest / pluggy the GPU machine may have
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (call.when == "call" and report.failed and call.excinfo is not None
            and INTERPRETER_RANGE_BUG in repr(call.excinfo.value) and interpreter_range_bug()):
        report.outcome = "skipped"
        report.longrepr = (item.location[0], (item.location[1] or 0) + 1, f"Skipped: {interpreter_range_bug()}")


# docs/DESIGN.md: a fast path's error against a float64 reference may be at most twice the error of
# the reference run in the same low precision, plus an absolute slack: one definition, the library's.
from ddim_fast.precision import NAMES, atol  # noqa: E402


def assert_close_to_reference(fast, reference, truth, dtype, what=""):
    """The tolerance rule for every fast path (max-abs errors over the whole tensor):

        max|fast - truth| <= 2 * max|reference - truth| + ATOL[dtype] (ddim_fast.precision)

    fast:      the fast path's output;  reference: the reference path run in the same (low)
    precision;  truth: the reference path in float64;  dtype: the precision of the run (the
    network's dtype, e.g. fp16 even when the output is fp32). NaN or inf anywhere fails.
    """
    if dtype not in NAMES:
        raise ValueError(f"no tolerance for {dtype}; the rule covers {list(NAMES)}")
    assert fast.shape == truth.shape == reference.shape, (fast.shape, reference.shape, truth.shape)
    truth = truth.double()
    assert torch.isfinite(fast).all(), f"{what}: the fast path produced NaN/inf"
    assert torch.isfinite(truth).all() and torch.isfinite(reference).all(), f"{what}: non-finite reference"
    err = (fast.double() - truth).abs().max().item()
    ref_err = (reference.double() - truth).abs().max().item()
    bound = 2 * ref_err + atol(dtype)
    assert err <= bound, f"{what}: error {err:.3g} > 2 x reference error {ref_err:.3g} + atol {atol(dtype):g}"


class MarkerPayload:
    """Unpickling this creates the file `marker`: a harmless stand-in for arbitrary code, so a
    test can prove that a loader never executed a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def exact_cuda():
    """For GPU tests that hold an fp32 path to the fp32 rule or compare two runs of one network:
    no TF32 (cuDNN and cuBLAS: TF32 is not fp32) and cuDNN in deterministic mode, so every run
    picks the same algorithms (the Engine then skips its algorithm search too). Restored after."""
    b = torch.backends
    saved = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark)
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False
    b.cudnn.deterministic, b.cudnn.benchmark = True, False
    try:
        yield
    finally:
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic, b.cudnn.benchmark = saved


def poisoned_like(t, **kw):
    """An output buffer full of NaN, so a kernel that skips an element is caught."""
    return torch.full_like(t, float("nan"), **kw)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (tier 5)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def shared_tiny_unet(tmp_path_factory):
    """A seeded tiny UNet checkpoint (schedule: linear, T=100) and an ONNX cache shared by the whole
    session, so the ~15 s ONNX export of this model happens once rather than once per module."""
    base = tmp_path_factory.getbasetemp()
    ck = base / "shared-tiny-unet"
    if not ck.exists():
        from ddim_fast.checkpoint import save_model
        from ddim_fast.models.unet import UNet, UNetConfig
        from ddim_fast.schedule import NoiseSchedule

        torch.manual_seed(0)
        m = UNet(UNetConfig.tiny())
        m.schedule = NoiseSchedule.linear(100, 1e-3, 0.05)
        save_model(ck, m)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDIM_FAST_CACHE", str(base / "shared-onnx-cache"))
        yield ck


# -- the Engine and backend tests' models (test_engine.py, test_backend_triton.py, test_backend_cuda_graph.py) --
@pytest.fixture(scope="module")
def analytic():
    """GaussianEps over the linear T=1000 schedule: an exact, size-agnostic eps model."""
    from ddim_fast.models.analytic import GaussianEps
    from ddim_fast.schedule import NoiseSchedule

    return GaussianEps(NoiseSchedule.linear(1000, 1e-4, 0.02))


@pytest.fixture(scope="module")
def tiny():
    """A seeded tiny UNet (UNetConfig.tiny()) with the linear T=1000 schedule."""
    import ddim_fast as dd

    torch.manual_seed(0)
    m = dd.UNet(dd.UNetConfig.tiny())
    m.schedule = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
    return m


# -- the ONNX tests' shared model and cache (test_onnx_*.py, test_backend_onnxruntime.py) ---------------------
@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """One ddim-fast cache folder for every ONNX test module: the tiny UNet's torch export (the slow
    part) happens once; each module points DDIM_FAST_CACHE here (see their `cache` fixtures)."""
    return tmp_path_factory.mktemp("ddim-fast-cache")


@pytest.fixture(scope="module")
def onnx_cache_env(onnx_cache):
    """DDIM_FAST_CACHE pointed at the shared onnx_cache for one module, with no cache size limit from the
    environment (a module opts in: pytestmark = pytest.mark.usefixtures("onnx_cache_env")). Yields the
    folder the graphs are written to."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDIM_FAST_CACHE", str(onnx_cache))
        mp.delenv("DDIM_FAST_CACHE_MAX_MB", raising=False)
        yield onnx_cache / "onnx"


@pytest.fixture(scope="session")
def onnx_tiny():
    """The ONNX tests' tiny UNet: seeded, norms and biases away from their init (every parameter
    matters), the linear schedule."""
    import ddim_fast as dd

    torch.manual_seed(0)
    m = dd.UNet(dd.UNetConfig.tiny()).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    m.schedule = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
    return m


@pytest.fixture(scope="session")
def onnx_tiny_eps(onnx_tiny, onnx_cache, tmp_path_factory):
    """The eps-model export of onnx_tiny (its network lands in onnx_cache for the later exports)."""
    import ddim_fast as dd

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDIM_FAST_CACHE", str(onnx_cache))
        return dd.export_onnx(onnx_tiny, tmp_path_factory.mktemp("eps") / "tiny.onnx")
