"""`ddim-fast export`: the eps-model or the whole sampler to ONNX, checked in ONNX Runtime first."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..onnx.export import EXPORT_DTYPES, export_onnx, onnx_metadata
from ..onnx.runtime import import_onnx, import_ort
from ..plan import VARIANCES
from ..precision import DTYPES
from .common import MULTISTEP_OPTIONS, add_clip_option, add_multistep_options, add_spacing_option, load, plan_for

SAMPLER_OPTIONS = ("steps", "eta", "spacing", "variance", "clip_x0", "threshold",
                   *MULTISTEP_OPTIONS)  # --whole-sampler only


class Export:
    """`ddim-fast export`: writes an .onnx file whose metadata says what it holds."""

    @staticmethod
    def add_arguments(p):
        p.add_argument("--model", default="digits", help="checkpoint folder, official ckpt.pth, diffusers folder "
                       "or bundled name (default: digits)")
        p.add_argument("--out", required=True, help="the .onnx file to write")
        p.add_argument("--whole-sampler", action="store_true",
                       help="export the whole S-step sampler (x_T [, noise] -> x0) instead of the eps-model")
        p.add_argument("--invert", action="store_true",
                       help="with --whole-sampler: export the DDIM encoder x0 -> x_T")
        p.add_argument("--steps", type=int, default=None, help="sampling steps S (default: 20)")
        p.add_argument("--eta", type=float, default=None,
                       help="0 = DDIM (default), 1 = DDPM; > 0 adds a noise input")
        add_spacing_option(p)
        p.add_argument("--variance", default=None, choices=VARIANCES, help="'large' = the paper's sigma-hat")
        add_clip_option(p, "clip the x0 estimate to [-C, C], or 'none' (default: the model's own setting, else none)")
        p.add_argument("--threshold", type=float, default=None, metavar="P", help="dynamic thresholding quantile")
        add_multistep_options(p)
        p.add_argument("--graph", default="auto", choices=("auto", "unrolled", "loop", "table"),
                       help="layout of the S steps; table: a Loop taking the plan's table and timesteps as inputs "
                            "(one file for any steps, spacing and eta of the same structure)")
        p.add_argument("--dtype", default="fp32", choices=tuple(EXPORT_DTYPES.values()), help="network precision")
        p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's)")
        p.add_argument("--no-validate", dest="validate", action="store_false",
                       help="skip the ONNX Runtime check against the reference")
        p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    @staticmethod
    def run(args) -> int:
        out = Path(args.out)
        if out.suffix.lower() != ".onnx":
            raise ValueError(f"--out must name an .onnx file, got {out}")
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        parent = next((p for p in out.parents if p.exists()), Path("."))
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ValueError(f"cannot write {out}: {parent} is not a writable folder; choose another --out")
        given = [k for k in SAMPLER_OPTIONS
                 if getattr(args, k, None) is not None or (k == "clip_x0" and hasattr(args, k))]
        given += ["invert"] if args.invert else []
        if not args.whole_sampler and given:
            raise ValueError(f"--{given[0].replace('_', '-')} only applies to --whole-sampler; add --whole-sampler "
                             "or drop it")
        import_onnx()  # the extras, before any work
        import_ort()
        model = load(args)
        plan = None
        if args.whole_sampler:
            plan = plan_for(args, model, steps=20 if args.steps is None else args.steps,
                            eta=0.0 if args.eta is None else args.eta, variance=args.variance or "ddim")
            if args.invert:
                plan = plan.inverse()
        if args.graph == "table" and not args.whole_sampler:
            raise ValueError("--graph table only applies to --whole-sampler; add --whole-sampler or drop it")
        unroll = {"auto": None, "unrolled": True, "loop": False, "table": False}[args.graph]
        t0 = time.perf_counter()  # the stages of the export: the "ddim_fast" logger, on stderr (cli.main)
        export_onnx(model, out, plan, dtype=DTYPES[args.dtype], opset=args.opset, validate=args.validate,
                    unroll=unroll, table_inputs=args.graph == "table")
        meta = onnx_metadata(out)
        kind = "sampler" if plan is not None and plan.direction == "sample" else "DDIM encoder"
        table = meta.get("table_inputs") and meta["graph"] == "loop"
        steps = "any steps" if table else f"{plan.steps if plan else 0} steps"
        what = "eps-model" if plan is None else f"{kind}, {steps}, {meta['graph']}{' (table inputs)' if table else ''}"
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; {what}; {meta['dtype']}; opset {meta['opset']}"
              f"{'; validated against the reference' if args.validate else ''}) in {time.perf_counter() - t0:.1f} s")
        inputs = sorted(meta["inputs"].items(), key=lambda kv: kv[0] not in ("x_T", "x0"))  # the state first
        print("inputs: " + "; ".join(f"{k} {v}" for k, v in inputs))
        return 0
