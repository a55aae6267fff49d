"""Flash-style attention against its plain-PyTorch reference (odd token counts and head dims up to
512, strided inputs, fp32/fp16/bf16), and the tiny UNet with the triton ops against the
reference ops.

On a CPU the kernels run in the Triton interpreter (tests/conftest.py). There, bf16 dots run on
fp32 copies of the bf16 inputs (the Triton 3.9 interpreter multiplies bf16 bit patterns as
integers); the GPU path feeds the tensor cores bf16 and is checked by the gpu tests.
"""

import pytest
import torch

pytest.importorskip("triton")  # an extra (gpu, dev): without it these tests skip

from ddim_fast.kernels.attention import attention, attention_ref
from ddim_fast.models.ops import ReferenceOps
from tests.helpers import assert_close_to_reference, poisoned_like

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(B, C, N, dtype, layout, seed, scale=1.0):
    """q, k, v (B, C, N) in one of the layouts a 1x1 convolution produces."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":  # separate NCHW convs
        q, k, v = (torch.randn(B, C, N, generator=g) for _ in range(3))
    elif layout == "fused":  # one qkv conv, then chunk: views with a 3C-channel batch stride
        q, k, v = torch.randn(B, 3 * C, N, generator=g).chunk(3, dim=1)
    else:  # channels_last convs: the channel stride is 1
        q, k, v = (torch.randn(B, N, C, generator=g).transpose(1, 2) for _ in range(3))
    q = q * scale
    return tuple(t.to(DEV, dtype) if t.dtype != dtype or t.device.type != DEV else t for t in (q, k, v))


def _check(B, C, N, dtype, layout, seed=0, scale=1.0):
    q, k, v = _qkv(B, C, N, dtype, layout, seed, scale)
    out = poisoned_like(q, memory_format=torch.contiguous_format)
    got = attention(q, k, v, out=out)
    assert got is out and got.shape == (B, C, N)
    ref = attention_ref(q, k, v)
    truth = attention_ref(q.double(), k.double(), v.double())
    assert_close_to_reference(got, ref, truth, dtype, f"B={B} C={C} N={N} {dtype} {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,C,N,layout",
    [(3, 20, 35, "contiguous"),  # head dim and tokens not multiples of the blocks, batch 3
     (1, 64, 100, "fused"),  # one head-dim chunk, a partial last key block
     (2, 200, 17, "channels_last"),  # several q.k chunks, two output-channel blocks
     (1, 512, 9, "fused")],  # LSUN's head dim: 8 q.k chunks, 4 output blocks
)
def test_attention_matches_reference(B, C, N, layout, dtype):
    _check(B, C, N, dtype, layout, seed=C)


def test_online_softmax_is_stable_for_large_logits():
    """Logits of several hundred (scaled q): the running max keeps exp2 finite."""
    _check(2, 32, 70, torch.float32, "contiguous", seed=5, scale=40.0)


def test_reference_matches_the_unet_reference_ops():
    q, k, v = _qkv(2, 24, 30, torch.float32, "fused", seed=1)
    torch.testing.assert_close(attention_ref(q, k, v), ReferenceOps.attention(q, k, v), rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_fix():
    q = torch.zeros(2, 8, 10, device=DEV)
    cases = [
        (lambda: attention(q.double(), q.double(), q.double()), "float32/float16/bfloat16"),
        (lambda: attention(q, q[:, :, :9], q), "share shape"),
        (lambda: attention(q, q.half(), q), "share shape and dtype"),
        (lambda: attention(q[:, :, :0], q[:, :, :0], q[:, :, :0]), ">= 1"),
        (lambda: attention(*(torch.zeros(1, 520, 4, device=DEV),) * 3), "512"),
        (lambda: attention(q, q, q, out=q.half()), "out"),
        (lambda: attention(*(torch.zeros(65536, 1, 1, device=DEV),) * 3), "at most 65535 programs"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError, match=words):
            call()


# -- the UNet with the triton ops ----------------------------------------------------------------
def _tiny_unet(seed=0):
    from ddim_fast.models.unet import UNet, UNetConfig

    model = UNet(UNetConfig.tiny()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every parameter off its init (GroupNorm 1/0 would hide bugs)
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_unet_triton_ops_equal_reference_ops(dtype):
    """UNetConfig.tiny() forward (8 groups of 4+ channels, attention at 8x8 and in the middle),
    set_ops("triton") against set_ops("reference") under the tolerance rule."""
    model = _tiny_unet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 16, 16, generator=g).to(DEV)  # batch 1: the interpreter is slow
    t = torch.tensor([999 if dtype == torch.float32 else 17], device=DEV)
    with torch.no_grad():
        truth = model.double().set_ops("reference")(x.double(), t)
        model = model.to(dtype)
        ref = model.set_ops("reference")(x.to(dtype), t)
        got = model.set_ops("triton")(x.to(dtype), t)
    assert got.dtype == dtype
    assert_close_to_reference(got, ref, truth, dtype, f"tiny UNet {dtype}")


def test_triton_ops_refuse_cpu_without_the_interpreter(tmp_path):
    """In a process without TRITON_INTERPRET, a CPU tensor gets an error that names the fix."""
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from ddim_fast.models.ops import get_ops\n"
        "ops = get_ops('triton')\n"
        "x = torch.zeros(1, 8, 2, 2)\n"
        "try:\n"
        "    ops.group_norm(x, torch.ones(8), torch.zeros(8), 2, 1e-6)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "needs CUDA or TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [256, 512])
def test_attention_on_gpu_at_model_sizes(C, dtype):
    """CIFAR/CelebA (C = 256) and LSUN (C = 512) at 16x16 tokens, batch 8, every layout."""
    for layout in ("contiguous", "fused", "channels_last"):
        _check(8, C, 256, dtype, layout, seed=C)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tiny_unet_on_gpu(dtype, exact_cuda):
    """The CPU test on the device, bf16 included; fp32 convolutions in fp32 (TF32 off)."""
    test_tiny_unet_triton_ops_equal_reference_ops(dtype)
