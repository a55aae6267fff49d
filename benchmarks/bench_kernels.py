"""Fused Triton kernels on a GPU: achieved bandwidth and attention against PyTorch's SDPA.

    python -m benchmarks.bench_kernels            # needs a CUDA GPU; about a minute

Measures, with triton.testing.do_bench (median of CUDA-event-timed repeats):
  1. a device-to-device copy (the bandwidth ceiling: bytes read + bytes written);
  2. the fused step kernel (ddim_step) at CIFAR-10 and LSUN batch sizes: achieved bandwidth as a
     % of that copy (goal >= 80 %), for eta = 0, eta > 0 (in-kernel noise) and x0 clipping;
     its baseline is the reference update (ddim_fast.sampling.step) in eager PyTorch;
  3. GroupNorm + time-embedding add + SiLU at the DDPM UNets' shapes, NCHW and channels_last:
     % of copy bandwidth (counting one read and one write of the activation), against the
     reference ops (ddim_fast.models.ops.ReferenceOps);
  4. attention at 256 tokens (16x16), head_dim 256 and 512, against
     torch.nn.functional.scaled_dot_product_attention given its preferred (B, 1, N, C) layout
     (goal: at least as fast) and against the reference ops.
Prints a table and writes benchmarks/results/kernels-<gpu>-<date>.json.

Each measurement is a separate case (`cases()`), so benchmarks/gpu_suite.py can run them one at
a time inside its budget, and its CPU dry run can run them at tiny sizes with another timer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info, result_path, table, write_json
from ddim_fast.checks import require

# (label, shape) of each case; "dry" is for benchmarks/gpu_suite.py --dry-run (CPU interpreter)
SIZES = {
    "full": dict(
        copy_bytes=1 << 30,
        step=[("cifar10 B=256", (256, 3, 32, 32)), ("lsun B=16", (16, 3, 256, 256))],
        group_norm=[("cifar10 B=128", (128, 128, 32, 32)), ("celeba B=64", (64, 128, 64, 64)),
                    ("celeba B=64 C=512", (64, 512, 8, 8)), ("lsun B=4", (4, 128, 256, 256)),
                    ("lsun B=1", (1, 128, 256, 256))],
        attention=[(1, 256, 256), (16, 256, 256), (1, 512, 256), (16, 512, 256)],  # (B, C, N)
    ),
    "dry": dict(
        copy_bytes=1 << 20,
        step=[("tiny B=2", (2, 3, 8, 8))],
        group_norm=[("tiny B=1", (1, 32, 2, 3))],
        attention=[(2, 16, 16)],
    ),
}
COLUMNS = ["kernel", "case", "ms", "baseline_ms", "speedup", "GBs", "pct_copy", "reference_ms"]


def do_bench_ms(fn, rep_ms=200):
    """Median ms of fn over CUDA-event-timed repeats (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


@dataclass(frozen=True)
class Case:
    """One measurement: run(copy_GBs) -> a row of COLUMNS (copy_GBs is the copy's bandwidth)."""

    kernel: str
    label: str
    run: object


def copy_bandwidth(nbytes=1 << 30, device="cuda", bench=do_bench_ms):
    """GB/s of dst.copy_(src): nbytes read + nbytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def _step_case(name, shape, vname, kw, noisy, device, bench, copy_gbs):
    from ddim_fast import SamplingPlan
    from ddim_fast.kernels.ddim_step import ddim_step
    from ddim_fast.sampling import step as reference_step
    from ddim_fast.schedule import NoiseSchedule

    plan = SamplingPlan.build(NoiseSchedule.linear(1000, 1e-4, 0.02), steps=50, **kw)
    p = plan.to(device)
    x = torch.randn(shape, device=device)
    m = torch.randn(shape, device=device, dtype=torch.float16)
    step_t = torch.tensor([10], dtype=torch.int32, device=device)
    seed = torch.tensor([0], dtype=torch.int64, device=device) if noisy else None
    threshold = (plan.threshold, plan.threshold_max) if plan.threshold is not None else None
    ms = bench(partial(ddim_step, x, m, p.coef, step_t, seed=seed, clip=plan.clip_x0, threshold=threshold))
    z = torch.randn_like(x) if noisy else None
    ref_ms = bench(partial(reference_step, x, m.float(), p.coef[10], plan, z))
    nbytes = x.numel() * (4 + 2 + 4)  # read x (fp32) and m (fp16), write x
    gbs = nbytes / ms / 1e6
    return dict(kernel="ddim_step", case=f"{name} {vname}", ms=ms, baseline_ms=ref_ms, speedup=ref_ms / ms, GBs=gbs,
                pct_copy=100 * gbs / copy_gbs)


def _group_norm_case(name, shape, channels_last, device, bench, copy_gbs):
    from ddim_fast.kernels.group_norm import group_norm
    from ddim_fast.models.ops import ReferenceOps

    x = torch.randn(shape, device=device, dtype=torch.float16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w, b = torch.randn(C, device=device), torch.randn(C, device=device)
    add = torch.randn(shape[0], C, device=device, dtype=torch.float16)
    ms = bench(partial(group_norm, x, w, b, 32, 1e-6, add=add, silu=True))
    ref_ms = bench(partial(ReferenceOps.group_norm, x, w, b, 32, 1e-6, add=add, silu=True))
    gbs = 2 * x.numel() * x.element_size() / ms / 1e6
    layout = "NHWC" if channels_last else "NCHW"
    return dict(kernel="group_norm", case=f"{name} {layout} fp16 add+silu", ms=ms, baseline_ms=ref_ms,
                speedup=ref_ms / ms, GBs=gbs, pct_copy=100 * gbs / copy_gbs)


def _attention_case(B, C, N, device, bench, copy_gbs):
    from ddim_fast.kernels.attention import attention
    from ddim_fast.models.ops import ReferenceOps

    q, k, v = (torch.randn(B, C, N, device=device, dtype=torch.float16) for _ in range(3))
    ms = bench(partial(attention, q, k, v))
    # SDPA in its preferred layout (B, heads=1, N, C), prepared outside the timing
    qs, ks, vs = (t.transpose(1, 2).unsqueeze(1).contiguous() for t in (q, k, v))
    sdpa_ms = bench(partial(F.scaled_dot_product_attention, qs, ks, vs))
    ref_ms = bench(partial(ReferenceOps.attention, q, k, v))
    return dict(kernel="attention", case=f"B={B} N={N} C={C} fp16", ms=ms, baseline_ms=sdpa_ms,
                speedup=sdpa_ms / ms, reference_ms=ref_ms)


def cases(sizes="full", device="cuda", bench=do_bench_ms) -> list[Case]:
    """Every kernel measurement at `sizes` ("full" or "dry"), in order, none run yet."""
    spec = SIZES[sizes]
    out = []
    variants = [("eta=0", dict(eta=0.0), False), ("eta=1 noise", dict(eta=1.0), True),
                ("eta=0 clip", dict(eta=0.0, clip_x0=1.0), False),
                ("eta=0 threshold", dict(eta=0.0, threshold=0.995, threshold_max=2.0), False)]
    for name, shape in spec["step"]:
        for vname, kw, noisy in variants:
            out.append(Case("ddim_step", f"{name} {vname}",
                            partial(_step_case, name, shape, vname, kw, noisy, device, bench)))
    for name, shape in spec["group_norm"]:
        for channels_last in (False, True):
            out.append(Case("group_norm", f"{name} {'NHWC' if channels_last else 'NCHW'}",
                            partial(_group_norm_case, name, shape, channels_last, device, bench)))
    for B, C, N in spec["attention"]:
        out.append(Case("attention", f"B={B} N={N} C={C}", partial(_attention_case, B, C, N, device, bench)))
    return out


def main(argv=None) -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU: the Triton kernels only run in the (slow) interpreter "
              "on a CPU, which says nothing about their speed. Nothing was measured.", file=sys.stderr)
        return 1
    require("triton", "gpu", "bench_kernels")
    info = machine_info()
    copy_gbs = copy_bandwidth()
    rows = [case.run(copy_gbs) for case in cases()]
    print(f"{info['gpu']}: device-to-device copy {copy_gbs:.0f} GB/s (read + write)\n")
    print("baseline: the eager reference (step, GroupNorm) or SDPA (attention); speedup = baseline / kernel")
    print(table(rows, COLUMNS))
    path = write_json(result_path("kernels", info), dict(machine=info, copy_GBs=copy_gbs, rows=rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
