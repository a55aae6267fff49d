"""Single-head spatial self-attention of the DDPM UNet in one flash-style kernel.

What is fused and why. The UNet's AttnBlock computes, per image, softmax(q^T k / sqrt(C)) v over
the N = H*W pixels with head_dim C (up to 512 at LSUN-256's 16x16 level). Eager PyTorch writes
the (N, N) score matrix, reads it back for the softmax, writes the probabilities and reads them
again for the second matmul. Here scores live only in registers: each program owns BLOCK_M
queries, streams the keys and values in blocks of BLOCK_N with the online softmax (running max
and sum, rescaling the accumulator), and writes its output once.

head_dim up to 512 without spilling: q.k is reduced over the head dim in chunks of BLOCK_D
(q and k chunks re-read from L1/L2 rather than held), and a program produces BLOCK_DO output
channels only, so the accumulator is (BLOCK_M, BLOCK_DO). With C > BLOCK_DO the grid has
C / BLOCK_DO programs per query block, each recomputing the (cheap, N = 256) scores: 4x the q.k
work at C = 512, in exchange for 4x less accumulator state.

Inputs (B, C, N) with any strides (1x1-convolution outputs, NCHW or channels_last, views of a
fused qkv projection); fp32, fp16 or bf16. Accumulation is fp32; the probabilities are cast to
the input dtype for the second matmul (as every flash kernel does); fp32 inputs use exact fp32
dots (no TF32) so the fp32 path meets the fp32 tolerance.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .checks import batch_fits, check, float_tensor, runnable

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
MAX_BATCH = 65535  # the batch is grid axis 2, whose size CUDA caps at 2**16 - 1


# -- reference -----------------------------------------------------------------------------------
def attention_ref(q, k, v):
    """Plain PyTorch: out[b, :, i] = sum_j softmax_j(q[b, :, i] . k[b, :, j] / sqrt(C)) v[b, :, j].

    q, k, v (B, C, N); computes in fp32 (float64 for float64 input); returns q's dtype.
    """
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = q.shape[1]
    w = torch.bmm(q.transpose(1, 2).to(work), k.to(work)) / math.sqrt(C)  # (B, N, N): [query, key]
    w = torch.softmax(w, dim=2)
    return torch.bmm(v.to(work), w.transpose(1, 2)).to(q.dtype)  # (B, C, N)


# -- kernel --------------------------------------------------------------------------------------
@triton.jit
def _attention_kernel(
    Q, K, V, O,  # pointers
    C, N, qk_scale,  # sizes; qk_scale = log2(e) / sqrt(C)
    stride_qb, stride_qc, stride_qn, stride_kb, stride_kc, stride_kn,  # strides
    stride_vb, stride_vc, stride_vn, stride_ob, stride_oc, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # meta
    BLOCK_DO: tl.constexpr, ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)  # block of queries
    pid_o = tl.program_id(1)  # block of output channels
    b = tl.program_id(2).to(tl.int64)
    Q += b * stride_qb
    K += b * stride_kb
    V += b * stride_vb
    O += b * stride_ob
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query tokens
    offs_o = pid_o * BLOCK_DO + tl.arange(0, BLOCK_DO)  # (BLOCK_DO,) output channels
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) head-dim chunk
    m_mask = offs_m < N

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running softmax denominator
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    if ONE_CHUNK:  # the whole head dim fits one chunk: load q once
        q = tl.load(Q + offs_d[None, :] * stride_qc + offs_m[:, None] * stride_qn,
                    mask=m_mask[:, None] & (offs_d[None, :] < C), other=0.0)  # (BLOCK_M, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key tokens
        n_mask = offs_n < N
        # 1. scores s = q^T k over the head dim, in chunks
        if ONE_CHUNK:
            k = tl.load(K + offs_d[:, None] * stride_kc + offs_n[None, :] * stride_kn,
                        mask=(offs_d[:, None] < C) & n_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, k, input_precision=PRECISION)
        else:
            s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, C, BLOCK_D):
                d = d0 + offs_d
                qc = tl.load(Q + d[None, :] * stride_qc + offs_m[:, None] * stride_qn,
                             mask=m_mask[:, None] & (d[None, :] < C), other=0.0)  # (BLOCK_M, BLOCK_D)
                kc = tl.load(K + d[:, None] * stride_kc + offs_n[None, :] * stride_kn,
                             mask=(d[:, None] < C) & n_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
                if UPCAST:
                    qc = qc.to(tl.float32)
                    kc = kc.to(tl.float32)
                s = tl.dot(qc, kc, s, input_precision=PRECISION)
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # padded keys get no weight
        # 2. online softmax: rescale what was accumulated to the new running max
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # 3. acc += p v^T for this program's output channels
        v = tl.load(V + offs_o[None, :] * stride_vc + offs_n[:, None] * stride_vn,
                    mask=n_mask[:, None] & (offs_o[None, :] < C), other=0.0)  # (BLOCK_N, BLOCK_DO)
        p = p.to(V.dtype.element_ty)  # probabilities in the input dtype for the tensor cores
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + offs_o[None, :] * stride_oc + offs_m[:, None] * stride_on, out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & (offs_o[None, :] < C))


# -- launcher ------------------------------------------------------------------------------------
def attention(q, k, v, *, out=None):
    """softmax(q^T k / sqrt(C)) v for q, k, v (B, C, N) of one dtype (any strides); returns (B, C, N).

    out: None (a new contiguous tensor) or a (B, C, N) tensor of q's dtype to write into.
    """
    B, C, N = _check(q, k, v, out)
    if out is None:
        out = torch.empty((B, C, N), dtype=q.dtype, device=q.device)
    interpreted = not isinstance(_attention_kernel, triton.runtime.JITFunction)
    cfg = config(C, q.dtype, upcast=interpreted and q.dtype == torch.bfloat16)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(C, cfg["BLOCK_DO"]), B)
    _attention_kernel[grid](
        q, k, v, out, C, N, LOG2E / math.sqrt(C),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        **cfg,
    )
    return out


def config(C, dtype, upcast=False):
    """Tile sizes and launch options for head_dim C and the input dtype.

    NOTE: picked by registers and spills in the ahead-of-time compile (kernels/aot.py, sm_80 and
    sm_90: no spills, at most about 160 registers per thread for fp16 at C = 512), not yet timed
    on a GPU. fp32 inputs use exact fp32 dots (FMA, not tensor cores), which need smaller tiles.
    upcast: feed the dots fp32 copies of the (exactly representable) inputs. Only for the Triton
    3.9 interpreter, whose tl.dot multiplies bf16 bit patterns as integers.
    """
    d = max(16, triton.next_power_of_2(C))
    exact = dtype == torch.float32 or upcast
    if exact:
        block_m, block_n, block_d, block_do, warps = 32, 32, min(d, 32), min(d, 64), 8
    else:
        block_m, block_n, block_d, block_do, warps = 64, 64, min(d, 64), min(d, 128), 4 if d <= 64 else 8
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DO=block_do,
        ONE_CHUNK=d <= block_d,
        PRECISION="ieee" if exact else "tf32",  # fp16/bf16 dots ignore it
        UPCAST=upcast,
        num_warps=warps,
        num_stages=2,
    )


def _check(q, k, v, out):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(float_tensor(t, DTYPES, ndim=3), f"{name} must be a (B, C, N) float32/float16/bfloat16 tensor, got "
              f"{getattr(t, 'shape', type(t))} {getattr(t, 'dtype', '')}")
    check(q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype, f"q, k, v must share shape and dtype, "
          f"got {tuple(q.shape)} {q.dtype}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    check(q.device == k.device == v.device, f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    runnable(q, _attention_kernel, "attention", "or use the reference ops", tensors="CUDA tensors")
    B, C, N = q.shape
    check(B >= 1 and C >= 1 and N >= 1, f"q must have B, C, N >= 1, got {tuple(q.shape)}")
    check(C <= 512, f"head_dim C={C} is above the supported 512; use the reference ops")
    batch_fits(B, MAX_BATCH)
    check(out is None or (out.shape == q.shape and out.dtype == q.dtype and out.device == q.device),
          "out must be a (B, C, N) tensor of q's dtype on q's device")
    return B, C, N
