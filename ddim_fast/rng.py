"""Counter-based Gaussian noise: a pure function of (seed, sample index, step, element).

Why: with a stateful generator the noise a sample gets depends on what else is in the batch,
so the same seed gives different images at batch 1 and batch 16 (diffusers issues 2659, 6222).
Here every number is addressed, never drawn in sequence, so a sample is the same at any batch
size, on any device, on any backend, and a fused kernel can draw it in-kernel.

The stream is Triton's own, so the fused step kernel reproduces it bit for bit (integers) and
to float32 rounding (normals):

  1. a per-(sample, step) key: Philox-4x32-10 keyed by the 64-bit seed, on the counter
     (sample index, step, purpose, 0); its first two output words are the new 64-bit key
     (`tl.philox(seed, index, step, purpose, 0)` in a kernel);
  2. element j of that sample: `tl.randn(key, j)`, i.e. Philox on the counter (j, 0, 0, 0),
     the first two words mapped to uniforms and through Box-Muller (cos branch).

`purpose` separates the start noise x_T (PURPOSE_XT, step 0) from the per-step noise z
(PURPOSE_STEP, step i = the sampler's step index). Philox runs on int64 tensors holding uint32
values, split into 16-bit limbs so that no product overflows (torch has no usable uint64), on any
device torch supports. On the CPU it runs in NumPy's uint64 instead: the same integers with a
quarter of the operations, which at batch 1 are all overhead (measured: ~3.6 ms -> ~0.3 ms a step).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .checks import is_int

# The `purpose` word of a key: what a stream is for. The sampler's x_T and per-step noise, then the
# trainer's keyed draws (ddim_fast.train: data order per epoch, the batch's t / eps / flips, dropout,
# class dropout), so no two uses of a seed ever share a stream.
PURPOSE_XT = 0
PURPOSE_STEP = 1
PURPOSE_EPOCH, PURPOSE_BATCH, PURPOSE_DROPOUT, PURPOSE_CLASS = 16, 17, 18, 19

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Philox key increments (Weyl sequence)
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers
_ROUNDS = 10  # tl.randn's default
_UNIFORM_SCALE = 4.6566127342e-10  # largest float with (2**31 - 1) * scale < 1 in float32
SEED_MAX = 2**63 - 1  # the seed travels as an int64 device tensor


def _mulhilo(a: torch.Tensor, b: int):
    """(hi, lo) 32-bit words of the 64-bit product a * b, a a uint32-valued int64 tensor."""
    p1 = (a >> 16) * b  # < 2**48
    p0 = (a & 0xFFFF) * b  # < 2**48
    hi = (p1 + (p0 >> 16)) >> 16
    lo = (((p1 & 0xFFFF) << 16) + p0) & _MASK32
    return hi, lo


def philox(k0, k1, c0, c1, c2, c3, rounds: int = _ROUNDS):
    """Philox-4x32 on int64 tensors (or ints) holding uint32 values; broadcasts like torch.
    Returns int64 tensors (ints if every argument is an int) on the arguments' device."""
    args = (k0, k1, c0, c1, c2, c3)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if tensors and all(t.device.type == "cpu" for t in tensors):
        out = _philox_numpy(*(np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a, dtype=np.uint64)
                              for a in args), rounds)
        return tuple(torch.from_numpy(np.asarray(o, dtype=np.int64)) for o in out)  # 0-d ops give scalars
    return _philox_torch(*args, rounds)


def _philox_numpy(k0, k1, c0, c1, c2, c3, rounds: int = _ROUNDS):
    """Philox-4x32 on uint64 arrays holding uint32 values: a 32x32-bit product fits in 64 bits."""
    mask, a, b = np.uint64(_MASK32), np.uint64(_ROUND_A), np.uint64(_ROUND_B)
    ka, kb, shift = np.uint64(_KEY_A), np.uint64(_KEY_B), np.uint64(32)
    for _ in range(rounds):
        pb, pa = c2 * b, c0 * a
        c0, c1, c2, c3 = (pb >> shift) ^ c1 ^ k0, pb & mask, (pa >> shift) ^ c3 ^ k1, pa & mask
        k0, k1 = (k0 + ka) & mask, (k1 + kb) & mask
    return c0, c1, c2, c3


