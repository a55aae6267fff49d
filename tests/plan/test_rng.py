import os
import subprocess
import sys

import pytest
import torch

from ddim_fast import rng

M32 = 0xFFFFFFFF


def _t(v):
    return torch.tensor(v, dtype=torch.int64)


@pytest.mark.parametrize(
    "key, counter, expect",
    [  # Random123's known-answer vectors for Philox-4x32-10
        ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M32, M32), (M32, M32, M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0xA4093822, 0x299F31D0),
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(key, counter, expect):
    out = rng.philox(*map(_t, key), *map(_t, counter))
    assert tuple(int(v) for v in out) == expect


@pytest.mark.parametrize("kshape, cshape", [((), ()), ((5, 1), (1, 37)), ((3,), (3,))])
def test_numpy_and_torch_philox_give_the_same_integers(kshape, cshape):
    """On the CPU `philox` runs in NumPy uint64; on other devices in torch's 16-bit limbs. Both
    must give the same words for any uint32 input, including the extremes."""
    g = torch.Generator().manual_seed(hash((kshape, cshape)) % 2**31)
    key = [torch.randint(0, 2**32, kshape, generator=g, dtype=torch.int64) for _ in range(2)]
    ctr = [torch.randint(0, 2**32, cshape, generator=g, dtype=torch.int64) for _ in range(4)]
    if cshape:
        ctr[0].view(-1)[0], ctr[2].view(-1)[-1] = M32, 0
    fast, limbs = rng.philox(*key, *ctr), rng._philox_torch(*key, *ctr)
    for a, b in zip(fast, limbs):
        assert a.dtype == b.dtype == torch.int64 and a.shape == b.shape
        assert torch.equal(a, b)
        assert 0 <= int(a.min()) and int(a.max()) <= M32


def test_batch_invariance_and_addressing():
    full = rng.step_noise(5, 3, (6, 2, 5, 5))
    for b in range(6):
        assert torch.equal(rng.step_noise(5, 3, (1, 2, 5, 5), first_index=b)[0], full[b])
    assert not torch.equal(rng.step_noise(5, 4, (6, 2, 5, 5)), full)  # another step
    assert not torch.equal(rng.step_noise(6, 3, (6, 2, 5, 5)), full)  # another seed
    assert not torch.equal(rng.initial_noise(5, (6, 2, 5, 5)), rng.step_noise(5, 0, (6, 2, 5, 5)))
    assert torch.equal(rng.initial_noise(2**63 - 1, (2, 3)), rng.initial_noise(2**63 - 1, (2, 3)))


def test_normal_statistics():
    z = rng.initial_noise(0, (16, 4096)).double()
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z**3).mean().item()) < 0.03 and abs((z**4).mean().item() - 3) < 0.06
    # neighbouring samples and elements are uncorrelated
    assert abs((z[:-1] * z[1:]).mean().item()) < 0.01
    assert abs((z[:, :-1] * z[:, 1:]).mean().item()) < 0.01


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "0", True, None])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        rng.initial_noise(seed, (1, 3))


KERNEL_SCRIPT = """
import sys, torch, triton, triton.language as tl

@triton.jit
def _noise_kernel(OUT, INTS, SEED, first_index, step, purpose: tl.constexpr, N: tl.constexpr):
    b = tl.program_id(0)
    seed = tl.load(SEED)
    k0, k1, _, _ = tl.philox(seed, (first_index + b).to(tl.uint32), step.to(tl.uint32), purpose, 0)
    key = k0.to(tl.uint64) | (k1.to(tl.uint64) << 32)
    j = tl.arange(0, N)
    i1, i2, _, _ = tl.randint4x(key, j)
    tl.store(INTS + b * 2 * N + j, i1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(INTS + b * 2 * N + N + j, i2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(OUT + b * N + j, tl.randn(key, j))

B, N, results = 3, 1024, []
for seed, step, first, purpose in CASES:
    out = torch.full((B, N), float("nan"))
    ints = torch.full((B, 2, N), -1, dtype=torch.int64)
    _noise_kernel[(B,)](out, ints, torch.tensor([seed]), first, step, purpose=purpose, N=N)
    results.append((out, ints))
torch.save(results, sys.argv[1])
"""


def test_matches_triton_randn_in_the_interpreter(tmp_path):
    """The claim the fused step kernel relies on: this stream IS tl.philox + tl.randn.

    Runs in a fresh interpreter process: TRITON_INTERPRET must be set before Triton loads."""
    pytest.importorskip("triton")
    cases = [(0, 0, 0, rng.PURPOSE_XT), (2**40 + 7, 17, 5, rng.PURPOSE_STEP)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = f"CASES = {cases!r}\n" + KERNEL_SCRIPT
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "r.pt")], env=env, check=True)
    results = torch.load(tmp_path / "r.pt")
    B, N = 3, 1024
    for (seed, step, first, purpose), (out, ints) in zip(cases, results):
        # the integers are identical ...
        k0, k1 = rng.sample_keys(seed, torch.arange(first, first + B), step, purpose)
        j = torch.arange(N)[None, :]
        i1, i2, _, _ = rng.philox(k0[:, None], k1[:, None], j, 0 * j, 0 * j, 0 * j)
        assert torch.equal(ints[:, 0], i1) and torch.equal(ints[:, 1], i2)
        # ... and the normals agree to float32 rounding (log/cos may differ in the last bit)
        ref = rng.normal(seed, (B, N), step=step, purpose=purpose, first_index=first)
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
