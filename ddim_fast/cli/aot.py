"""`ddim-fast aot`: compile every shipped Triton kernel configuration ahead of time for sm_80 / sm_90,
on a machine without a GPU, and report registers, shared memory and spills (ddim_fast.kernels.aot).

The kernel files import nothing of ddim_fast, so the UNet shapes they are compiled for are built
here and handed in: the GroupNorm inputs recorded from a forward pass (on the meta device: no
arithmetic) of every UNetConfig preset and every bundled model, and each one's sample size.
"""

from __future__ import annotations

import os
import sys

import torch

from ..checkpoint import bundled_configs
from ..checks import require
from ..models.unet import PRESETS, UNet, UNetConfig


class _Recorder:
    """Stands in for the UNet's ops (models/ops): records each GroupNorm input, computes nothing."""

    name = "recorder"

    def __init__(self):
        self.seen = []

    def group_norm(self, x, weight, bias, num_groups, eps, *, add=None, silu=False):
        self.seen.append((x.shape[1], x.shape[2] * x.shape[3], num_groups))  # (C, H*W, G)
        return x

    def attention(self, q, k, v):
        return q


def unet_shapes(config: UNetConfig) -> tuple[tuple, int]:
    """((C, H*W, groups) of every GroupNorm input of UNet(config), sorted; elements of one sample)."""
    with torch.device("meta"):
        net = UNet(config)
        rec = _Recorder()
        net.set_ops(rec)
        x = torch.empty(1, config.in_channels, config.resolution, config.resolution)  # (1, C, R, R)
        net(x, torch.zeros(1, dtype=torch.long))
    return tuple(sorted(set(rec.seen))), config.in_channels * config.resolution**2


def model_shapes() -> dict:
    """{name: unet_shapes} of every UNetConfig preset and bundled model ("bundled:NAME")."""
    configs = {name: UNetConfig.preset(name) for name in PRESETS}
    configs.update({f"bundled:{name}": cfg for name, cfg in bundled_configs().items()})
    return {name: unet_shapes(cfg) for name, cfg in configs.items()}


class Aot:
    """`ddim-fast aot`: the resource table; exit 1 on a compile error or a spill in a memory-bound kernel."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--cc", type=int, action="append", help="compute capability (repeatable); default 80 and 90")
        p.add_argument("--kernel", help="only kernels whose name starts with this")
        p.add_argument("--jobs", type=int, help="parallel compiles (default: CPU count)")
        p.add_argument("--json", help="also write the rows to this JSON file")

    @staticmethod
    def check(args) -> None:
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        if args.json is not None:
            from ..files import check_creatable

            check_creatable(args.json)

    @staticmethod
    def run(args) -> int:
        Aot.check(args)
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise ValueError("unset TRITON_INTERPRET: ahead-of-time compilation needs the real Triton compiler")
        require("triton", "gpu", "ahead-of-time compilation")
        import triton

        from ..files import atomic_write_json
        from ..kernels import aot

        models = tuple((name, aot.ModelShapes(gn, n)) for name, (gn, n) in model_shapes().items())
        rows = aot.report(models, tuple(args.cc or aot.CCS), args.kernel, args.jobs)
        print(aot.format_table(rows))
        bad = aot.failures(rows)
        if args.json:
            atomic_write_json(args.json, {"rows": rows, "failures": bad, "triton": triton.__version__})
        for line in bad:
            print("FAIL", line, file=sys.stderr)
        return 1 if bad else 0