def _philox_torch(k0, k1, c0, c1, c2, c3, rounds: int = _ROUNDS):
    """Philox-4x32 in torch int64 arithmetic, any device (16-bit limbs in the products)."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def check_seed(seed) -> int:
    """`seed` as a Python int (numpy integers accepted), or ValueError."""
    if not is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def sample_keys(seed, indices: torch.Tensor, step: int, purpose: int):
    """Level 1: the 64-bit key (k0, k1) of each sample index at one step. indices: (B,) long; seed: an int,
    or a (B,) int64 tensor of checked seeds, one per index (rows of different requests)."""
    seed = seed if isinstance(seed, torch.Tensor) else check_seed(seed)
    idx = indices.to(torch.int64)
    zero = torch.zeros_like(idx)
    o0, o1, _, _ = philox(
        seed & _MASK32, seed >> 32, idx & _MASK32, zero + (step & _MASK32), zero + purpose, zero
    )
    return o0, o1


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: reinterpret as int32, fold negatives with ~x, scale."""
    folded = torch.where(bits >= 2**31, _MASK32 - bits, bits)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def normals_from_keys(k0: torch.Tensor, k1: torch.Tensor, numel: int) -> torch.Tensor:
    """Level 2: `tl.randn(key, j)` for j in [0, numel) under each key. Returns (B, numel) float32."""
    if numel >= 2**31:
        raise ValueError(f"a sample has {numel} elements; the noise stream addresses fewer than 2**31")
    j = torch.arange(numel, dtype=torch.int64, device=k0.device)[None, :]
    zero = torch.zeros_like(j)
    i1, i2, _, _ = philox(k0[:, None], k1[:, None], j, zero, zero, zero)
    u1 = torch.clamp(_uniform(i1), min=torch.tensor(1.0e-7, dtype=torch.float32))
    u2 = _uniform(i2)
    two_pi = torch.tensor(6.283185307179586, dtype=torch.float32)
    r = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32) * torch.log(u1))
    return r * torch.cos(two_pi * u2)


def normal(seed: int, shape, *, step: int, purpose: int, first_index: int = 0, device=None) -> torch.Tensor:
    """Gaussian noise of `shape` = (B, ...): sample b is addressed by index first_index + b."""
    shape = tuple(shape)
    if len(shape) < 1 or shape[0] < 0:
        raise ValueError(f"shape must be (batch, ...), got {shape}")
    numel = 1
    for s in shape[1:]:
        numel *= s
    idx = torch.arange(first_index, first_index + shape[0], dtype=torch.int64, device=device)
    k0, k1 = sample_keys(seed, idx, step, purpose)
    return normals_from_keys(k0, k1, numel).reshape(shape)


def initial_noise(seed: int, shape, *, first_index: int = 0, device=None) -> torch.Tensor:
    """x_T for samples first_index .. first_index + B - 1."""
    return normal(seed, shape, step=0, purpose=PURPOSE_XT, first_index=first_index, device=device)


def step_noise(seed: int, step: int, shape, *, first_index: int = 0, device=None) -> torch.Tensor:
    """z for the sampler's step `step` (0-based position in the plan, not the timestep)."""
    return normal(seed, shape, step=step, purpose=PURPOSE_STEP, first_index=first_index, device=device)


def row_normal(seeds, indices, sample_shape, *, step: int, purpose: int, device=None) -> torch.Tensor:
    """Gaussian noise for rows of different seeds: row b is sample indices[b] of seeds[b], the very numbers
    normal(seeds[b], ..., first_index=indices[b]) gives it alone (the keys are per row either way).
    seeds, indices: sequences of B ints; returns (B, *sample_shape) float32."""
    seeds = [check_seed(s) for s in seeds]
    if len(seeds) != len(indices) or not seeds:
        raise ValueError(f"seeds and indices must be two non-empty sequences of one length, got {len(seeds)} "
                         f"and {len(indices)}")
    k0, k1 = sample_keys(torch.tensor(seeds, dtype=torch.int64, device=device),
                         torch.as_tensor(indices, dtype=torch.int64, device=device), step, purpose)
    return normals_from_keys(k0, k1, math.prod(sample_shape)).reshape(len(seeds), *sample_shape)


def derived_seed(seed: int, counter: int, purpose: int, index: int = 0) -> int:
    """A 63-bit seed (for a torch.Generator) from (seed, counter, purpose, index) through the same
    Philox keys: how the trainer keys every draw of step `counter`."""
    k0, k1 = sample_keys(seed, torch.tensor([index]), counter, purpose)
    return (int(k1[0]) << 32 | int(k0[0])) & SEED_MAX
