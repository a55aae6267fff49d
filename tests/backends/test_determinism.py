"""Determinism: for one seed, which CPU backends give bit-identical results, and which agree only
under docs/DESIGN.md's tolerance rule, across batch sizes, repeats and processes.

The facts (recorded in docs/RELIABILITY.md; measured on this project's 2-core x86 CPU machine):
- the noise (x_T and every step's z) is a pure function of (seed, sample index, step): bit-identical
  at any batch size (tests/plan/test_rng.py), so every difference below comes from the network's arithmetic;
- reference, elementwise network: bit-identical across batch sizes and repeats;
- reference, UNet: bit-identical on repeats and across processes, NOT across batch sizes (PyTorch's CPU
  convolutions pick per-batch-size kernels): within float32 rounding (1e-5);
- triton (interpreter), elementwise network: bit-identical across batch sizes and repeats; against the
  reference only within the tolerance rule (in-kernel normals equal the reference's to float32 rounding);
- onnxruntime (CPU EP: the network in ONNX Runtime, the reference loop around it), UNet: bit-identical
  across batch sizes (1 to 16), repeats and processes; against the reference only within the tolerance rule;
- the same command in two fresh processes writes identical bytes (reference and onnxruntime).
"""

import copy
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import ddim_fast as dd
from ddim_fast.models.analytic import GaussianEps
from tests.helpers import assert_close_to_reference

SCHED = dd.NoiseSchedule.linear(100, 1e-3, 0.05)
GSHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def shared(shared_tiny_unet):
    return shared_tiny_unet


def _chunks(eng, sizes, seed):
    """Samples 0 .. sum(sizes)-1 of `seed`, drawn in batches of the given sizes."""
    out, first = [], 0
    for b in sizes:
        out.append(eng.sample(b, seed=seed, first_index=first))
        first += b
    return torch.cat(out)


def _bitwise(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _truth(model, plan, n, shape, seed):
    """The float64 reference sampler (clamped as the Engine does), the tolerance rule's truth."""
    x_T = dd.rng.initial_noise(seed, (n, *shape)).double()
    return dd.sample(copy.deepcopy(model).double(), x_T, plan, seed=seed).clamp(-1, 1)


# -- the reference backend ---------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_reference_elementwise_network_is_bitwise_batch_invariant(eta):
    eng = dd.Engine(GaussianEps(SCHED), dd.SamplingPlan.build(SCHED, 6, eta=eta), backend="reference",
                    device="cpu", shape=GSHAPE)
    full = eng.sample(4, seed=3)
    assert _bitwise(_chunks(eng, [1, 1, 1, 1], 3), full) and _bitwise(_chunks(eng, [2, 2], 3), full)
    assert _bitwise(_chunks(eng, [3, 1], 3), full) and _bitwise(eng.sample(4, seed=3), full)  # repeat
    assert not torch.equal(eng.sample(4, seed=4), full)  # another seed is another image


def test_reference_unet_agrees_across_batch_sizes_to_float32_rounding(shared):
    model = dd.load_model(shared)
    eng = dd.Engine(model, dd.SamplingPlan.build(SCHED, 4, eta=0.5), backend="reference", device="cpu")
    full = eng.sample(4, seed=3)
    assert _bitwise(eng.sample(4, seed=3), full)  # a repeat is bit-identical
    for sizes in ([1, 1, 1, 1], [2, 2]):
        # NOTE measured: max difference 1.6e-6 (batch 1 vs 4) after 4 steps; convolutions round per batch size
        torch.testing.assert_close(_chunks(eng, sizes, 3), full, rtol=0, atol=1e-5)
    x1 = torch.cat([dd.rng.initial_noise(3, (1, 3, 16, 16), first_index=k) for k in range(4)])
    assert _bitwise(x1, dd.rng.initial_noise(3, (4, 3, 16, 16)))  # the start is bitwise the same


# -- triton (the interpreter on CPU) -----------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_triton_is_bitwise_batch_invariant_and_within_tolerance_of_reference(eta):
    pytest.importorskip("triton")
    model, plan = GaussianEps(SCHED), dd.SamplingPlan.build(SCHED, 6, eta=eta)
    eng = dd.Engine(model, plan, backend="triton", device="cpu", shape=GSHAPE)
    full = eng.sample(4, seed=3)  # x_T and z drawn in-kernel
    assert _bitwise(_chunks(eng, [1, 1, 2], 3), full) and _bitwise(eng.sample(4, seed=3), full)
    low = dd.Engine(model, plan, backend="reference", device="cpu", shape=GSHAPE).sample(4, seed=3)
    assert_close_to_reference(full, low, _truth(model, plan, 4, GSHAPE, 3), torch.float32, f"triton eta={eta}")


# -- onnxruntime (CPU EP) ----------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_onnxruntime_is_bitwise_batch_invariant_and_within_tolerance_of_reference(shared, eta):
    pytest.importorskip("onnxruntime")
    model, plan = dd.load_model(shared), dd.SamplingPlan.build(SCHED, 4, eta=eta)
    eng = dd.Engine(model, plan, backend="onnxruntime", device="cpu")
    full = eng.sample(16, seed=3)
    # NOTE measured on this CPU: bitwise at batch 1, 3, 4 and 16 (ONNX Runtime's convolutions do not change
    # their summation order with the batch size, unlike PyTorch's; the step is elementwise)
    assert _bitwise(_chunks(eng, [1] * 16, 3), full) and _bitwise(_chunks(eng, [4, 3, 1, 8], 3), full)
    assert _bitwise(eng.sample(16, seed=3), full)
    full = full[:4]
    low = dd.Engine(model, plan, backend="reference", device="cpu").sample(4, seed=3)
    assert_close_to_reference(full, low, _truth(model, plan, 4, (3, 16, 16), 3), torch.float32,
                              f"onnxruntime eta={eta}")


# -- across processes ----------------------------------------------------------------------------------
def _members(path):
    """Every member of an .npz, as bytes (the zip container itself carries write times)."""
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


@pytest.mark.parametrize("backend", ["reference", "onnxruntime"])
def test_same_command_in_two_fresh_processes_gives_identical_bytes(shared, backend, tmp_path):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    plan = dd.SamplingPlan.build(SCHED, 4, eta=0.5)
    eng = dd.Engine(dd.load_model(shared), plan, backend=backend, device="cpu")  # also fills the ONNX cache
    here = torch.cat([eng.sample(2, seed=5), eng.sample(1, seed=5, first_index=2)])  # the CLI's batches
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # DDIM_FAST_CACHE: the shared cache, set by `shared`
    args = ["sample", "--model", str(shared), "--backend", backend, "--steps", "4", "--eta", "0.5", "-n", "3",
            "--batch-size", "2", "--seed", "5", "--no-progress"]
    procs = [subprocess.Popen([sys.executable, "-m", "ddim_fast.cli", *args, "--out", str(tmp_path / f"{i}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
    a, b = _members(tmp_path / "0.npz"), _members(tmp_path / "1.npz")
    assert a.keys() == {"images.npy", "indices.npy", "meta.npy"} and a == b  # byte for byte
    images = np.load(tmp_path / "0.npz")["images"]
    assert np.array_equal(images.view(np.int32), here.numpy().view(np.int32))  # and the in-process run's bits
