"""The sampling sub-commands of `ddim-fast`: sample, encode, decode, interpolate.

Each prints what it did with timings and shows a progress bar on long work. `sample` into a
folder is restartable and torchrun-aware: image k of a seed is file k (k.png), every file is
written atomically, ranks take interleaved batches, a restart skips files already written, and
rank 0 writes manifest.json once every index is present.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from . import images as io
from .checkpoint import load_model
from .engine import BACKENDS, Engine
from .plan import PREDICTIONS, VARIANCES, SamplingPlan
from .sampling import slerp
from .schedule import SPACINGS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# -- shared options ----------------------------------------------------------------------------
def _add_model_options(p, *, steps=20):
    p.add_argument("--model", default="digits", help="checkpoint folder, training run folder (its latest "
                   "checkpoint), official ckpt.pth, diffusers folder or bundled name")
    p.add_argument("--steps", type=int, default=steps, help="sampling steps S")
    p.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="timestep sub-sequence (default: the model's own, e.g. a diffusers scheduler's, else uniform)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: cuda_graph on CUDA, onnxruntime on a CPU when installed, else reference")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="network precision")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler call")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def clip_arg(text):
    """argparse type of --clip-x0: C > 0, or 'none' (no clipping, also over a model's own default)."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        c = float(text)
    except ValueError:
        c = float("nan")
    if not (c > 0 and c != float("inf")):
        raise argparse.ArgumentTypeError(f"--clip-x0 takes C > 0 (clip x0 to [-C, C]) or 'none', got {text!r}")
    return c


def _add_sampler_options(p):
    p.add_argument("--eta", type=float, default=0.0, help="0 = DDIM (deterministic), 1 = DDPM")
    p.add_argument("--variance", default="ddim", choices=VARIANCES,
                   help="'large' = the paper's sigma-hat (with --clip-x0 1: the official code's ddpm_noisy)")
    p.add_argument("--clip-x0", type=clip_arg, default=argparse.SUPPRESS, metavar="C",
                   help="clip the x0 estimate to [-C, C], or 'none' (default: the model's own setting, e.g. a "
                        "diffusers scheduler's clip_sample, else none)")


def _device(arg):
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(arg)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown --device {arg!r}; use auto, cpu, cuda or cuda:N") from None


def plan_for(args, model, **sampler):
    """The plan of a command: the model's own sampler settings (SamplingPlan.for_model), overridden by
    the options given on the command line (--spacing, --clip-x0) and `sampler` (eta, variance)."""
    if model.schedule is None:
        raise ValueError(f"{args.model} carries no noise schedule; convert it with `ddim-fast convert`")
    if model.prediction not in PREDICTIONS:
        raise ValueError(f"{args.model} has an unknown prediction type {model.prediction!r}")
    given = {}
    if getattr(args, "spacing", None) is not None:
        given["spacing"] = args.spacing
    if hasattr(args, "clip_x0"):  # absent unless given (argparse.SUPPRESS); 'none' gives None
        given["clip_x0"] = args.clip_x0
    return SamplingPlan.for_model(model, args.steps, **given, **sampler)


def _engine(args, *, eta=0.0, variance="ddim", device=None, model=None, plan=None):
    model = model if model is not None else _load(args)
    plan = plan if plan is not None else plan_for(args, model, eta=eta, variance=variance)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    eng = Engine(model, plan, backend=args.backend, device=device or _device(args.device), dtype=DTYPES[args.dtype])
    return eng, model


def _load(args):
    """load_model(--model), saying which checkpoint a training run folder gave and which sampler
    settings the model brings (a diffusers scheduler config)."""
    model = load_model(args.model)
    info = getattr(model, "checkpoint_info", {}) or {}
    if info.get("run"):
        print(f"{args.model} is a training run: loading its latest checkpoint {info['path']} "
              f"({'EMA' if info.get('ema') else 'raw'} weights)")
    own = {k: v for k, v in (getattr(model, "sampler_defaults", None) or {}).items() if k != "from"}
    if own:
        shown = ", ".join(f"{k}={v}" for k, v in own.items() if v is not None and not (k == "steps_offset" and v == 0))
        print(f"sampler settings from the model's scheduler config: {shown or 'the defaults'}"
              " (override with --spacing / --clip-x0)")
    return model


def _describe(args, eng, model):
    c = model.config
    return {
        "model": str(args.model),
        "config": c.to_dict() if hasattr(c, "to_dict") else None,
        "plan": eng.plan.describe(),
        "backend": eng.backend,
        "dtype": args.dtype,
    }


def _progress(total, enabled, desc):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", leave=False)


def _rank_world():
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# -- sample ------------------------------------------------------------------------------------
def _add_grid_options(p):
    p.add_argument("--scale", type=int, default=1, help="grid outputs: enlarge every pixel N x N")


def add_sample_arguments(p):
    _add_model_options(p)
    _add_sampler_options(p)
    p.add_argument("--num", "-n", "--num-images", dest="num", type=int, default=16,
                   help="number of images (under torchrun write -n or --num-images: torchrun takes --num for "
                        "an abbreviation of its own --numa-binding and stops)")
    p.add_argument("--seed", type=int, default=0, help="image k of a seed is the same at any batch size")
    p.add_argument("--out", default="samples.png",
                   help=f"a grid image ({', '.join(io.GRID_FORMATS)}), an .npz, or a folder (one PNG per image)")
    _add_grid_options(p)


def run_sample(args):
    rank, world = _rank_world()
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    kind = io.output_kind(args.out)
    if world > 1 or kind == "folder":
        return _sample_folder(args, rank, world)
    io.check_output(args.out, args.overwrite)
    _check_scale(args)
    eng, model = _engine(args, eta=args.eta, variance=args.variance)
    print(f"model {args.model} ({_params(model)}), {eng.plan.steps} steps eta={eng.plan.eta} "
          f"[{eng.plan.variance}], backend {eng.backend} ({eng.backend_reason}), device {eng.device}")
    t0, out = time.perf_counter(), []
    try:
        with _progress(args.num, args.progress, "sample") as bar:
            for lo in range(0, args.num, args.batch_size):
                b = min(args.batch_size, args.num - lo)
                out.append(eng.sample(b, seed=args.seed, first_index=lo).cpu())
                bar.update(b)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"nothing was written ({args.out} is written at the end); to keep partial work, "
                                "sample into a folder (--out DIR), which a rerun of the same command continues"
                                ) from None
    dt = time.perf_counter() - t0
    imgs = torch.cat(out)
    path = io.save_images(imgs, args.out, overwrite=args.overwrite, scale=args.scale,
                          meta=_describe(args, eng, model) | {"seed": args.seed})
    print(f"sampled {args.num} images in {dt:.2f} s ({1000 * dt / args.num:.1f} ms/image) -> {path}")
    return 0


