"""`ddim-fast export`: the eps-model or the whole sampler to ONNX, checked in ONNX Runtime first."""

from __future__ import annotations

import time
from pathlib import Path

from ..onnx.export import EXPORT_DTYPES, check_onnx_path, check_opset, export_onnx, onnx_metadata, table_path
from ..onnx.runtime import import_onnx, import_ort
from ..plan import VARIANCES
from ..precision import DTYPES
from . import checks
from .checks import ModelFacts, check_with_model
from .common import (
    MULTISTEP_OPTIONS,
    Default,
    add_clip_option,
    add_multistep_options,
    add_plan_option,
    add_spacing_option,
    load,
    plan_for,
)

SAMPLER_OPTIONS = ("steps", "eta", "spacing", "variance", "clip_x0", "threshold",
                   *MULTISTEP_OPTIONS, "plan")  # --whole-sampler only


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
        add_plan_option(p)
        p.add_argument("--graph", default="auto", choices=("auto", "unrolled", "loop", "table"),
                       help="layout of the S steps; table: a Loop taking the plan's table and timesteps as inputs "
                            "(one file for any steps, spacing and eta of the same structure)")
        p.add_argument("--dtype", default="fp32", choices=tuple(EXPORT_DTYPES.values()), help="network precision")
        p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's)")
        p.add_argument("--no-validate", dest="validate", action="store_false",
                       help="skip the ONNX Runtime check against the reference")
        p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    @staticmethod
    def check(args):
        """Every argument before the model loads (cli/checks.py): the output, the options and the extras;
        then, from the model's config files, the number of steps."""
        out = check_onnx_path(args.out)  # an .onnx file in an existing, writable folder (export_onnx's rule)
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        if args.graph == "table" and table_path(out).exists() and not args.overwrite:
            raise FileExistsError(f"{table_path(out)} (the table written beside a table-input graph) already exists; "
                                  "pass --overwrite to replace it")
        given = [k for k in SAMPLER_OPTIONS
                 if getattr(args, k, None) is not None or (k == "clip_x0" and hasattr(args, k))]
        given += ["invert"] if args.invert else []
        if not args.whole_sampler and given:
            raise ValueError(f"--{given[0].replace('_', '-')} only applies to --whole-sampler; add --whole-sampler "
                             "or drop it")
        if args.graph == "table" and not args.whole_sampler:
            raise ValueError("--graph table only applies to --whole-sampler; add --whole-sampler or drop it")
        check_opset(args.opset)
        steps = None
        if args.whole_sampler:
            steps = Default(20) if args.steps is None else args.steps
            checks.steps(steps)
            eta, variance = 0.0 if args.eta is None else args.eta, args.variance or "ddim"
            checks.sampler_options(args, steps=steps, eta=eta, variance=variance)
            if args.invert and ((args.sampler or "ddim") != "ddim" or eta != 0.0 or variance != "ddim"):
                raise ValueError("--invert exports the DDIM encoder (the deterministic ODE): drop --sampler, --eta "
                                 "and --variance")
        import_onnx()  # the extras, before any work
        import_ort()
        check_with_model(args, ModelFacts.of_config(args.model), steps=steps, sampling=False)
        return steps

    @staticmethod
    def run(args) -> int:
        steps = Export.check(args)
        out = Path(args.out)
        model = load(args)
        check_with_model(args, ModelFacts.of_model(model), steps=steps, sampling=False)
        plan = None
        if args.whole_sampler:
            plan = plan_for(args, model, steps=steps,
                            eta=0.0 if args.eta is None else args.eta, variance=args.variance or "ddim")
            if args.invert:
                plan = plan.inverse()
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
        if meta.get("table_inputs"):
            print(f"wrote {table_path(out)}: this plan's coef and timesteps, to feed the graph without ddim-fast "
                  "(the metadata's `columns` say what each column is)")
        return 0
