"""GroupNorm with the ResBlock's per-channel add before it and SiLU after it, in one kernel.

What is fused and why. The DDPM ResBlock computes `silu(group_norm(h + temb[:, :, None, None]))`;
eager PyTorch spends one pass on the add, two on GroupNorm and one on SiLU, each writing a
full activation. Here a group is read (at most twice: statistics, then normalise) and written
once, with the add and SiLU folded into the per-channel affine y = x * scale + shift.

Numerics: statistics are fp32 whatever the input dtype, and never E[x^2] - E[x]^2: a tile's
mean and centred sum of squares are exact two-pass sums in registers, and tiles are merged with
Chan et al.'s parallel update (count, mean, M2), so large groups do not cancel.

Three ways to cover a group (the launcher picks by size; all give the same statistics):
  MODE 0  the whole group fits one tile: read once, normalise from registers (CIFAR/CelebA).
  MODE 1  one program per group loops over it in tiles: statistics pass, then normalise pass.
  MODE 2  a group split over `split` programs (large groups with few (batch, group) pairs, e.g.
          LSUN 256x256 at batch 1: 4 channels x 65536 pixels per group): a statistics kernel
          writes each chunk's (mean, M2), the normalise kernel merges them and writes its chunk.
Layouts: x is viewed as (B, C, P) with P = H*W, which covers NCHW (channel stride P, pixel
stride 1) and channels_last (channel stride 1, pixel stride C); y has x's memory format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .checks import check, float_tensor, is_int, runnable

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SINGLE_MAX = 8192  # largest group (pow2-padded) kept in registers; NOTE: not yet tuned on a GPU
TILE = 2048  # elements per tile when looping over a group; NOTE: not yet tuned on a GPU
PROGRAMS_PER_SM = 4  # split large groups until about this many programs per SM
MAX_SPLIT = 128  # most programs per group (MODE 2 merges this many partials, masked)
MAX_NUMEL = 2**31 - 1  # most elements of x in one launch (kept within int32 offsets); split the batch above


# -- reference -----------------------------------------------------------------------------------
def group_norm_ref(x, weight, bias, num_groups, eps=1e-6, *, add=None, silu=False):
    """Plain PyTorch: (x + add[:, :, None, None]) -> GroupNorm (fp32 statistics) -> SiLU.

    Computes in fp32 (float64 for float64 input) and returns x's dtype.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(work)
    if add is not None:
        h = h + add.to(work)[:, :, None, None]  # (B, C, 1, 1)
    y = F.group_norm(h, num_groups, weight.to(work), bias.to(work), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


# -- kernels -------------------------------------------------------------------------------------
@triton.jit
def _chunk_moments(X, ADD, b, p_start, p_end, CPG, stride_xb, stride_xc, stride_xp, stride_ab, stride_ac,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HAS_ADD: tl.constexpr):
    """(count, mean, M2) of x (+ add) over a group's CPG channels x pixels [p_start, p_end).

    X and ADD point at the group's first channel. Each (BLOCK_C, BLOCK_P) tile's mean and M2 are
    exact two-pass sums in registers; tiles merge by Chan, Golub & LeVeque's parallel update.
    (No helper calls inside the loop: the interpreter pays heavily for each.)
    """
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channel within the group
        a = tl.load(ADD + b * stride_ab + c * stride_ac, mask=c < CPG, other=0.0).to(tl.float32)
        for p0 in range(p_start, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)  # (BLOCK_P,) pixel
            mask = (c[:, None] < CPG) & (p[None, :] < p_end)
            ptr = X + b.to(tl.int64) * stride_xb + c[:, None] * stride_xc + p[None, :] * stride_xp
            x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_P)
            if HAS_ADD:
                x = tl.where(mask, x + a[:, None], 0.0)  # padding stays 0 for the sums
            tn = tl.sum(mask.to(tl.float32))
            tmean = tl.sum(x) / tn
            d = tl.where(mask, x - tmean, 0.0)
            total = n + tn
            delta = tmean - mean
            mean += delta * (tn / total)
            m2 += tl.sum(d * d) + delta * delta * (n * tn / total)
            n = total
    return n, mean, m2