# Settings that decide a folder run's images: a resume must use the same ones (backend, batch size,
# device and the number of processes may change: a seed gives the same image under any of them).
RUN_SETTINGS = ("weights", "plan", "seed", "num", "dtype")
_INDEXED_PNG = re.compile(r"\d{6}\.png")


def _run_settings(args, model, plan) -> dict:
    return {"model": str(args.model), "weights": _weights_digest(model), "plan": plan.describe(),
            "seed": args.seed, "num": args.num, "dtype": args.dtype}


def _settings_diff(then: dict, now: dict) -> list[str]:
    """'name: folder X, now Y' for every run setting that differs (plan fields one by one)."""
    diff = []
    for key in RUN_SETTINGS:
        a, b = then.get(key), now.get(key)
        if key == "plan" and isinstance(a, dict):
            fields = [f"{k}: {a.get(k)!r} in the folder, {v!r} now" for k, v in b.items()
                      if k != "timesteps" and a.get(k) != v]
            if not fields and a.get("timesteps") != b["timesteps"]:
                fields = ["the timesteps differ"]
            diff += fields
        elif key == "weights" and a != b:
            diff.append(f"the model's weights differ ({then.get('model')} in the folder, {now['model']} now)")
        elif a != b:
            diff.append(f"{key}: {a!r} in the folder, {b!r} now")
    return diff


