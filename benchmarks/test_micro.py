"""pytest-benchmark microbenchmarks: plan building, one UNet forward per backend, one step.

    pytest benchmarks/ --benchmark-only                  # not part of the test suite (testpaths)
    pytest benchmarks/ --benchmark-json=benchmarks/results/micro.json

Backends a machine lacks are skipped with the reason. The CIFAR-10 UNet has random weights
(speed does not depend on them); batch 1 and 16.
"""

import copy

import pytest
import torch

import ddim_fast as dd
from ddim_fast.sampling import step

CUDA = torch.cuda.is_available()
SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)


@pytest.fixture(scope="module")
def cifar():
    torch.manual_seed(0)
    m = dd.UNet(dd.UNetConfig.cifar10()).eval()
    m.schedule = SCHED
    return m


@pytest.mark.parametrize("steps", [50, 1000])
def test_plan_build(benchmark, steps):
    plan = benchmark(dd.SamplingPlan.build, SCHED, steps, eta=0.5)
    assert plan.steps == steps


def _inputs(batch, device):
    x = torch.randn(batch, 3, 32, 32, device=device)
    return x, torch.full((batch,), 500, device=device)


@pytest.mark.parametrize("batch", [1, 16])
def test_unet_forward_reference(benchmark, cifar, batch):
    device = "cuda" if CUDA else "cpu"
    net = copy.deepcopy(cifar).to(device)
    x, t = _inputs(batch, device)

    def run():
        with torch.no_grad():
            out = net(x, t)
        if CUDA:
            torch.cuda.synchronize()
        return out

    assert benchmark(run).shape == x.shape


@pytest.mark.parametrize("batch", [1, 16])
def test_unet_forward_onnxruntime(benchmark, cifar, batch, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from ddim_fast.onnx import OrtRunner, export_cached

    path = export_cached(cifar)
    runner = OrtRunner(path, device="cuda" if CUDA else "cpu")
    x, t = _inputs(batch, "cuda" if CUDA else "cpu")
    assert benchmark(lambda: runner(x=x, t=t)).shape == x.shape


@pytest.mark.skipif(not CUDA, reason="Triton kernels need a CUDA device for timing")
@pytest.mark.parametrize("batch", [1, 16])
def test_unet_forward_triton(benchmark, cifar, batch):
    net = copy.deepcopy(cifar).cuda().half().set_ops("triton")
    x, t = _inputs(batch, "cuda")

    def run():
        with torch.no_grad():
            out = net(x.half(), t)
        torch.cuda.synchronize()
        return out

    assert benchmark(run).shape == x.shape


def test_sampler_step_reference(benchmark):
    plan = dd.SamplingPlan.build(SCHED, 50, eta=0.5, clip_x0=1.0)
    device = "cuda" if CUDA else "cpu"
    x, m, z = (torch.randn(16, 3, 32, 32, device=device) for _ in range(3))
    coef = plan.coef.to(device, torch.float32)
    out = benchmark(lambda: step(x, m, coef[10], plan, z)[0])
    assert out.shape == x.shape


@pytest.mark.skipif(not CUDA, reason="Triton kernels need a CUDA device for timing")
def test_sampler_step_triton(benchmark):
    from ddim_fast.kernels.ddim_step import ddim_step

    plan = dd.SamplingPlan.build(SCHED, 50, eta=0.5, clip_x0=1.0).to("cuda")
    x, m = torch.randn(16, 3, 32, 32, device="cuda"), torch.randn(16, 3, 32, 32, device="cuda").half()
    step_t = torch.tensor([10], dtype=torch.int32, device="cuda")
    seed_t = torch.tensor([0], dtype=torch.int64, device="cuda")

    def run():
        ddim_step(x, m, plan.coef, step_t, seed=seed_t, clip=plan.clip_x0)
        torch.cuda.synchronize()

    benchmark(run)