@triton.jit
def _group_norm_stats_kernel(
    X, ADD, PART,  # pointers
    C, HW, CPG, chunk,  # sizes
    stride_xb, stride_xc, stride_xp, stride_ab, stride_ac,  # strides
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HAS_ADD: tl.constexpr,  # meta
):
    """MODE 2, pass 1: (mean, M2) of chunk `sp` of group `bg` into PART[bg, sp, :]."""
    bg = tl.program_id(0)
    sp = tl.program_id(1)
    G = C // CPG
    b = bg // G
    p_start = sp * chunk
    p_end = tl.minimum(p_start + chunk, HW)
    c_first = (bg % G) * CPG
    _, mean, m2 = _chunk_moments(X + c_first * stride_xc, ADD + c_first * stride_ac, b, p_start, p_end, CPG,
                                 stride_xb, stride_xc, stride_xp, stride_ab, stride_ac, BLOCK_C, BLOCK_P, HAS_ADD)
    out = PART + (bg * tl.num_programs(1) + sp) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def _group_norm_kernel(
    X, ADD, W, BIAS, Y, PART,  # pointers
    C, HW, CPG, chunk, eps,  # sizes
    stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp, stride_ab, stride_ac,  # strides
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, MODE: tl.constexpr,  # meta
    BLOCK_S: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
):
    bg = tl.program_id(0)  # (batch, group) pair
    sp = tl.program_id(1)  # chunk of pixels (MODE 2), else 0
    G = C // CPG
    b = bg // G
    c_first = (bg % G) * CPG
    Xg = X + c_first * stride_xc  # this group's channels
    Yg = Y + c_first * stride_yc
    Ag = ADD + c_first * stride_ac
    p_start = sp * chunk
    p_end = tl.minimum(p_start + chunk, HW)
    count = (CPG * HW) * 1.0  # fp32 (an int arg of value 1 is specialised to a constant)

    # 1. statistics of the whole group
    if MODE == 0:  # the whole group in one tile, kept in registers for step 2
        c = tl.arange(0, BLOCK_C)
        p = tl.arange(0, BLOCK_P)
        mask = (c[:, None] < CPG) & (p[None, :] < HW)
        ptr = Xg + b.to(tl.int64) * stride_xb + c[:, None] * stride_xc + p[None, :] * stride_xp
        x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_C, BLOCK_P)
        if HAS_ADD:
            a = tl.load(Ag + b * stride_ab + c * stride_ac, mask=c < CPG, other=0.0).to(tl.float32)
            x = tl.where(mask, x + a[:, None], 0.0)
        mean = tl.sum(x) / count  # two-pass in registers
        d = tl.where(mask, x - mean, 0.0)
        m2 = tl.sum(d * d)
    elif MODE == 1:
        _, mean, m2 = _chunk_moments(Xg, Ag, b, 0, HW, CPG, stride_xb, stride_xc, stride_xp,
                                     stride_ab, stride_ac, BLOCK_C, BLOCK_P, HAS_ADD)
    else:  # merge the chunks' (mean, M2) written by _group_norm_stats_kernel
        s = tl.arange(0, BLOCK_S)
        n_split = tl.num_programs(1)
        valid = s < n_split
        part = PART + (bg * n_split + s) * 2
        means = tl.load(part, mask=valid, other=0.0)
        m2s = tl.load(part + 1, mask=valid, other=0.0)
        ns = tl.where(valid, (tl.minimum(chunk, HW - s * chunk) * CPG).to(tl.float32), 0.0)
        mean = tl.sum(ns * means) / count
        d = means - mean
        m2 = tl.sum(m2s) + tl.sum(ns * d * d)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)

    # 2. normalise: y = (x + add - mean) * rstd * w + bias = x * scale + shift, then SiLU
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        cmask = c < CPG
        scale = tl.load(W + c_first + c, mask=cmask, other=0.0).to(tl.float32) * rstd
        shift = tl.load(BIAS + c_first + c, mask=cmask, other=0.0).to(tl.float32) - mean * scale
        if HAS_ADD:
            shift += tl.load(Ag + b * stride_ab + c * stride_ac, mask=cmask, other=0.0).to(tl.float32) * scale
        for p0 in range(p_start, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
            mask = cmask[:, None] & (p[None, :] < p_end)
            if MODE != 0:  # MODE 0 normalises the tile of step 1 (add included), still in registers
                x = tl.load(Xg + b.to(tl.int64) * stride_xb + c[:, None] * stride_xc + p[None, :] * stride_xp,
                            mask=mask, other=0.0).to(tl.float32)
                y = x * scale[:, None] + shift[:, None]
            else:
                y = (x - mean) * (scale[:, None])
                y += tl.load(BIAS + c_first + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
            if SILU:
                y = y * tl.sigmoid(y)
            yptr = Yg + b.to(tl.int64) * stride_yb + c[:, None] * stride_yc + p[None, :] * stride_yp
            tl.store(yptr, y.to(Y.dtype.element_ty), mask=mask)


# -- launcher ------------------------------------------------------------------------------------
def group_norm(x, weight, bias, num_groups, eps=1e-6, *, add=None, silu=False, out=None, split=None,
               tile=None):
    """silu?(GroupNorm(x + add[:, :, None, None])) with fp32 statistics; returns y (`out` if given).

    x:          (B, C, H, W) float32/float16/bfloat16, NCHW-contiguous or channels_last; the
                output has the same dtype and memory format.
    weight/bias:(C,) affine parameters (any float dtype, contiguous).
    num_groups: G, dividing C.  eps: added to the variance (the DDPM UNet uses 1e-6).
    add:        None or (B, C): per-(batch, channel) values added before normalising.
    silu:       apply SiLU (x * sigmoid(x)) to the output.
    out:        None (a new tensor like x) or a tensor of x's shape, dtype and memory format.
    split:      programs per group, at most MAX_SPLIT; None picks by size (1 = one program loops
                over a group).
    tile:       elements per tile (a power of two); None = a group up to SINGLE_MAX in one tile,
                else TILE. Both knobs exist for tuning and tests; results do not depend on them
                beyond fp32 rounding.
    """
    B, C, H, W, CPG = _check(x, weight, bias, num_groups, add, out, split, tile)
    HW = H * W
    y = torch.empty_like(x) if out is None else out  # empty_like preserves x's strides
    sxc, sxp = (1, C) if _is_channels_last(x) else (HW, 1)
    syc, syp = (1, C) if _is_channels_last(y) else (HW, 1)
    sab, sac = (add.stride(0), add.stride(1)) if add is not None else (0, 0)
    mode, block_c, block_p, split, num_warps = _config(B, C, HW, CPG, x.device, split, tile)
    chunk = triton.cdiv(HW, split)
    if mode == 2:
        chunk = triton.cdiv(chunk, block_p) * block_p  # chunk boundaries on tile boundaries
        split = triton.cdiv(HW, chunk)
        mode = 2 if split > 1 else 1
    part = torch.empty((B * num_groups, split, 2), dtype=torch.float32, device=x.device) if mode == 2 else y
    grid = (B * num_groups, split)
    addp = add if add is not None else x
    if mode == 2:
        _group_norm_stats_kernel[grid](
            x, addp, part, C, HW, CPG, chunk, x.stride(0), sxc, sxp, sab, sac,
            BLOCK_C=block_c, BLOCK_P=block_p, HAS_ADD=add is not None, num_warps=num_warps,
        )
    _group_norm_kernel[grid](
        x, addp, weight, bias, y, part, C, HW, CPG, chunk, float(eps),
        x.stride(0), sxc, sxp, y.stride(0), syc, syp, sab, sac,
        BLOCK_C=block_c, BLOCK_P=block_p, MODE=mode, BLOCK_S=MAX_SPLIT if mode == 2 else 1,
        HAS_ADD=add is not None, SILU=bool(silu), num_warps=num_warps,
    )
    return y


def _config(B, C, HW, CPG, device, split, tile):
    """(mode, BLOCK_C, BLOCK_P, split, num_warps) for a group of CPG channels x HW pixels."""
    full_c, full_p = triton.next_power_of_2(CPG), triton.next_power_of_2(HW)
    if split in (None, 1) and full_c * full_p <= (tile or SINGLE_MAX):
        full = full_c * full_p  # NOTE: at most 16 fp32 values per thread keeps <= 80 registers (aot.py)
        return 0, full_c, full_p, 1, 4 if full <= 2048 else (8 if full <= 4096 else 16)
    tile = tile or TILE
    block_c = min(full_c, max(tile // 16, 1))  # at least 16 pixels per tile row
    block_p = max(tile // block_c, 1)
    if split is None:  # enough programs to fill the device: about PROGRAMS_PER_SM per SM
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        split = max(1, triton.cdiv(PROGRAMS_PER_SM * sms, B * (C // CPG)))
    split = min(split, triton.cdiv(HW, block_p), MAX_SPLIT)
    return (1 if split == 1 else 2), block_c, block_p, split, 4 if tile <= 2048 else 8


def _is_channels_last(t):
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _check(x, weight, bias, num_groups, add, out, split, tile):
    check(float_tensor(x, DTYPES, ndim=4), f"x must be a (B, C, H, W) float32/float16/bfloat16 tensor, got "
          f"{getattr(x, 'shape', type(x))} {getattr(x, 'dtype', '')}")
    check(x.numel() <= MAX_NUMEL,  # before the device check, so a meta tensor can test it
          f"x {tuple(x.shape)} has {x.numel()} elements, more than one launch takes ({MAX_NUMEL}); "
          f"run the batch in chunks (ddim_fast's triton ops do this)")
    check(x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last),
          "x must be NCHW-contiguous or channels_last; pass x.contiguous()")
    runnable(x, _group_norm_kernel, "group_norm", "or use the reference ops")
    B, C, H, W = x.shape
    check(is_int(num_groups) and num_groups >= 1 and C % num_groups == 0,
          f"num_groups must be a positive int dividing C={C}, got {num_groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        check(isinstance(t, torch.Tensor) and t.shape == (C,) and t.is_contiguous() and t.is_floating_point(),
              f"{name} must be a contiguous float tensor of shape ({C},)")
        check(t.device == x.device, f"{name} is on {t.device} but x on {x.device}; move the module to x's device")
    if add is not None:
        check(isinstance(add, torch.Tensor) and add.shape == (B, C) and add.is_floating_point(),
              f"add must be a float tensor of shape (B, C) = ({B}, {C}), got {getattr(add, 'shape', add)}")
        check(add.device == x.device, f"add is on {add.device} but x on {x.device}")
    check(out is None or (isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype
                          and out.device == x.device and out.stride() == x.stride()),
          "out must be a tensor of x's shape, dtype, device and memory format (torch.empty_like(x))")
    check(split is None or (is_int(split) and 1 <= split <= MAX_SPLIT),
          f"split must be None or an int in [1, {MAX_SPLIT}], got {split!r}")
    check(tile is None or (is_int(tile) and tile >= 16 and tile & (tile - 1) == 0),
          f"tile must be None or a power of two >= 16, got {tile!r}")
    return B, C, H, W, C // num_groups