def _check_folder_run(out: Path, settings: dict, overwrite: bool) -> bool:
    """Whether this run may use `out`: refuse a finished run or an unfinished one made with other
    settings (unless overwrite). Returns True when the folder must be cleared first (overwrite)."""
    manifest = out / io.MANIFEST
    images = [p for p in out.iterdir() if _INDEXED_PNG.fullmatch(p.name)] if out.is_dir() else []
    if manifest.is_file():
        try:
            then = json.loads(manifest.read_text())
            complete = then.get("complete", True)  # an older ddim-fast wrote the manifest only at the end
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{manifest} is damaged; pass --overwrite to start the run over, or choose another --out"
                             ) from None
        if overwrite:
            return True
        if complete:
            raise FileExistsError(f"{out} is a finished run ({io.MANIFEST}); pass --overwrite or another --out")
        diff = _settings_diff(then.get("settings", {}), settings)
        if diff:
            raise ValueError(f"{out} holds an unfinished run made with other settings ({'; '.join(diff)}): rerun "
                             "with the folder's settings to finish it, pass --overwrite to start over, or choose "
                             "another --out")
        return False
    if images and not overwrite:
        raise FileExistsError(f"{out} holds {len(images)} image(s) but no {io.MANIFEST} recording how they were made; "
                              "pass --overwrite to start over, or choose another --out")
    return bool(images)


def _clear_folder_run(out: Path):
    """Remove what a previous run wrote: its numbered PNGs, half-written temporaries and manifest."""
    for p in out.iterdir():
        if _INDEXED_PNG.fullmatch(p.name) or (p.name.startswith(".") and p.name.endswith(".tmp")
                                              and ".png." in p.name):
            p.unlink(missing_ok=True)
    (out / io.MANIFEST).unlink(missing_ok=True)


def _sample_folder(args, rank, world):
    """Restartable (and, under torchrun, distributed) sampling into a folder of PNGs. The run's
    settings are recorded in manifest.json before the first image; a rerun continues only with the
    same settings, and the manifest is marked complete once every image exists."""
    out = Path(args.out)
    if io.output_kind(out) != "folder":
        raise ValueError(f"distributed sampling writes a folder of PNGs: give --out DIR, not {out}")
    dist = world > 1
    device = _device(args.device)
    if dist:
        import torch.distributed as tdist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    barrier = tdist.barrier if dist else (lambda: None)
    manifest = out / io.MANIFEST
    try:
        io.check_output(out, overwrite=True)  # a writable folder (a restart fills the one it finds)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        model = _load(args) if rank == 0 else load_model(args.model)
        plan = plan_for(args, model, eta=args.eta, variance=args.variance)
        settings = _run_settings(args, model, plan)
        clear = _check_folder_run(out, settings, args.overwrite)  # every rank decides the same
        barrier()  # nobody changes the folder before every rank has read it
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if clear:
                _clear_folder_run(out)
            if clear or not manifest.is_file():
                pending = {"complete": False, "settings": settings}
                io.atomic_write_bytes(manifest, json.dumps(pending, indent=1).encode())
        barrier()
        eng, _ = _engine(args, device=device, model=model, plan=plan)
        batches = list(range(0, args.num, args.batch_size))[rank::world]
        todo = [lo for lo in batches if not all((out / f"{i:06d}.png").exists()
                                               for i in range(lo, min(lo + args.batch_size, args.num)))]
        skipped = len(batches) - len(todo)
        if rank == 0:
            print(f"model {args.model}, {eng.plan.steps} steps eta={eng.plan.eta}, backend {eng.backend}, "
                  f"{world} process(es), {args.num} images into {out}")
        print(f"[rank {rank}] {len(todo)} batch(es) to sample, {skipped} already complete")
        t0, done = time.perf_counter(), 0
        try:
            with _progress(sum(min(args.batch_size, args.num - lo) for lo in todo), args.progress and rank == 0,
                           f"rank {rank}") as bar:
                for lo in todo:
                    b = min(args.batch_size, args.num - lo)
                    imgs = eng.sample(b, seed=args.seed, first_index=lo).cpu()
                    io.save_images(imgs, out, overwrite=True, indices=range(lo, lo + b))
                    done += b
                    bar.update(b)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"the images written so far are kept in {out}; rerun the same command to "
                                    "continue where it stopped") from None
        dt = time.perf_counter() - t0
        print(f"[rank {rank}] sampled {done} images in {dt:.2f} s")
        barrier()
        if rank == 0:
            missing = [i for i in range(args.num) if not (out / f"{i:06d}.png").exists()]
            if missing:
                raise ValueError(f"{len(missing)} image(s) missing after sampling (first: {missing[:5]}); rerun "
                                 "the same command to fill them in")
            for debris in out.glob(".*.png.*.tmp"):  # a killed earlier run's half-written files;
                debris.unlink(missing_ok=True)  # safe now: every rank is past the barrier
            meta = _describe(args, eng, model) | {"seed": args.seed, "num": args.num, "world_size": world,
                                                   "files": "{index:06d}.png", "complete": True,
                                                   "settings": settings}
            io.atomic_write_bytes(manifest, json.dumps(meta, indent=1).encode())
            print(f"manifest -> {manifest}")
    finally:
        if dist and tdist.is_initialized():
            tdist.destroy_process_group()
    return 0


