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

from .. import distributed, rng
from .. import images as io
from ..checkpoint import load_model
from ..files import atomic_write_bytes
from ..sampling import slerp
from .common import (
    add_grid_options,
    add_guidance_options,
    add_model_options,
    add_plan_option,
    add_sampler_options,
    check_scale,
    cond_for,
    describe,
    engine,
    load,
    params,
    parse_device,
    plan_for,
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
                       help=f"a grid image ({', '.join(io.GRID_FORMATS)}), an .npz, or a folder (one PNG per image)")
        add_grid_options(p)

    @staticmethod
    def run(args):
        if args.num < 1:
            raise ValueError(f"--num must be >= 1, got {args.num}")
        kind = io.output_kind(args.out)
        if distributed.Dist.from_env().world > 1 or kind == "folder":
            return _sample_folder(args)
        io.check_output(args.out, args.overwrite)
        check_scale(args)
        eng, model = engine(args, eta=args.eta, variance=args.variance, images=args.num)
        print(f"model {args.model} ({params(model)}), {eng.plan.steps} steps eta={eng.plan.eta} "
              f"[{eng.plan.variance}], backend {eng.backend} ({eng.backend_reason}), device {eng.device}")
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
        path = io.save_images(imgs, args.out, overwrite=args.overwrite, scale=args.scale,
                              meta=describe(args, eng, model) | {"seed": args.seed})
        print(f"sampled {args.num} images in {dt:.2f} s ({1000 * dt / args.num:.1f} ms/image) -> {path}")
        return 0


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


def _sample_folder(args):
    """Restartable (and, under torchrun, distributed) sampling into a folder of PNGs. The run's
    settings are recorded in manifest.json before the first image; a rerun continues only with the
    same settings, and the manifest is marked complete once every image exists."""
    out = Path(args.out)
    if io.output_kind(out) != "folder":
        raise ValueError(f"distributed sampling writes a folder of PNGs: give --out DIR, not {out}")
    dist, dev = distributed.Dist.from_env(), parse_device(args.device)
    if dist.world > 1:
        dist, dev = distributed.setup(dev)
    rank, world = dist.rank, dist.world
    manifest = out / io.MANIFEST
    try:
        io.check_output(out, overwrite=True)  # a writable folder (a restart fills the one it finds)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        model = load(args) if rank == 0 else load_model(args.model)
        plan = plan_for(args, model, eta=args.eta, variance=args.variance)
        settings = _run_settings(args, model, plan)
        clear = _check_folder_run(out, settings, args.overwrite)  # every rank decides the same
        distributed.barrier(dist)  # nobody changes the folder before every rank has read it
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
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
            print(f"model {args.model}, {eng.plan.steps} steps eta={eng.plan.eta}, backend {eng.backend}, "
                  f"{world} process(es), {args.num} images into {out}")
        print(f"[rank {rank}] {len(todo)} batch(es) to sample, {skipped} already complete")
        t0, done = time.perf_counter(), 0
        try:
            with progress(sum(min(args.batch_size, args.num - lo) for lo in todo), args.progress and rank == 0,
                           f"rank {rank}") as bar:
                for lo in todo:
                    b = min(args.batch_size, args.num - lo)
                    imgs = eng.sample(b, seed=args.seed, first_index=lo, **cond_for(args, lo, b)).cpu()
                    io.save_images(imgs, out, overwrite=True, indices=range(lo, lo + b))
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
    def run(args):
        if io.output_kind(args.out) != "npz":
            raise ValueError(f"encode writes latents to an .npz file, not {args.out}")
        io.check_output(args.out, args.overwrite)
        model = load(args)
        c = model.config
        changes = []
        x0, names = io.load_images(args.input, c.in_channels, c.resolution, changes=changes)
        if changes:  # say what was done to fit the model, which changes what the latents encode
            size = f"{c.in_channels}x{c.resolution}x{c.resolution}"
            print(f"{len(changes)} image(s) adapted to the model's {size} input:")
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
    def run(args):
        io.check_output(args.out, args.overwrite)
        check_scale(args)
        lat = io.load_npz(args.input, "latents")
        names = io.load_npz_meta(args.input).get("names")
        eng, model = engine(args, images=len(lat))
        t0, imgs = time.perf_counter(), []
        with progress(len(lat), args.progress, "decode") as bar:
            for lo in range(0, len(lat), args.batch_size):
                b = len(lat[lo : lo + args.batch_size])
                imgs.append(eng(lat[lo : lo + args.batch_size], **cond_for(args, lo, b)).cpu())
                bar.update(len(imgs[-1]))
        imgs = torch.cat(imgs)
        dt = time.perf_counter() - t0
        keep = names if io.safe_names(names, len(imgs)) else None
        io.save_images(imgs, args.out, overwrite=args.overwrite, scale=args.scale, names=keep,
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
    def run(args):
        if args.num < 2:
            raise ValueError(f"--num must be >= 2 (the two endpoints), got {args.num}")
        io.check_output(args.out, args.overwrite)
        check_scale(args)
        eng, model = engine(args, images=args.num)
        if args.latents:
            lat = io.load_npz(args.latents, "latents")
            if len(lat) < 2:
                raise ValueError(f"{args.latents} holds {len(lat)} latent(s); interpolation needs two")
            z0, z1 = lat[0], lat[1]
        else:
            z0, z1 = (rng.initial_noise(s, (1, *eng.shape))[0] for s in args.seeds)
        z = slerp(z0, z1, torch.linspace(0, 1, args.num))  # (num, C, H, W): Section 5.3
        t0 = time.perf_counter()
        imgs = torch.cat([eng(z[lo : lo + args.batch_size], **cond_for(args, lo, len(z[lo : lo + args.batch_size])))
                          .cpu() for lo in range(0, len(z), args.batch_size)])
        dt = time.perf_counter() - t0
        io.save_images(imgs, args.out, overwrite=args.overwrite, nrow=args.num, scale=args.scale,
                       meta=describe(args, eng, model))
        print(f"decoded {args.num} slerp frames with {eng.plan.steps} steps in {dt:.2f} s -> {args.out}")
        return 0


# -- helpers ---------------------------------------------------------------------------------------
def _save_latents(out, latents, meta):
    import io as _io

    import numpy as np

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    buf = _io.BytesIO()
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
