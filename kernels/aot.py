"""Ahead-of-time compilation of every shipped kernel configuration, for GPUs this machine lacks.

The interpreter (TRITON_INTERPRET=1) checks the numbers but forgives what only the real compiler
sees: type errors in constexpr branches, layouts, register pressure. Here each configuration the
launchers can pick for the shipped models is compiled with
`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))` for
sm_80 (A100) and sm_90 (H100) (PTX and a cubin, no GPU needed), and the cubin's resources are
read back with the `ptxas -v` that Triton itself uses: registers per thread, spill bytes, stack,
and Triton's shared memory. A spill in the step or GroupNorm kernel (memory-bound: a spill costs
bandwidth) is a failure; attention spills are reported.

    ddim-fast aot                              # the table for sm_80 and sm_90; exit 1 on a failure
    ddim-fast aot --cc 90 --kernel attention   # (or python -m ddim_fast.cli aot ...)

Which configurations: the step kernel in every constexpr combination (noise, clip mode, x0
output, non-finite flag) for an fp16 model output, and the heaviest one for fp32/bf16; the
dynamic-thresholding order statistics at each shipped model's sample size;
GroupNorm in each tile configuration its launcher picks for the GroupNorm shapes of the shipped
UNets (batch 1 and 64) with its heaviest flags, plus every flag, layout and dtype on the CIFAR-10
tile; attention for every head-dim class up to 512 in every dtype, with NCHW and channels_last
strides. Must run WITHOUT TRITON_INTERPRET=1 (with it, @triton.jit returns interpreter objects
that cannot be compiled).

The UNet shapes come from the caller as `models`: (name, ModelShapes) pairs. This file imports
nothing of ddim_fast (docs/DESIGN.md, Import rules), so the table is built there, from the network itself: `ddim-fast
aot` (ddim_fast/cli/aot.py) records the GroupNorm inputs of a forward pass of every UNetConfig
preset and bundled model and hands them in.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import attention as attn_mod
from . import ddim_step as step_mod
from . import group_norm as gn_mod

CCS = (80, 90)
NO_SPILL = ("ddim_step", "initial_noise", "group_norm", "group_norm_stats", "abs_order_stats")  # a spill fails
_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class ModelShapes:
    """What the launchers see of one UNet: the (C, H*W, groups) of its GroupNorm inputs, and the
    elements of one sample (the order-statistics kernel's row length)."""

    group_norm: tuple  # ((C, HW, G), ...)
    sample_numel: int


@dataclass(frozen=True)
class Config:
    """One kernel specialisation: what triton.compile needs, plus a readable label."""

    kernel: str
    label: str
    fn: object = field(repr=False)
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    num_warps: int = 4
    num_stages: int = 3  # Triton's default
    aligned: tuple = ()  # argument names known to be multiples of 16 (pointers: 16-byte aligned)


# -- the shipped configurations ------------------------------------------------------------------
def step_configs():
    names = ["X", "M", "COEF", "STEP", "SEED", "FIRST", "THRESH", "X0", "FLAG", "N", "lo", "hi", "HIST_PTR", "HSTRIDE"]
    out = []
    combos = [(n, c, w, f, 0) for n in (0, 1) for c in (0, 1, 2) for w in (0, 1) for f in (0, 1)]
    combos += [(n, c, 0, 1, 1) for n in (0, 1) for c in (0, 1, 2)]  # guided (CFG): the Engine's flag, no x0
    for m_dtype in (torch.float16, torch.float32, torch.bfloat16):
        for noise, clip, x0, check, guided in combos:
            if m_dtype != torch.float16 and (noise, clip, x0, check, guided) not in [
                    (0, 0, 0, 0, 0), (1, 2, 1, 1, 0), (0, 0, 0, 1, 1)]:
                continue
            types = ["*fp32", f"*{_TY[m_dtype]}", "*fp32", "*i32", "*i64", "*i64", "*fp32", "*fp32", "*i32",
                     "i32", "fp32", "fp32", "*fp32", "i32"]
            meta = dict(BLOCK=step_mod.BLOCK, NOISE=bool(noise), CLIP=clip, WRITE_X0=bool(x0), CHECK=bool(check),
                        HIST=0, NCOL=step_mod.NUM_COEF, GUIDED=bool(guided))
            label = f"noise={noise} clip={clip} x0={x0} flag={check} m={_TY[m_dtype]}" + (" cfg" if guided else "")
            extra = {"W": "*fp32"}
            out.append(_config("ddim_step", label, step_mod._ddim_step_kernel, names, types, meta,
                               step_mod.NUM_WARPS, aligned=("X", "M", "X0", "N"), extra=extra))
            # multistep plans (plms, dpmpp_*, unipc): K history buffers read and shifted in the same pass
            fp16_flagged = m_dtype == torch.float16 and check and not x0 and (noise, clip) in [(0, 0), (1, 0), (0, 2)]
            if not guided and (fp16_flagged or (noise, clip, x0, check) == (1, 2, 1, 1)):
                for hist in (1, 2, 3):
                    out.append(_config("ddim_step", f"{label} hist={hist}", step_mod._ddim_step_kernel, names, types,
                                       {**meta, "HIST": hist, "NCOL": step_mod.NUM_COEF_HIST}, step_mod.NUM_WARPS,
                                       aligned=("X", "M", "X0", "N", "HIST_PTR", "HSTRIDE"), extra=extra))
    return out


def initial_noise_configs():
    names, types = ["X", "SEED", "FIRST", "N"], ["*fp32", "*i64", "*i64", "i32"]
    return [_config("initial_noise", "x_T", step_mod._initial_noise_kernel, names, types,
                    dict(BLOCK=step_mod.BLOCK), step_mod.NUM_WARPS, aligned=("X", "N"))]


def order_stats_configs(models):
    """The dynamic-thresholding select at each shipped model's sample size (its loop bound is a
    constant, so each size is its own compile)."""
    names, types = ["A", "OUT", "N", "K_LO", "K_HI"], ["*fp32", "*fp32", "i32", "i32", "i32"]
    sizes = {}  # sample size -> the first model that has it
    for model, shapes in models:
        sizes.setdefault(shapes.sample_numel, model)
    out = []
    for n, model in sizes.items():
        block, chunks, warps = step_mod.select_config(n)
        out.append(_config("abs_order_stats", f"{model} n={n} block={block} chunks={chunks} w{warps}",
                           step_mod._abs_order_stats_kernel, names, types, dict(BLOCK=block, CHUNKS=chunks), warps,
                           aligned=("A", "OUT", "N")))
    return out


def group_norm_configs(models):
    names = ["X", "ADD", "W", "BIAS", "Y", "PART", "C", "HW", "CPG", "chunk", "eps", "stride_xb",
             "stride_xc", "stride_xp", "stride_yb", "stride_yc", "stride_yp", "stride_ab", "stride_ac"]
    stat_names = ["X", "ADD", "PART", "C", "HW", "CPG", "chunk", "stride_xb", "stride_xc", "stride_xp",
                  "stride_ab", "stride_ac"]
    tiles = {}  # (mode, BLOCK_C, BLOCK_P, warps) -> the first shape that picks it
    for model, shapes in models:
        for C, HW, G in sorted(set(shapes.group_norm)):
            for B in (1, 64):
                mode, bc, bp, split, warps = gn_mod._config(B, C, HW, C // G, torch.device("cpu"), None, None)
                tiles.setdefault((mode, bc, bp, warps), f"{model} C={C} HW={HW} B={B}")
    # every flag, layout and dtype on CIFAR-10's most common tile, the heaviest flags elsewhere
    base = gn_mod._config(1, 128, 32 * 32, 4, torch.device("cpu"), None, None)
    base_key = (base[0], base[1], base[2], base[4])
    out = []
    for (mode, bc, bp, warps), where in sorted(tiles.items()):
        variants = [(torch.float16, False, True, True)]
        if (mode, bc, bp, warps) == base_key:
            variants = [(dt, cl, True, True) for dt in _TY for cl in (False, True)]
            variants += [(torch.float16, False, add, silu) for add, silu in ((0, 0), (0, 1), (1, 0))]
        for dtype, channels_last, add, silu in variants:
            t = _TY[dtype]
            stride1 = ("stride_xc", "stride_yc") if channels_last else ("stride_xp", "stride_yp")
            types = [f"*{t}", "*fp32", "*fp32", "*fp32", f"*{t}", "*fp32"] + ["i32"] * 4 + ["fp32"] + ["i32"] * 8
            meta = dict(BLOCK_C=bc, BLOCK_P=bp, MODE=mode, BLOCK_S=gn_mod.MAX_SPLIT if mode == 2 else 1,
                        HAS_ADD=bool(add), SILU=bool(silu))
            meta.update({s: 1 for s in stride1})
            layout = "NHWC" if channels_last else "NCHW"
            label = (f"mode={mode} tile={bc}x{bp} w{warps} {t} {layout} add={int(add)} silu={int(silu)}"
                     f"  ({where})")
            aligned = ("X", "Y", "HW", "chunk", *names[11:])
            out.append(_config("group_norm", label, gn_mod._group_norm_kernel, names, types, meta, warps,
                               aligned))
        if mode == 2:
            for channels_last in (False, True):
                types = ["*fp16", "*fp32", "*fp32"] + ["i32"] * 9
                meta = dict(BLOCK_C=bc, BLOCK_P=bp, HAS_ADD=True)
                meta.update({"stride_xc": 1} if channels_last else {"stride_xp": 1})
                layout = "NHWC" if channels_last else "NCHW"
                out.append(_config("group_norm_stats", f"tile={bc}x{bp} w{warps} fp16 {layout} add=1  ({where})",
                                   gn_mod._group_norm_stats_kernel, stat_names, types, meta, warps,
                                   ("X", "HW", "chunk", *stat_names[7:])))
    return out


def attention_configs():
    names = ["Q", "K", "V", "O", "C", "N", "qk_scale"] + [
        f"stride_{t}{d}" for t in "qkvo" for d in "bcn"
    ]
    out = []
    heads = {}  # one kernel per distinct config: C itself is a runtime argument
    for C in (16, 32, 64, 128, 256, 512):
        for dtype in _TY:
            for channels_last in (False, True):
                if channels_last and dtype != torch.float16:
                    continue
                cfg = attn_mod.config(C, dtype)
                heads.setdefault((tuple(cfg.items()), dtype, channels_last), []).append(C)
    for (items, dtype, channels_last), cs in heads.items():
        cfg = dict(items)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        t = _TY[dtype]
        types = [f"*{t}"] * 4 + ["i32", "i32", "fp32"] + ["i32"] * 12
        # input strides: NCHW conv output (token stride 1) or channels_last (channel stride 1);
        # the output is always allocated (B, C, N) contiguous
        unit = "c" if channels_last else "n"
        meta = dict(cfg, **{f"stride_{x}{unit}": 1 for x in "qkv"}, stride_on=1)
        layout = "NHWC" if channels_last else "NCHW"
        label = (f"C={','.join(map(str, cs))} {t} {layout} M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} "
                 f"D{cfg['BLOCK_D']} DO{cfg['BLOCK_DO']} w{warps} s{stages}")
        aligned = ("Q", "K", "V", "O", "C", "N", *names[7:])  # typical C, N: multiples of 16
        out.append(_config("attention", label, attn_mod._attention_kernel, names, types, meta,
                           warps, aligned, stages))
    return out


def shipped_configs(models, kernel: str | None = None):
    """Every configuration for `models` ((name, ModelShapes) pairs), optionally only those of one
    kernel name (prefix match)."""
    cfgs = (step_configs() + initial_noise_configs() + order_stats_configs(models) + group_norm_configs(models)
            + attention_configs())
    return [c for c in cfgs if kernel is None or c.kernel.startswith(kernel)]


def _config(kernel, label, fn, names, types, meta, warps, aligned, stages=3, extra=None):
    """names/types: the typed runtime arguments, in the kernel's order; meta: the constexpr ones; extra:
    {name: type} of runtime arguments that follow constexprs (keyword arguments added later)."""
    extra = extra or {}
    if [a for a in fn.arg_names if a in set(names)] != names or \
            not set(fn.arg_names) <= set(names) | set(meta) | set(extra):
        raise RuntimeError(f"{kernel}: the AOT signature is out of date with the kernel's arguments "
                           f"{fn.arg_names}")
    given = {**dict(zip(names, types)), **(extra or {})}
    signature = {}
    for name in fn.arg_names:  # in the kernel's argument order
        if name in meta:
            signature[name] = "constexpr"
        elif name in given:
            signature[name] = given[name]
    return Config(kernel, label, fn, signature, dict(meta), warps, stages,
                  tuple(a for a in aligned if signature.get(a) != "constexpr"))


# -- compile and measure -------------------------------------------------------------------------
def compile_config(cfg: Config, cc: int) -> dict:
    """Compile one configuration for compute capability cc; return its resource row."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    names = list(cfg.fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in cfg.aligned}
    src = ASTSource(cfg.fn, cfg.signature, cfg.constexprs, attrs)
    row = dict(kernel=cfg.kernel, config=cfg.label, cc=cc, num_warps=cfg.num_warps)
    try:
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as e:  # report every failing config, not just the first
        return dict(row, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        cmd = [get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(cc)}",
               ptx, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return dict(row, **parse_ptxas(log), shared=compiled.metadata.shared)


def parse_ptxas(log: str) -> dict:
    """Registers, spill bytes and stack from a `ptxas -v` log."""
    def grab(pattern):
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"cannot read {pattern!r} from the ptxas log:\n{log}")
        return int(m.group(1))

    return dict(
        registers=grab(r"Used (\d+) registers"),
        spill_stores=grab(r"(\d+) bytes spill stores"),
        spill_loads=grab(r"(\d+) bytes spill loads"),
        stack=grab(r"(\d+) bytes stack frame"),
    )


@functools.cache
def _configs(models, kernel):
    return shipped_configs(models, kernel)


def _compile_indexed(args):  # a worker process rebuilds the configs (kernels do not pickle)
    models, kernel, index, cc = args
    return compile_config(_configs(models, kernel)[index], cc)


def report(models, ccs=CCS, kernel=None, jobs=None) -> list[dict]:
    """Compile every shipped configuration of `models` ((name, ModelShapes) pairs, a tuple) for every
    cc; rows in a stable order."""
    models = tuple(models)
    work = [(models, kernel, i, cc) for i in range(len(_configs(models, kernel))) for cc in ccs]
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    if jobs <= 1:
        return [_compile_indexed(w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_indexed, work))


def failures(rows) -> list[str]:
    """What fails the AOT tier: a compile error anywhere, a spill in a memory-bound kernel."""
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"{r['kernel']} [{r['config']}] sm_{r['cc']}: {r['error']}")
        elif r["kernel"] in NO_SPILL and (r["spill_stores"] or r["spill_loads"]):
            out.append(f"{r['kernel']} [{r['config']}] sm_{r['cc']}: spills {r['spill_stores']} B stored, "
                       f"{r['spill_loads']} B loaded")
    return out


def format_table(rows) -> str:
    head = f"{'kernel':<17} {'sm':>3} {'regs':>5} {'spill st/ld':>12} {'stack':>6} {'smem':>7}  config"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:<17} {r['cc']:>3} {'ERROR':>5}  {r['error']}  [{r['config']}]")
            continue
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"{r['kernel']:<17} {r['cc']:>3} {r['registers']:>5} {spill:>12} {r['stack']:>6} "
                     f"{r['shared']:>7}  {r['config']}")
    return "\n".join(lines)
