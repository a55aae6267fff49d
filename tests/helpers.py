"""What test modules share: docs/DESIGN.md's tolerance rule as an assertion, the probe for a broken
Triton interpreter, small models and payloads, and the repository root. Imported as
`from tests.helpers import ...`; a test module never imports another test module or conftest.py
(tests/test_imports.py checks it). Fixtures live in tests/conftest.py, and so does the environment
(threads, the ONNX cache, TRITON_INTERPRET), which is set before any module here is imported."""

import os
from pathlib import Path

import torch

# docs/DESIGN.md: a fast path's error against a float64 reference may be at most twice the error of
# the reference run in the same low precision, plus an absolute slack: one definition, the library's.
from ddim_fast.precision import NAMES, atol

ROOT = Path(__file__).resolve().parents[1]  # the repository root


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


# Triton 3.6's interpreter with numpy >= 2.4 cannot run range() with a runtime bound (triton issue
# #9171, fixed upstream by PR #9172): every such loop raises "only 0-dimensional arrays can be
# converted to Python scalars". Compiled kernels are unaffected. On such a machine a test that hits
# it is skipped with this reason (after a probe confirms the bug), never failed by accident: the
# hook in conftest.py does that, and the GPU suite's dry-run test excuses the rows it fails.
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


def poisoned_like(t, **kw):
    """An output buffer full of NaN, so a kernel that skips an element is caught."""
    return torch.full_like(t, float("nan"), **kw)


def truth_and_low(model, plan, x_T, seed, dtype):
    """(the float64 truth, the reference Engine in `dtype`) of sampling x_T with `plan`, both on x_T's
    device (the model may be on the CPU): the two sides of a fast path's tolerance check."""
    import copy

    import ddim_fast as dd

    truth = dd.sample(copy.deepcopy(model).double().to(x_T.device), x_T.double(), plan, seed=seed).clamp(-1, 1)
    low = dd.Engine(model, plan, backend="reference", dtype=dtype, device=x_T.device)(x_T, seed=seed)
    return truth, low


def train_config(out, **kw):
    """A TrainConfig of the tiny UNet on synthetic data, 4 steps, that a test changes by keyword."""
    from ddim_fast import train

    base = dict(out=str(out), dataset="synthetic:32", config="tiny", steps=4, batch_size=8, lr=1e-3, warmup=2,
                save_every=2, log_every=1, grid_size=0, progress=False, ema_decay=0.99)
    return train.TrainConfig(**{**base, **kw})


def quiet(*a, **k):
    """A log function that says nothing."""


def class_unet(num_classes: int, seed: int):
    """The tiny UNet with `num_classes` labels (seeded weights, labels scaled up so that they matter at this
    size) and the linear schedule: the class-conditional model of the conditioning and ONNX tests."""
    import ddim_fast as dd

    torch.manual_seed(seed)
    m = dd.UNet(dd.UNetConfig(**{**dd.UNetConfig.tiny().to_dict(), "num_classes": num_classes})).eval()
    with torch.no_grad():
        m.label_emb.weight.mul_(3.0)
    m.schedule = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
    return m


def text_unet():
    """A small diffusers UNet2DConditionModel (cross-attention on a 32-wide text embedding), seeded."""
    import pytest

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()


class MarkerPayload:
    """Unpickling this creates the file `marker`: a harmless stand-in for arbitrary code, so a
    test can prove that a loader never executed a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- the multistep samplers' model (plan/test_samplers.py, plan/test_samplers_authors.py) -----------------------
class ToyNet(torch.nn.Module):
    """A small non-linear model(x, t) that mixes channels: every history coefficient shows in its output."""

    def __init__(self, C=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # a buffer, not a parameter: the reference sampler runs a model in its parameters' dtype, and this one
        # must follow the state's (float64 in the exactness checks)
        self.register_buffer("w", torch.randn(C, C, generator=g) * 0.5)

    def forward(self, x, t):
        tt = (t.to(x.dtype) / 1000).view(-1, *([1] * (x.ndim - 1)))
        mixed = torch.einsum("ij,bj...->bi...", self.w.to(x.dtype), x)
        return torch.tanh(mixed * (1 + tt)) * 0.8 + 0.2 * x * tt


def toy_x(B=2, shape=(3, 4, 4), seed=1, dtype=torch.float64):
    """A seeded standard normal state of B samples for ToyNet (float64 by default)."""
    return torch.randn(B, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