# -- encode / decode / interpolate --------------------------------------------------------------
def add_encode_arguments(p):
    _add_model_options(p, steps=100)
    p.add_argument("--input", required=True, help="an image, a folder of images, or an .npz with 'images'")
    p.add_argument("--eps-at", default="current", choices=("current", "target"),
                   help="evaluate eps at the current timestep (the ODE) or the target one (diffusers)")
    p.add_argument("--out", default="latents.npz", help="an .npz with 'latents' (N, C, H, W)")


def run_encode(args):
    if io.output_kind(args.out) != "npz":
        raise ValueError(f"encode writes latents to an .npz file, not {args.out}")
    io.check_output(args.out, args.overwrite)
    model = _load(args)
    c = model.config
    changes = []
    x0, names = io.load_images(args.input, c.in_channels, c.resolution, changes=changes)
    if changes:  # say what was done to fit the model, which changes what the latents encode
        print(f"{len(changes)} image(s) adapted to the model's {c.in_channels}x{c.resolution}x{c.resolution} input:")
        for line in changes[:5]:
            print(f"  {line}")
        if len(changes) > 5:
            print(f"  ... and {len(changes) - 5} more")
    eng, _ = _engine(args, model=model)
    t0, lat = time.perf_counter(), []
    with _progress(len(x0), args.progress, "encode") as bar:
        for lo in range(0, len(x0), args.batch_size):
            lat.append(eng.invert(x0[lo : lo + args.batch_size], eps_at=args.eps_at).cpu())
            bar.update(len(lat[-1]))
    dt = time.perf_counter() - t0
    latents = torch.cat(lat)
    meta = _describe(args, eng, model) | {"eps_at": args.eps_at, "names": names}
    _save_latents(args.out, latents, meta)
    print(f"encoded {len(latents)} image(s) with {eng.plan.steps} inversion steps in {dt:.2f} s -> {args.out}")
    return 0


def add_decode_arguments(p):
    _add_model_options(p, steps=100)
    p.add_argument("--input", required=True, help="an .npz with 'latents' (from encode)")
    p.add_argument("--out", default="decoded.png",
                   help="a grid image, an .npz, or a folder (one PNG per image, named as encode's inputs)")
    _add_grid_options(p)


