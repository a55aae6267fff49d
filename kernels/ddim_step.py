"""The fused DDIM step: one pass over the state for every sampler variant.

What is fused and why. Every sampler of the project reduces one step to (ddim_fast/plan.py)

    x' = d0 * clip(cx * x + ce * m) + dx * x + de * m + sigma * z                  (*)

In eager PyTorch that is about ten elementwise kernels (each reading and writing the whole
state) plus a separate noise draw. Here it is one kernel: read x and the model output m, write
x' (in place) and optionally the x0 estimate; z is drawn in registers with Triton's Philox
(`tl.randn`), keyed per sample exactly as ddim_fast/rng.py so it is the reference's noise.

Multistep plans (plms, dpmpp_*, unipc) add history terms, (**) of plan.py,

    x' = (*) + h1 * H1 + h2 * H2 + h3 * H3,   then (push = 1) H3 <- H2, H2 <- H1, H1 <- pu * x0 + pv * x + pw * m

with the H in one preallocated (K, B, ...) float32 buffer (K = plan.history, a constexpr): the kernel
reads x, m and the K history values of each element once, writes x' and the shifted history in
the same pass (each element's old values are in registers before any is overwritten).

Everything that changes from step to step lives in device memory: the coefficient table
(S, 6), or (S, 13) for a multistep plan, and the step index (an int32 device tensor), so a CUDA graph can replay the
same launch for every step after the caller increments the index on the device.

Clipping of the x0 estimate (a constexpr mode, so the plain path pays nothing):
  0: none;  1: fixed range (lo, hi);
  2: dynamic thresholding (Imagen): per sample s = quantile(|x0|, p) clamped to [1, s_max], then
     x0 = clamp(x0, -s, s) / s. The quantile needs the whole sample before any element can be
     written, so the launcher computes s first, with no host sync and nothing that cannot be
     captured in a CUDA graph: x0 is formed in fp32 by torch, the two order statistics that
     torch.quantile interpolates between are found by `_abs_order_stats_kernel` (below), and
     the interpolation is torch.lerp, exactly as torch.quantile does it (linear, rank in fp32).
     (torch.topk / torch.sort run CUB segmented sorts, which are not known to be capture-safe.)

Order statistics without sorting. Non-negative float32 values order like their int32 bit
patterns. So the k-th smallest |a| of a sample is the largest 31-bit pattern v with
#{u < v} <= k (u the patterns): found bit by bit from the top, one counting pass over the sample
per bit (31 passes, one program per sample; a sample of the shipped models is 12-768 KB and is
re-read from L1/L2), plus one pass for #{u <= v}, the next larger value and NaNs. The result
is exact, ties included, and needs no scratch memory.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .checks import batch_fits, check, device_scalar, float_tensor, is_int, runnable

# The coefficient table's columns: offsets into a row, in the order of ddim_fast/plan.py's ALL_COLUMNS.
# A kernel file imports nothing from ddim_fast (DESIGN.md), so tests/test_plan.py checks each
# COL_<NAME> against plan.py's ALL_COLUMNS.index(name). constexpr: the only globals a Triton kernel may read.
COL_CX, COL_CE, COL_D0, COL_DX, COL_DE, COL_SIGMA = map(tl.constexpr, range(6))  # plan.py COEF_COLUMNS
COL_H1, COL_H2, COL_H3, COL_PU, COL_PV, COL_PW, COL_PUSH = map(tl.constexpr, range(6, 13))  # HISTORY_COLUMNS
NUM_COEF = COL_SIGMA.value + 1  # a plain plan's row: (*)
NUM_COEF_HIST = COL_PUSH.value + 1  # a multistep plan's row: (**)
MAX_HISTORY = 3
PURPOSE_STEP = 1  # the counter word that separates per-step noise from x_T (ddim_fast/rng.py)
CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD = 0, 1, 2
BLOCK = 1024  # elements per program; NOTE: not yet tuned on a GPU (memory-bound)
NUM_WARPS = 8  # 4 elements per thread: fp16 and fp32 loads then share one layout (no smem shuffle, see aot.py)
M_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BATCH = 65535  # the batch is grid axis 1, whose size CUDA caps at 2**16 - 1 (the Engine splits larger ones)
SELECT_BLOCK = 4096  # order statistics: a row up to this size stays in registers (CIFAR-10: 3072)
# NOTE: 16 values per thread at 8 warps; not yet timed on a GPU (see aot.py for registers)


# -- reference -----------------------------------------------------------------------------------
def ddim_step_ref(x, m, coef, step, *, z=None, clip=None, threshold=None, hist=None, guidance=None):
    """Plain PyTorch (*) for one step; returns (x', x0). Not in place (but `hist` is).

    x (B, ...) float; m like x (any float dtype, used in x's dtype); coef (S, 6) or (S, 13); step an int;
    z like x or None; clip (lo, hi) or None; threshold (p, s_max) or None; hist None or (K, B, ...)
    like x: the history (**), shifted in place when the row pushes; guidance None or a float w, m then
    the doubled batch [uncond; cond] combined as m_u + w (m_c - m_u).
    """
    row = coef[int(step)].to(x.dtype)
    cx, ce, d0, dx, de, sigma = (row[j.value] for j in (COL_CX, COL_CE, COL_D0, COL_DX, COL_DE, COL_SIGMA))
    m = m.to(x.dtype)
    if guidance is not None:
        m_u, m_c = m.chunk(2)
        m = m_u + guidance * (m_c - m_u)
    x0 = cx * x + ce * m  # (1) the x0 estimate (Eq. 12 for eps-prediction)
    if threshold is not None:
        p, s_max = threshold
        s = torch.quantile(x0.abs().flatten(1), p, dim=1).clamp(1.0, s_max)  # (B,)
        s = s.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    elif clip is not None:
        x0 = x0.clamp(*clip)
    out = d0 * x0 + dx * x + de * m  # (2) + (3): sqrt(a') x0 and the direction to x_t
    if hist is not None and hist.shape[0] > 0:
        for k, j in enumerate((COL_H1, COL_H2, COL_H3)[: hist.shape[0]]):
            out = out + row[j.value] * hist[k]  # (**) history terms
        if row[COL_PUSH.value] != 0:
            p = row[COL_PU.value] * x0 + row[COL_PV.value] * x + row[COL_PW.value] * m
            hist[1:] = hist[:-1].clone()
            hist[0] = p
    if z is not None:
        out = out + sigma * z  # (4) sigma_t z
    return out, x0


# -- kernel --------------------------------------------------------------------------------------
@triton.jit
def _ddim_step_kernel(
    X, M, COEF, STEP, SEED, FIRST, THRESH, X0, FLAG,  # pointers
    N, lo, hi,  # sizes and scalars
    BLOCK: tl.constexpr, NOISE: tl.constexpr, CLIP: tl.constexpr,  # meta
    WRITE_X0: tl.constexpr, CHECK: tl.constexpr,
    HIST_PTR, HSTRIDE,  # multistep: the (K, B, N) history buffer and B * N
    HIST: tl.constexpr = 0, NCOL: tl.constexpr = 6,  # K history terms; the table's row length
    W=None, GUIDED: tl.constexpr = False,  # classifier-free guidance: the scale's pointer, and the flag
):
    pid = tl.program_id(0)  # block of elements within the sample
    b = tl.program_id(1)  # sample within the batch
    j = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) int32: flat index within the sample
    mask = j < N
    ptr = b.to(tl.int64) * N + j  # (BLOCK,) int64 offsets into x, m, x0

    i = tl.load(STEP)  # the sampler step, from device memory
    cx = tl.load(COEF + i * NCOL + COL_CX)
    ce = tl.load(COEF + i * NCOL + COL_CE)
    d0 = tl.load(COEF + i * NCOL + COL_D0)
    dx = tl.load(COEF + i * NCOL + COL_DX)
    de = tl.load(COEF + i * NCOL + COL_DE)

    x = tl.load(X + ptr, mask=mask, other=0.0)  # fp32 state
    m = tl.load(M + ptr, mask=mask, other=0.0).to(tl.float32)  # model output, any float dtype
    if GUIDED:  # M holds the doubled batch [uncond; cond] (2B rows): m = m_u + w (m_c - m_u)
        m_c = tl.load(M + tl.num_programs(1).to(tl.int64) * N + ptr, mask=mask, other=0.0).to(tl.float32)
        m = m + tl.load(W) * (m_c - m)
    x0 = cx * x + ce * m  # (1) x0 estimate
    if CLIP == 1:
        x0 = tl.clamp(x0, lo, hi, propagate_nan=tl.PropagateNan.ALL)
    if CLIP == 2:
        s = tl.load(THRESH + b)  # per-sample threshold, >= 1
        x0 = tl.clamp(x0, -s, s, propagate_nan=tl.PropagateNan.ALL) / s
    out = d0 * x0 + dx * x + de * m  # (2) + (3)
    if HIST > 0:  # (**): the history terms, then the push into the same buffer
        h1 = tl.load(HIST_PTR + ptr, mask=mask, other=0.0)
        out += tl.load(COEF + i * NCOL + COL_H1) * h1
        if HIST > 1:
            h2 = tl.load(HIST_PTR + HSTRIDE + ptr, mask=mask, other=0.0)
            out += tl.load(COEF + i * NCOL + COL_H2) * h2
        if HIST > 2:
            h3 = tl.load(HIST_PTR + 2 * HSTRIDE + ptr, mask=mask, other=0.0)
            out += tl.load(COEF + i * NCOL + COL_H3) * h3
        if tl.load(COEF + i * NCOL + COL_PUSH) != 0.0:
            pu = tl.load(COEF + i * NCOL + COL_PU)
            p = pu * x0 + tl.load(COEF + i * NCOL + COL_PV) * x + tl.load(COEF + i * NCOL + COL_PW) * m
            if HIST > 2:
                tl.store(HIST_PTR + 2 * HSTRIDE + ptr, h2, mask=mask)
            if HIST > 1:
                tl.store(HIST_PTR + HSTRIDE + ptr, h1, mask=mask)
            tl.store(HIST_PTR + ptr, p, mask=mask)
    if NOISE:
        sigma = tl.load(COEF + i * NCOL + COL_SIGMA)
        if sigma != 0.0:  # e.g. the last step of variance="large": no draw at all
            # (4) z: key of (seed, sample, step) then element j, exactly as ddim_fast/rng.py;
            # the counters must stay 32-bit or tl.philox switches to its 64-bit variant.
            seed = tl.load(SEED)
            sample = (tl.load(FIRST) + b).to(tl.uint32)  # the global sample index
            k0, k1, _, _ = tl.philox(seed, sample, i, 1, 0)
            key = k0.to(tl.uint64) | (k1.to(tl.uint64) << 32)
            out += sigma * tl.randn(key, j)
    tl.store(X + ptr, out, mask=mask)
    if WRITE_X0:
        tl.store(X0 + ptr, x0, mask=mask)
    if CHECK:
        bad = mask & ((out != out) | (tl.abs(out) == float("inf")))
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            tl.store(FLAG, 1)  # benign race: every writer stores 1


@triton.jit
def _abs_order_stats_kernel(
    A, OUT,  # pointers
    N, K_LO, K_HI,  # sizes: elements per row; the two 0-based ranks, K_LO <= K_HI <= K_LO + 1
    BLOCK: tl.constexpr, CHUNKS: tl.constexpr,  # meta: CHUNKS = cdiv(N, BLOCK) (a constant loop bound)
):
    """OUT[b] = (the K_LO-th and K_HI-th smallest |A[b, :]|), or NaN twice when the row has a NaN."""
    row = A + tl.program_id(0).to(tl.int64) * N
    offs = tl.arange(0, BLOCK)  # (BLOCK,)
    if CHUNKS == 1:  # the whole row in registers: loaded once for all 32 passes
        u0 = tl.load(row + offs, mask=offs < N, other=0.0).to(tl.int32, bitcast=True) & 0x7FFFFFFF
        u0 = tl.where(offs < N, u0, 0x7FFFFFFF)  # padding: above every value (counted by neither test)
    # 1. v = the largest pattern with #{u < v} <= K_LO, built from the top bit down: the K_LO-th value
    v = tl.program_id(0) * 0  # int32 zero
    bit = v + (1 << 30)
    for _ in range(31):
        cand = v | bit
        if CHUNKS == 1:
            count = tl.sum((u0 < cand).to(tl.int32), axis=0)
        else:
            count = v * 0
            for c in range(CHUNKS):
                j = c * BLOCK + offs
                u = tl.load(row + j, mask=j < N, other=0.0).to(tl.int32, bitcast=True) & 0x7FFFFFFF
                count += tl.sum(((u < cand) & (j < N)).to(tl.int32), axis=0)
        v = tl.where(count <= K_LO, cand, v)
        bit = bit >> 1
    # 2. #{u <= v}, the next larger pattern and the NaNs, in one more pass
    n_le = v * 0
    n_nan = v * 0
    nxt = v * 0 + 0x7FFFFFFF
    for c in range(CHUNKS):
        j = c * BLOCK + offs
        valid = j < N
        u = tl.load(row + j, mask=valid, other=0.0).to(tl.int32, bitcast=True) & 0x7FFFFFFF
        n_le += tl.sum((valid & (u <= v)).to(tl.int32), axis=0)
        n_nan += tl.sum((valid & (u > 0x7F800000)).to(tl.int32), axis=0)
        nxt = tl.minimum(nxt, tl.min(tl.where(valid & (u > v), u, 0x7FFFFFFF), axis=0))
    hi = tl.where(n_le > K_HI, v, nxt)  # the K_HI-th value is v itself when v fills that rank too
    out = OUT + tl.program_id(0).to(tl.int64) * 2
    tl.store(out, tl.where(n_nan > 0, float("nan"), v.to(tl.float32, bitcast=True)))  # NaN in, NaN out
    tl.store(out + 1, tl.where(n_nan > 0, float("nan"), hi.to(tl.float32, bitcast=True)))  # (torch.quantile)


# -- launcher ------------------------------------------------------------------------------------
def ddim_step(x, m, coef, step, *, seed=None, first_index=0, clip=None, threshold=None,
              x0_out=None, flag=None, hist=None, guidance=None):
    """One fused step (*) applied IN PLACE to x; returns x. No host sync, graph-capturable.

    x:           (B, ...) float32, contiguous: the sampler state (a static buffer).
    m:           model output, x's shape, float32/float16/bfloat16, contiguous.
    coef:        (S, 6) float32 contiguous device tensor: the plan's table (plan.to(device).coef).
    step:        (1,) int32 device tensor: the row of `coef` to use (the sampler step i).
    seed:        (1,) int64 device tensor, or None: no noise is compiled in (eta = 0). With a seed
                 the noise is rng.step_noise(seed, i, x.shape, first_index=first_index); a step
                 whose sigma is 0 draws nothing at run time.
    first_index: the global sample index of x[0] (so a sample's noise is batch-invariant): an
                 int, or a (1,) int64 device tensor so that one CUDA graph serves any value (the
                 caller then guarantees 0 <= first_index + B < 2**31).
    clip:        None or (lo, hi): clamp the x0 estimate (plan.clip_x0).
    threshold:   None or (p, s_max): dynamic thresholding (plan.threshold, plan.threshold_max);
                 s per sample is computed here with torch (see the module docstring).
    x0_out:      None or a float32 contiguous tensor of x's shape: receives the (clipped) x0.
    flag:        None or a (1,) int32 device tensor set to 1 when any new x is NaN or inf. It is
                 never cleared here: zero it once and check it after any number of steps.
    hist:        None, or for a multistep plan (coef (S, 13)) its (K, B, ...) float32 contiguous
                 history buffer, K = plan.history in 1..3, zeroed before the first step: read by the
                 update and shifted in place in the same pass (**).
    guidance:    None, or a (1,) float32 device tensor w (classifier-free guidance): then m is the
                 network's output on the doubled batch [uncond; cond], (2B, ...), and the kernel
                 forms m = m_u + w (m_c - m_u) from both halves as it reads them (no extra pass).
                 w lives on the device, so one CUDA graph serves every scale.
    """
    _check(x, m if guidance is None else m[: x.shape[0]], coef, step, seed, first_index, clip, threshold,
           x0_out, flag)
    _check_hist(hist, x, coef)
    if guidance is not None:
        check(m.shape[0] == 2 * x.shape[0] and m.is_contiguous(),
              f"with guidance m must be the doubled batch [uncond; cond] of {2 * x.shape[0]} rows, contiguous, "
              f"got {tuple(m.shape)}")
        check(device_scalar(guidance, torch.float32, x.device),
              "guidance must be a (1,) float32 tensor on x's device (the scale lives on the device)")
    B = x.shape[0]
    N = x.numel() // B
    first = _first_index_tensor(first_index, x.device) if seed is not None else step
    mode, lo, hi, thresh = CLIP_NONE, 0.0, 0.0, None
    if threshold is not None:
        m_t = m if guidance is None else m[: x.shape[0]] + guidance * (m[x.shape[0]:] - m[: x.shape[0]])
        mode, thresh = CLIP_THRESHOLD, threshold_scale(x, m_t, coef, step, *threshold)
    elif clip is not None:
        mode, lo, hi = CLIP_RANGE, float(clip[0]), float(clip[1])
    grid = (triton.cdiv(N, BLOCK), B)
    _ddim_step_kernel[grid](
        x, m, coef, step, seed if seed is not None else step, first, thresh if thresh is not None else x,
        x0_out if x0_out is not None else x, flag if flag is not None else step,
        N, lo, hi,
        BLOCK=BLOCK, NOISE=seed is not None, CLIP=mode, WRITE_X0=x0_out is not None,
        CHECK=flag is not None, num_warps=NUM_WARPS,
        HIST_PTR=hist if hist is not None else x, HSTRIDE=x.numel(), HIST=0 if hist is None else hist.shape[0],
        NCOL=coef.shape[1], W=guidance if guidance is not None else coef, GUIDED=guidance is not None,
    )
    return x


def _check_hist(hist, x, coef):
    if hist is None:
        return
    check(coef.shape[1] == NUM_COEF_HIST, "hist needs a multistep plan's (S, 13) table (plan.history > 0)")
    check(float_tensor(hist, (torch.float32,)) and hist.is_contiguous() and hist.device == x.device
          and 1 <= hist.shape[0] <= MAX_HISTORY and tuple(hist.shape[1:]) == tuple(x.shape),
          f"hist must be a float32 contiguous (K, *x.shape) tensor on x's device with 1 <= K <= {MAX_HISTORY} "
          "(K = plan.history)")


def _first_index_tensor(first_index, device):
    if isinstance(first_index, torch.Tensor):
        return first_index
    return torch.full((1,), first_index, dtype=torch.int64, device=device)


def _check_first_index(first_index, x):
    if isinstance(first_index, torch.Tensor):
        check(device_scalar(first_index, torch.int64, x.device),
              "first_index must be an int or a (1,) int64 tensor on x's device")
    else:
        check(is_int(first_index) and 0 <= first_index and first_index + x.shape[0] <= 2**31 - 1,
              f"first_index must be an int with 0 <= first_index + B < 2**31, got {first_index!r}")


# -- the start noise x_T -------------------------------------------------------------------------
# Its reference is ddim_fast.rng.initial_noise (the same stream with step 0 and purpose 0), which
# the tests compare against; a kernel file imports nothing from ddim_fast, and restating Philox
# here would only give a second copy to keep in step.
@triton.jit
def _initial_noise_kernel(
    X, SEED, FIRST,  # pointers
    N,  # elements per sample
    BLOCK: tl.constexpr,  # meta
):
    pid = tl.program_id(0)  # block of elements within the sample
    b = tl.program_id(1)  # sample within the batch
    j = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat index within the sample
    seed = tl.load(SEED)
    sample = (tl.load(FIRST) + b).to(tl.uint32)
    k0, k1, _, _ = tl.philox(seed, sample, 0, 0, 0)  # step 0, purpose 0 (x_T)
    key = k0.to(tl.uint64) | (k1.to(tl.uint64) << 32)
    tl.store(X + b.to(tl.int64) * N + j, tl.randn(key, j), mask=j < N)


def initial_noise(x, seed, first_index=0):
    """Fill x (B, ...) float32 contiguous IN PLACE with the start noise x_T of samples
    first_index .. first_index + B - 1 of `seed` ((1,) int64 device tensor); returns x.
    Graph-capturable: seed and first_index (a (1,) int64 tensor) are read on the device."""
    check(float_tensor(x, (torch.float32,)) and x.ndim >= 2 and x.is_contiguous(),
          "x must be a contiguous float32 tensor (B, ...)")
    check(device_scalar(seed, torch.int64, x.device), "seed must be a (1,) int64 tensor on x's device")
    _check_first_index(first_index, x)
    batch_fits(x.shape[0], MAX_BATCH)
    B = x.shape[0]
    N = x.numel() // B
    grid = (triton.cdiv(N, BLOCK), B)
    _initial_noise_kernel[grid](x, seed, _first_index_tensor(first_index, x.device), N, BLOCK=BLOCK,
                                num_warps=NUM_WARPS)
    return x


def threshold_scale(x, m, coef, step, p, s_max=math.inf):
    """Per-sample s = quantile(|x0|, p) clamped to [1, s_max], x0 = cx x + ce m: (B,) float32.

    Matches torch.quantile's linear interpolation (rank p (n-1) in float32) between the two
    order statistics it needs, found by abs_order_stats: no sort, no host sync, capturable.
    """
    B = x.shape[0]
    n = x.numel() // B
    c = coef.index_select(0, step)  # (1, 6) on the device: no host sync
    cx, ce = c[:, COL_CX.value : COL_CX.value + 1], c[:, COL_CE.value : COL_CE.value + 1]  # (1, 1)
    a = (cx * x.reshape(B, n) + ce * m.reshape(B, n).float()).abs_()  # (B, n)
    rank = torch.tensor(p, dtype=torch.float32) * (n - 1)  # host scalar, as torch.quantile
    below, above = math.floor(rank.item()), math.ceil(rank.item())
    weight = float(rank - below)
    pair = abs_order_stats(a, below, above)  # (B, 2): the values of rank `below` and `above`
    s = torch.lerp(pair[:, 0], pair[:, 1], weight)  # (B,)
    return s.clamp_(1.0, s_max).contiguous()


def abs_order_stats(a, k_lo, k_hi):
    """(B, 2) float32: the k_lo-th and k_hi-th smallest (0-based) of |a[b]| for each row of
    a (B, n) float32 contiguous, with k_lo <= k_hi <= min(k_lo + 1, n - 1); NaN for a row holding
    NaN (as torch.quantile). Exact (ties included), one program per row, graph-capturable."""
    check(float_tensor(a, (torch.float32,), ndim=2) and a.is_contiguous(),
          "a must be a contiguous float32 tensor (B, n)")
    runnable(a, _abs_order_stats_kernel, "abs_order_stats")
    B, n = a.shape
    check(B >= 1 and 1 <= n < 2**31, f"a must have 1 <= B and 1 <= n < 2**31, got {tuple(a.shape)}")
    check(0 <= k_lo <= k_hi <= min(k_lo + 1, n - 1),
          f"ranks must satisfy 0 <= k_lo <= k_hi <= min(k_lo + 1, n - 1), got {k_lo}, {k_hi} for n={n}")
    out = torch.empty((B, 2), dtype=torch.float32, device=a.device)
    block, chunks, warps = select_config(n)
    _abs_order_stats_kernel[(B,)](a, out, n, int(k_lo), int(k_hi), BLOCK=block, CHUNKS=chunks, num_warps=warps)
    return out


def select_config(n):
    """(BLOCK, CHUNKS, num_warps) of _abs_order_stats_kernel for rows of n elements."""
    block = min(SELECT_BLOCK, max(16, triton.next_power_of_2(n)))
    return block, triton.cdiv(n, block), 4 if block <= 1024 else 8


def _check(x, m, coef, step, seed, first_index, clip, threshold, x0_out, flag):
    check(float_tensor(x, (torch.float32,)) and x.ndim >= 2,
          "x must be a float32 tensor (B, ...): the sampler state stays fp32; pass x.float()")
    check(x.is_contiguous(), "x must be contiguous (it is updated in place); pass x.contiguous() once")
    runnable(x, _ddim_step_kernel, "ddim_step", "or use the reference sampler")
    check(float_tensor(m, M_DTYPES) and m.shape == x.shape, f"m must have x's shape {tuple(x.shape)} and dtype "
          f"float32/float16/bfloat16, got {getattr(m, 'shape', type(m))} {getattr(m, 'dtype', '')}")
    check(m.is_contiguous() and m.device == x.device, "m must be contiguous and on x's device; pass m.contiguous()")
    check(coef.dtype == torch.float32 and coef.ndim == 2 and coef.shape[1] in (NUM_COEF, NUM_COEF_HIST)
          and coef.is_contiguous(), "coef must be the plan's (S, 6) or (S, 13) float32 contiguous table: "
          "plan.to(device).coef")
    check(coef.device == x.device, f"coef is on {coef.device} but x on {x.device}: plan.to(x.device)")
    check(device_scalar(step, torch.int32, x.device),
          "step must be a (1,) int32 tensor on x's device (the step index lives on the device)")
    check(seed is None or device_scalar(seed, torch.int64, x.device),
          "seed must be None (no noise) or a (1,) int64 tensor on x's device")
    batch_fits(x.shape[0], MAX_BATCH)
    n = x.numel() // x.shape[0]
    check(n < 2**31, f"a sample has {n} elements; the kernel and the noise stream address fewer than 2**31")
    _check_first_index(first_index, x)
    check(clip is None or threshold is None, "give clip or threshold, not both (thresholding already clips)")
    if clip is not None:
        lo, hi = (float(v) for v in clip)
        check(math.isfinite(lo) and math.isfinite(hi) and lo < hi,
              f"clip must be finite (lo, hi) with lo < hi, got {clip!r}")
    if threshold is not None:
        p, s_max = threshold
        check(0 < p <= 1 and s_max >= 1,
              f"threshold must be (p, s_max) with 0 < p <= 1 and s_max >= 1, got {threshold!r}")
    check(x0_out is None or (float_tensor(x0_out, (torch.float32,)) and x0_out.shape == x.shape
                             and x0_out.is_contiguous() and x0_out.device == x.device),
          "x0_out must be a float32 contiguous tensor of x's shape on x's device")
    check(flag is None or device_scalar(flag, torch.int32, x.device),
          "flag must be a (1,) int32 tensor on x's device (zero it before the loop)")
