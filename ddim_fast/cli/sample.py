"""The sampling sub-commands of `ddim-fast`: sample, encode, decode, interpolate (one class each).

Each prints what it did with timings and shows a progress bar on long work. `sample` into a
folder is restartable and torchrun-aware: image k of a seed is file k (k.png), every file is
written atomically, ranks take interleaved batches, a restart skips files already written, and
rank 0 writes manifest.json once every index is present.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from .. import distributed, images, rng
from ..checkpoint import load_model
from ..checks import sample_shape
from ..files import atomic_write_bytes
from ..sampling import slerp
from . import checks
from .checks import ModelFacts, check_with_model
from .common import (
    add_grid_options,
    add_guidance_options,
    add_model_options,
    add_plan_option,
    add_sampler_options,
    cond_for,
    describe,
    engine,
    load,
    params,
    parse_device,
    plan_for,
    plan_summary,
    progress,
)


# -- sample ------------------------------------------------------------------------------------
class Sample:
    """`ddim-fast sample`: images from seeds into a grid, an .npz or a folder (restartable, torchrun-aware)."""

    @staticmethod
    def add_arguments(p):
        add_model_options(p)
        add_sampler_options(p)
        add_plan_option(p)
        p.add_argument("--num", "-n", "--num-images", dest="num", type=int, default=16,
                       help="number of images (under torchrun write -n or --num-images: torchrun takes --num for "
                            "an abbreviation of its own --numa-binding and stops)")
        p.add_argument("--seed", type=int, default=0, help="image k of a seed is the same at any batch size")
        add_guidance_options(p)
        p.add_argument("--out", default="samples.png",
                       help=f"a grid image ({', '.join(images.GRID_FORMATS)}), an .npz, or a folder (one PNG per "
                            "image)")
        add_grid_options(p)

    @staticmethod
    def check(args) -> ModelFacts | None:
        """Every argument, before the model loads (cli/checks.py); the facts its config gave (or None)."""
        checks.at_least(args.num, 1, "--num")
        checks.seed(args.seed)
        checks.sampling(args, eta=args.eta, variance=args.variance)
        checks.conditioning(args)
        folder = images.output_kind(args.out) == "folder"
        if distributed.Dist.from_env().world > 1 and not folder:
            raise ValueError(f"distributed sampling writes a folder of PNGs: give --out DIR, not {args.out}")
        # a folder run may continue in the folder it finds (_check_folder_run decides, with the settings)
        images.check_output(args.out, args.overwrite or folder)
        checks.scale(args)
        facts = ModelFacts.of_config(args.model)
        check_with_model(args, facts, steps=args.steps)
        return facts

    @staticmethod
    def run(args):
        Sample.check(args)
        kind = images.output_kind(args.out)
        if distributed.Dist.from_env().world > 1 or kind == "folder":
            return _sample_folder(args)
        model = _load_checked(args, steps=args.steps)
        eng, model = engine(args, eta=args.eta, variance=args.variance, model=model, images=args.num)
        print(f"model {args.model} ({params(model)}), {plan_summary(eng.plan)}, backend {eng.backend} "
              f"({eng.backend_reason}), device {eng.device}")
        t0, out = time.perf_counter(), []
        try:
            with progress(args.num, args.progress, "sample") as bar:
                for lo in range(0, args.num, args.batch_size):
                    b = min(args.batch_size, args.num - lo)
                    out.append(eng.sample(b, seed=args.seed, first_index=lo, **cond_for(args, lo, b)).cpu())
                    bar.update(b)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"nothing was written ({args.out} is written at the end); to keep partial work, "
                                    "sample into a folder (--out DIR), which a rerun of the same command continues"
                                    ) from None
        dt = time.perf_counter() - t0
        imgs = torch.cat(out)
        path = images.save_images(imgs, args.out, overwrite=args.overwrite, scale=args.scale,
                                  meta=describe(args, eng, model) | {"seed": args.seed})
        print(f"sampled {args.num} images in {dt:.2f} s ({1000 * dt / args.num:.1f} ms/image) -> {path}")
        return 0


def _load_checked(args, *, steps=None, arrays=(), loader=None):
    """The model of --model, and the checks that need it run again on the loaded model (for formats
    whose config files said nothing: an official ckpt.pth), before any plan or Engine is made."""
    model = (loader or load)(args)
    check_with_model(args, ModelFacts.of_model(model), steps=steps, arrays=arrays)
    return model


# Settings that decide a folder run's images: a resume must use the same ones (backend, batch size,
# device and the number of processes may change: a seed gives the same image under any of them).
RUN_SETTINGS = ("weights", "plan", "seed", "num", "dtype", "class", "guidance")
_INDEXED_PNG = re.compile(r"\d{6}\.png")


def _run_settings(args, model, plan) -> dict:
    return {"model": str(args.model), "weights": _weights_digest(model), "plan": plan.describe(),
            "seed": args.seed, "num": args.num, "dtype": args.dtype,
            "class": getattr(args, "class_labels", None), "guidance": getattr(args, "guidance", None)}


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
    manifest = out / images.MANIFEST
    pngs = [p for p in out.iterdir() if _INDEXED_PNG.fullmatch(p.name)] if out.is_dir() else []
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
            raise FileExistsError(f"{out} is a finished run ({images.MANIFEST}); pass --overwrite or another --out")
        diff = _settings_diff(then.get("settings", {}), settings)
        if diff:
            raise ValueError(f"{out} holds an unfinished run made with other settings ({'; '.join(diff)}): rerun "
                             "with the folder's settings to finish it, pass --overwrite to start over, or choose "
                             "another --out")
        return False
    if pngs and not overwrite:
        raise FileExistsError(f"{out} holds {len(pngs)} image(s) but no {images.MANIFEST} recording how they were "
                              "made; pass --overwrite to start over, or choose another --out")
    return bool(pngs)


def _clear_folder_run(out: Path):
    """Remove what a previous run wrote: its numbered PNGs, half-written temporaries and manifest."""
    for p in out.iterdir():
        if _INDEXED_PNG.fullmatch(p.name) or (p.name.startswith(".") and p.name.endswith(".tmp")
                                              and ".png." in p.name):
            p.unlink(missing_ok=True)
    (out / images.MANIFEST).unlink(missing_ok=True)


def _sample_folder(args):
    """Restartable (and, under torchrun, distributed) sampling into a folder of PNGs. The run's
    settings are recorded in manifest.json before the first image; a rerun continues only with the
    same settings, and the manifest is marked complete once every image exists."""
    out = Path(args.out)  # the arguments were checked (Sample.check)
    dist, dev = distributed.Dist.from_env(), parse_device(args.device)
    if dist.world > 1:
        dist, dev = distributed.setup(dev)
    rank, world = dist.rank, dist.world
    manifest = out / images.MANIFEST
    try:
        model = _load_checked(args, steps=args.steps,
                              loader=load if rank == 0 else (lambda a: load_model(a.model)))
        plan = plan_for(args, model, eta=args.eta, variance=args.variance)
        settings = _run_settings(args, model, plan)
        clear = _check_folder_run(out, settings, args.overwrite)  # every rank decides the same
        distributed.barrier(dist)  # nobody changes the folder before every rank has read it
        if rank == 0:
            out.mkdir(exist_ok=True)  # the output folder itself, never the folders above it (checked)
            if clear:
                _clear_folder_run(out)
            if clear or not manifest.is_file():
                pending = {"complete": False, "settings": settings}
                atomic_write_bytes(manifest, json.dumps(pending, indent=1).encode())
        distributed.barrier(dist)
        eng, _ = engine(args, device=dev, model=model, plan=plan, images=-(-args.num // world))
        batches = list(range(0, args.num, args.batch_size))[rank::world]
        todo = [lo for lo in batches if not all((out / f"{i:06d}.png").exists()
                                               for i in range(lo, min(lo + args.batch_size, args.num)))]
        skipped = len(batches) - len(todo)
        if rank == 0:
            print(f"model {args.model}, {plan_summary(eng.plan)}, backend {eng.backend}, "
                  f"{world} process(es), {args.num} images into {out}")
        print(f"[rank {rank}] {len(todo)} batch(es) to sample, {skipped} already complete")
        t0, done = time.perf_counter(), 0
        try:
            with progress(sum(min(args.batch_size, args.num - lo) for lo in todo), args.progress and rank == 0,
                           f"rank {rank}") as bar:
                for lo in todo:
                    b = min(args.batch_size, args.num - lo)
                    imgs = eng.sample(b, seed=args.seed, first_index=lo, **cond_for(args, lo, b)).cpu()
                    images.save_images(imgs, out, overwrite=True, indices=range(lo, lo + b))
                    done += b
                    bar.update(b)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"the images written so far are kept in {out}; rerun the same command to "
                                    "continue where it stopped") from None
        dt = time.perf_counter() - t0
        print(f"[rank {rank}] sampled {done} images in {dt:.2f} s")
        distributed.barrier(dist)
        if rank == 0:
            missing = [i for i in range(args.num) if not (out / f"{i:06d}.png").exists()]
            if missing:
                raise ValueError(f"{len(missing)} image(s) missing after sampling (first: {missing[:5]}); rerun "
                                 "the same command to fill them in")
            for debris in out.glob(".*.png.*.tmp"):  # a killed earlier run's half-written files;
                debris.unlink(missing_ok=True)  # safe now: every rank is past the barrier
            meta = describe(args, eng, model) | {"seed": args.seed, "num": args.num, "world_size": world,
                                                   "files": "{index:06d}.png", "complete": True,
                                                   "settings": settings}
            atomic_write_bytes(manifest, json.dumps(meta, indent=1).encode())
            print(f"manifest -> {manifest}")
    finally:
        distributed.finish()
    return 0


# -- encode / decode / interpolate --------------------------------------------------------------
class Encode:
    """`ddim-fast encode`: images to x_T latents by DDIM inversion."""

    @staticmethod
    def add_arguments(p):
        add_model_options(p, steps=100)
        p.add_argument("--input", required=True, help="an image, a folder of images, or an .npz with 'images'")
        p.add_argument("--eps-at", default="current", choices=("current", "target"),
                       help="evaluate eps at the current timestep (the ODE) or the target one (diffusers)")
        p.add_argument("--out", default="latents.npz", help="an .npz with 'latents' (N, C, H, W)")

    @staticmethod
    def check(args):
        """Every argument before the model loads; returns (facts of its config or None, the images of an .npz
        --input or None)."""
        checks.sampling(args)
        if images.output_kind(args.out) != "npz":
            raise ValueError(f"encode writes latents to an .npz file, not {args.out}")
        images.check_output(args.out, args.overwrite)
        if Path(args.input).suffix.lower() == ".npz" and Path(args.input).exists():
            x0 = images.load_npz(args.input, "images")
        else:
            x0 = None
            images.image_files(args.input)  # present, and holding images
        facts = ModelFacts.of_config(args.model)
        check_with_model(args, facts, steps=args.steps, arrays=[] if x0 is None else [("images", args.input, x0)])
        return facts, x0

    @staticmethod
    def run(args):
        facts, x0 = Encode.check(args)
        changes = []
        names = None if x0 is None else [f"{i:06d}" for i in range(len(x0))]
        if x0 is None and facts is not None and facts.shape is not None:  # read (and fit) the images before the weights
            x0, names = images.load_images(args.input, facts.shape[0], facts.shape[1], changes=changes)
        model = _load_checked(args, steps=args.steps, arrays=[] if x0 is None else [("images", args.input, x0)])
        shape = sample_shape(model)
        if x0 is None:
            x0, names = images.load_images(args.input, shape[0], shape[1], changes=changes)
        if changes:  # say what was done to fit the model, which changes what the latents encode
            print(f"{len(changes)} image(s) adapted to the model's {'x'.join(map(str, shape))} input:")
            for line in changes[:5]:
                print(f"  {line}")
            if len(changes) > 5:
                print(f"  ... and {len(changes) - 5} more")
        eng, _ = engine(args, model=model, images=len(x0))
        t0, lat = time.perf_counter(), []
        with progress(len(x0), args.progress, "encode") as bar:
            for lo in range(0, len(x0), args.batch_size):
                lat.append(eng.invert(x0[lo : lo + args.batch_size], eps_at=args.eps_at).cpu())
                bar.update(len(lat[-1]))
        dt = time.perf_counter() - t0
        latents = torch.cat(lat)
        meta = describe(args, eng, model) | {"eps_at": args.eps_at, "names": names}
        _save_latents(args.out, latents, meta)
        print(f"encoded {len(latents)} image(s) with {eng.plan.steps} inversion steps in {dt:.2f} s -> {args.out}")
        return 0


class Decode:
    """`ddim-fast decode`: x_T latents (from encode) to images."""

    @staticmethod
    def add_arguments(p):
        add_model_options(p, steps=100)
        add_plan_option(p)
        add_guidance_options(p)
        p.add_argument("--input", required=True, help="an .npz with 'latents' (from encode)")
        p.add_argument("--out", default="decoded.png",
                       help="a grid image, an .npz, or a folder (one PNG per image, named as encode's inputs)")
        add_grid_options(p)

    @staticmethod
    def check(args):
        """Every argument before the model loads; returns the latents (read here: small next to a model)."""
        checks.sampling(args)
        checks.conditioning(args)
        images.check_output(args.out, args.overwrite)
        checks.scale(args)
        lat = images.load_npz(args.input, "latents")
        check_with_model(args, ModelFacts.of_config(args.model), steps=args.steps,
                         arrays=[("latents", args.input, lat)])
        return lat

    @staticmethod
    def run(args):
        lat = Decode.check(args)
        names = images.load_npz_meta(args.input).get("names")
        model = _load_checked(args, steps=args.steps, arrays=[("latents", args.input, lat)])
        eng, model = engine(args, model=model, images=len(lat))
        t0, imgs = time.perf_counter(), []
        with progress(len(lat), args.progress, "decode") as bar:
            for lo in range(0, len(lat), args.batch_size):
                b = len(lat[lo : lo + args.batch_size])
                imgs.append(eng(lat[lo : lo + args.batch_size], **cond_for(args, lo, b)).cpu())
                bar.update(len(imgs[-1]))
        imgs = torch.cat(imgs)
        dt = time.perf_counter() - t0
        keep = names if images.safe_names(names, len(imgs)) else None
        images.save_images(imgs, args.out, overwrite=args.overwrite, scale=args.scale, names=keep,
                           meta=describe(args, eng, model) | ({"names": keep} if keep else {}))
        print(f"decoded {len(imgs)} latent(s) with {eng.plan.steps} steps in {dt:.2f} s -> {args.out}")
        return 0


class Interpolate:
    """`ddim-fast interpolate`: slerp between two seeds or latents (Section 5.3), decoded to a strip."""

    @staticmethod
    def add_arguments(p):
        add_model_options(p, steps=50)
        add_plan_option(p)
        add_guidance_options(p)
        g = p.add_mutually_exclusive_group()
        g.add_argument("--seeds", type=int, nargs=2, metavar=("A", "B"), default=(0, 1),
                       help="interpolate between x_T of sample 0 of seed A and of seed B")
        g.add_argument("--latents", help="an .npz with 'latents': interpolate between its first two")
        p.add_argument("--num", type=int, default=9, help="frames, endpoints included")
        p.add_argument("--out", default="interpolation.png", help="the strip (a grid image), an .npz or a folder")
        add_grid_options(p)

    @staticmethod
    def check(args):
        """Every argument before the model loads; returns the --latents (read here) or None."""
        checks.at_least(args.num, 2, "--num", " (the two endpoints)")
        for value in args.seeds:
            checks.seed(value, "--seeds")
        checks.sampling(args)
        checks.conditioning(args)
        images.check_output(args.out, args.overwrite)
        checks.scale(args)
        lat = None
        if args.latents:
            lat = images.load_npz(args.latents, "latents")
            if len(lat) < 2:
                raise ValueError(f"{args.latents} holds {len(lat)} latent(s); interpolation needs two")
        check_with_model(args, ModelFacts.of_config(args.model), steps=args.steps,
                         arrays=[] if lat is None else [("latents", args.latents, lat)])
        return lat

    @staticmethod
    def run(args):
        lat = Interpolate.check(args)
        model = _load_checked(args, steps=args.steps, arrays=[] if lat is None else [("latents", args.latents, lat)])
        eng, model = engine(args, model=model, images=args.num)
        if lat is not None:
            z0, z1 = lat[0], lat[1]
        else:
            z0, z1 = (rng.initial_noise(s, (1, *eng.shape))[0] for s in args.seeds)
        z = slerp(z0, z1, torch.linspace(0, 1, args.num))  # (num, C, H, W): Section 5.3
        t0 = time.perf_counter()
        imgs = torch.cat([eng(z[lo : lo + args.batch_size], **cond_for(args, lo, len(z[lo : lo + args.batch_size])))
                          .cpu() for lo in range(0, len(z), args.batch_size)])
        dt = time.perf_counter() - t0
        images.save_images(imgs, args.out, overwrite=args.overwrite, nrow=args.num, scale=args.scale,
                           meta=describe(args, eng, model))
        print(f"decoded {args.num} slerp frames with {eng.plan.steps} steps in {dt:.2f} s -> {args.out}")
        return 0


# -- helpers ---------------------------------------------------------------------------------------
def _save_latents(out, latents, meta):
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, latents=latents.numpy(), meta=np.asarray(json.dumps(meta)))
    atomic_write_bytes(out, buf.getvalue())


def _weights_digest(model) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes, bytes): which weights made a run."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