def run_decode(args):
    io.check_output(args.out, args.overwrite)
    _check_scale(args)
    lat = io.load_npz(args.input, "latents")
    names = io.load_npz_meta(args.input).get("names")
    eng, model = _engine(args)
    t0, imgs = time.perf_counter(), []
    with _progress(len(lat), args.progress, "decode") as bar:
        for lo in range(0, len(lat), args.batch_size):
            imgs.append(eng(lat[lo : lo + args.batch_size]).cpu())
            bar.update(len(imgs[-1]))
    imgs = torch.cat(imgs)
    dt = time.perf_counter() - t0
    keep = names if io.safe_names(names, len(imgs)) else None
    io.save_images(imgs, args.out, overwrite=args.overwrite, scale=args.scale, names=keep,
                   meta=_describe(args, eng, model) | ({"names": keep} if keep else {}))
    print(f"decoded {len(imgs)} latent(s) with {eng.plan.steps} steps in {dt:.2f} s -> {args.out}")
    return 0


def add_interpolate_arguments(p):
    _add_model_options(p, steps=50)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seeds", type=int, nargs=2, metavar=("A", "B"), default=(0, 1),
                   help="interpolate between x_T of sample 0 of seed A and of seed B")
    g.add_argument("--latents", help="an .npz with 'latents': interpolate between its first two")
    p.add_argument("--num", type=int, default=9, help="frames, endpoints included")
    p.add_argument("--out", default="interpolation.png", help="the strip (a grid image), an .npz or a folder")
    _add_grid_options(p)


def run_interpolate(args):
    from . import rng

    if args.num < 2:
        raise ValueError(f"--num must be >= 2 (the two endpoints), got {args.num}")
    io.check_output(args.out, args.overwrite)
    _check_scale(args)
    eng, model = _engine(args)
    if args.latents:
        lat = io.load_npz(args.latents, "latents")
        if len(lat) < 2:
            raise ValueError(f"{args.latents} holds {len(lat)} latent(s); interpolation needs two")
        z0, z1 = lat[0], lat[1]
    else:
        z0, z1 = (rng.initial_noise(s, (1, *eng.shape))[0] for s in args.seeds)
    z = slerp(z0, z1, torch.linspace(0, 1, args.num))  # (num, C, H, W): Section 5.3
    t0 = time.perf_counter()
    imgs = torch.cat([eng(z[lo : lo + args.batch_size]).cpu() for lo in range(0, len(z), args.batch_size)])
    dt = time.perf_counter() - t0
    io.save_images(imgs, args.out, overwrite=args.overwrite, nrow=args.num, scale=args.scale,
                   meta=_describe(args, eng, model))
    print(f"decoded {args.num} slerp frames with {eng.plan.steps} steps in {dt:.2f} s -> {args.out}")
    return 0


def _check_scale(args):
    if not 1 <= args.scale <= 64:
        raise ValueError(f"--scale must be in [1, 64], got {args.scale}")


# -- bench -----------------------------------------------------------------------------------------
BENCHMARKS = {
    "speedup_vs_ddpm": "DDPM-1000 against DDIM-S wall clock per backend (the paper's Figure 4)",
    "paper_tables": "Tables 1 and 2 of the paper on the bundled digits model",
    "bench_cpu_backends": "per-sample latency of the CPU backends (and diffusers, if installed)",
    "bench_kernels": "Triton kernel bandwidth and attention against SDPA (GPU)",
    "gpu_suite": "the GPU test tier plus every GPU timing (GPU)",
}


def add_bench_arguments(p):
    p.add_argument("name", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the script (try: NAME --help)")


def run_bench(args):
    import importlib

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / f"{args.name}.py").is_file():
        raise FileNotFoundError("the benchmarks ship with the source tree, not the wheel: run from a checkout "
                                "(git clone ...; pip install -e .)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"benchmarks.{args.name}")
    return module.main(args.args)


# -- helpers ---------------------------------------------------------------------------------------
def _save_latents(out, latents, meta):
    import io as _io

    import numpy as np

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    buf = _io.BytesIO()
    np.savez(buf, latents=latents.numpy(), meta=np.asarray(json.dumps(meta)))
    io.atomic_write_bytes(out, buf.getvalue())


def _weights_digest(model) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes, bytes): which weights made a run."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _params(model):
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M params"

