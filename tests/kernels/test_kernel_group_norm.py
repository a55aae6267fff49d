"""Fused GroupNorm(+add)(+SiLU) against its plain-PyTorch reference: every way of covering a
group (one tile, a loop, a split over programs), both memory formats, fp32/fp16/bf16.

On a CPU the kernel runs in the Triton interpreter (tests/conftest.py). The interpreter rounds
fp32 -> bf16 by truncation (the GPU rounds to nearest), which the rule's bf16 slack absorbs.
"""

import pytest
import torch

pytest.importorskip("triton")  # an extra (gpu, dev): without it these tests skip

from ddim_fast.kernels.group_norm import group_norm, group_norm_ref
from ddim_fast.models.ops import ReferenceOps
from tests.helpers import assert_close_to_reference, poisoned_like

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# how a group is covered: MODE 0 (one tile), MODE 1 (a loop of 64-element tiles), MODE 2 (split)
COVER = {"tile": {}, "loop": {"tile": 64}, "split": {"tile": 64, "split": 3}}


def _inputs(shape, groups, dtype, channels_last, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    x = (offset + 3 * torch.randn(shape, generator=g) + torch.randn(1, C, 1, 1, generator=g)).to(DEV, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(DEV)
    b = (0.5 * torch.randn(C, generator=g)).to(DEV)
    add = (2 * torch.randn(B, C, generator=g)).to(DEV, dtype)
    return x, w, b, add


def _check(shape, groups, dtype, channels_last, cover, add, silu, seed=0, offset=0.0):
    x, w, b, a = _inputs(shape, groups, dtype, channels_last, seed, offset)
    a = a if add else None
    out = poisoned_like(x)
    got = group_norm(x, w, b, groups, 1e-6, add=a, silu=silu, out=out, **COVER[cover])
    assert got is out and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref = group_norm_ref(x, w, b, groups, 1e-6, add=a, silu=silu)
    truth = group_norm_ref(x.double(), w.double(), b.double(), groups, 1e-6,
                           add=None if a is None else a.double(), silu=silu)
    assert_close_to_reference(got, ref, truth, dtype, f"{shape}/{groups} {dtype} cl={channels_last} {cover}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cover", list(COVER))
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_add_silu(dtype, cover, channels_last):
    """C = 6 in 2 groups (3 channels: not a power of two), 5x7 pixels, batch 3, add and SiLU."""
    _check((3, 6, 5, 7), 2, dtype, channels_last, cover, add=True, silu=True)


@pytest.mark.parametrize(
    "shape,groups,cover",
    [((1, 4, 17, 19), 1, "loop"), ((1, 8, 17, 19), 2, "split"), ((1, 32, 3, 5), 16, "tile"),
     ((3, 6, 1, 1), 3, "tile"), ((1, 5, 3, 3), 1, "split")],
)
@pytest.mark.parametrize("add,silu", [(False, False), (True, False), (False, True)])
def test_group_norm_shapes_and_flags(shape, groups, cover, add, silu):
    _check(shape, groups, torch.float16, False, cover, add, silu, seed=shape[1])


@pytest.mark.parametrize("cover", ["tile", "split"])
def test_statistics_do_not_cancel(cover):
    """Data far from zero (mean 3000, std ~3): E[x^2] - E[x]^2 in fp32 would lose most digits;
    the two-pass tile sums merged with Chan's formula keep the fp32 rule's 1e-5."""
    _check((2, 8, 9, 13), 2, torch.float32, False, cover, add=True, silu=False, offset=3000.0)


def test_reference_matches_the_unet_reference_ops():
    """group_norm_ref is ReferenceOps.group_norm (which the UNet's reference path uses) in fp32."""
    x, w, b, a = _inputs((2, 16, 5, 6), 4, torch.float32, False, seed=1)
    for add, silu in [(None, False), (a, True)]:
        want = ReferenceOps.group_norm(x, w, b, 4, 1e-6, add=add, silu=silu)
        torch.testing.assert_close(group_norm_ref(x, w, b, 4, 1e-6, add=add, silu=silu), want,
                                   rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_fix():
    x = torch.zeros(2, 8, 3, 3, device=DEV)
    w, b = torch.ones(8, device=DEV), torch.zeros(8, device=DEV)
    cases = [
        (lambda: group_norm(x.double(), w, b, 2), "float32/float16/bfloat16"),
        (lambda: group_norm(x[:, :, :, :2], w, b, 2), "contiguous"),
        (lambda: group_norm(x, w, b, 3), "dividing C"),
        (lambda: group_norm(x, w[:4], b, 2), "weight"),
        (lambda: group_norm(x, w, b, 2, add=torch.zeros(2, 4, device=DEV)), r"\(B, C\)"),
        (lambda: group_norm(x, w, b, 2, out=torch.empty(2, 8, 3, 3, device=DEV).half()), "out"),
        (lambda: group_norm(x, w, b, 2, split=0), "split"),
        (lambda: group_norm(x, w, b, 2, tile=24), "power of two"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError, match=words):
            call()


def test_launches_above_the_element_limit_are_refused_before_launch():
    """LSUN-256's largest GroupNorm input at batch 256 (2**32 elements): a meta tensor, nothing
    allocated; one sample fewer than the limit's batch still passes the check."""
    from ddim_fast.kernels import group_norm as gn

    def meta(*shape):
        return torch.empty(shape, device="meta", dtype=torch.float16)

    w = torch.empty(256, device="meta")
    with pytest.raises(ValueError, match=r"more than one launch takes \(2147483647\); run the batch in chunks"):
        group_norm(meta(256, 256, 256, 256), w, w, 32)
    assert gn.MAX_NUMEL // (256 * 256 * 256) == 127  # what the triton ops' batch chunks hold


@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_ops_split_the_batch_above_the_element_limit(monkeypatch, channels_last):
    """With the limit lowered to 2.5 samples the ops run 5 samples as 2 + 2 + 1, each launch within the
    limit (the kernel itself refuses more), and give the unsplit result."""
    from ddim_fast.kernels import group_norm as gn
    from ddim_fast.models.ops.triton import TritonOps

    x, w, b, add = _inputs((5, 6, 3, 3), 2, torch.float32, channels_last, seed=7)
    monkeypatch.setattr(gn, "MAX_NUMEL", 135)  # 54 elements per sample
    launched = []
    real = gn.group_norm
    monkeypatch.setattr(gn, "group_norm", lambda x, *a, **k: launched.append(x.shape[0]) or real(x, *a, **k))
    with pytest.raises(ValueError, match="more than one launch takes"):
        real(x, w, b, 2, 1e-6, add=add, silu=True)
    got = TritonOps.group_norm(x, w, b, 2, 1e-6, add=add, silu=True)
    assert launched == [2, 2, 1]
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref = group_norm_ref(x, w, b, 2, 1e-6, add=add, silu=True)
    truth = group_norm_ref(x.double(), w.double(), b.double(), 2, 1e-6, add=add.double(), silu=True)
    assert_close_to_reference(got, ref, truth, torch.float32, "split batch")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 128, 256, 256), (64, 256, 32, 32), (4, 512, 16, 16)])
def test_group_norm_on_gpu_at_model_sizes(shape, dtype):
    """LSUN's largest groups at batch 1 (split over programs), CIFAR at batch 64 (one tile per
    group), channels_last, with the launcher's own choices."""
    for channels_last in (False, True):
        _check(shape, 32, dtype, channels_last, "tile", add=True, silu=True)
