"""The ddim-fast checkpoint format, and `load_model` for every supported format.

A checkpoint is a folder:
    config.json         {"format": "ddim-fast", "version": 1, "model": UNetConfig.to_dict(),
                         "schedule": NoiseSchedule.to_dict(), "prediction": "eps" | "x0" | "v",
                         ...extra keys, e.g. "training": {...}}
    model.safetensors   the weights, official key names (conv_in.weight, down.0.block.0...)
    ema.safetensors     the EMA weights, when the model has them

`save_model` writes the whole folder next to its destination and moves it into place, so a crash
never leaves a half-written checkpoint at the destination and never destroys a good one.

`load_model(path_or_name)` reads, by what it finds:
    a ddim-fast folder                  (config.json with "format": "ddim-fast")
    a training run folder               (`ddim-fast train --out`: its latest complete checkpoint)
    a bundled name                      (a folder ddim_fast/assets/<name>/, e.g. "digits")
    an official DDIM `ckpt.pth`         (see models/convert.py; read with weights_only=True)
    a diffusers UNet2DModel folder      (or a pipeline folder with unet/ and scheduler/): converted into
                                        this project's UNet when it is the DDPM UNet, else a
                                        UNet2DModel / UNet2DConditionModel loaded as it is with diffusers
Every load checks keys and shapes first; a mismatch names the missing, unexpected and mis-shaped
keys and the configuration the weights would fit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from .files import (
    atomic_save_safetensors,
    atomic_write_json,
    check_creatable,
    fsync_dir,
    move_into_place,
    read_safetensors,
    temporary_folder,
)
from .models.unet import UNet, UNetConfig
from .models.weights import build_model, check_state_dict
from .plan import PREDICTIONS, check_sampler_defaults
from .schedule import NoiseSchedule

FORMAT = "ddim-fast"
VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
TRAINER_JSON = "trainer.json"  # written last into a training checkpoint: its presence marks a complete one
RESERVED_KEYS = ("format", "version", "model", "schedule", "prediction", "sampler")
ASSETS = Path(__file__).resolve().parent / "assets"


# -- saving -----------------------------------------------------------------------------------------
def save_model(path, model: UNet, *, ema_state_dict: dict | None = None, extra: dict | None = None,
               overwrite: bool = False) -> Path:
    """Write `model` (and its EMA weights, if given) as a ddim-fast checkpoint folder at `path`.

    The folder is built in a temporary sibling, fsynced, then moved into place. An existing `path`
    is refused unless overwrite=True, and even then only a ddim-fast checkpoint folder (or an
    empty folder) is replaced, never an unrelated directory.
    """
    path = Path(path)
    model = _unwrap(model)
    if not isinstance(model, UNet):
        raise ValueError(f"save_model takes a ddim_fast UNet, got {type(model).__name__}")
    if not isinstance(model.schedule, NoiseSchedule):
        raise ValueError("model.schedule is not set: attach the noise schedule the model was trained with, "
                         "e.g. model.schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)")
    if model.prediction not in PREDICTIONS:
        raise ValueError(f"model.prediction must be one of {PREDICTIONS}, got {model.prediction!r}")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"extra must not set the reserved key(s) {clash}; put them under another name")
    check_destination(path, overwrite)

    state = model.state_dict()
    if ema_state_dict is not None:
        check_state_dict(model.config, ema_state_dict, what="the EMA weights")
    config = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(),
              "schedule": model.schedule.to_dict(), "prediction": model.prediction, **extra}
    sampler = check_sampler_defaults(getattr(model, "sampler_defaults", None))
    if sampler:  # the sampler settings it came with (a diffusers scheduler config), for SamplingPlan.for_model
        config["sampler"] = {k: (None if v == math.inf else v) for k, v in sampler.items()}
    meta = {"format": "pt", "producer": FORMAT}

    tmp = temporary_folder(path)
    try:
        atomic_write_json(tmp / CONFIG_FILE, config)
        atomic_save_safetensors(tmp / MODEL_FILE, state, meta)
        if ema_state_dict is not None:
            atomic_save_safetensors(tmp / EMA_FILE, ema_state_dict, meta)
        fsync_dir(tmp)
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _unwrap(model):
    """The UNet inside torch.compile (`_orig_mod`) or (Distributed)DataParallel (`module`) wrappers."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if isinstance(model, UNet) or inner is None:
            break
        model = inner
    return model


def check_destination(path: Path, overwrite: bool) -> None:
    """A checkpoint may be written at `path`: a new folder in an existing, writable folder, or (overwrite)
    a checkpoint folder or an empty one, never anything else."""
    if not path.exists() and not path.is_symlink():
        check_creatable(path)  # its folder exists: a checkpoint folder is created, the folders above it are not
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(f"{path} exists and is not a checkpoint folder; refusing to replace it "
                              "even with overwrite=True: remove it yourself or pick another path")
    if any(path.iterdir()) and _read_own_config(path) is None:
        raise FileExistsError(f"{path} is a folder but not a ddim-fast checkpoint; refusing to replace it "
                              "even with overwrite=True: remove it yourself or pick another path")


# -- loading ----------------------------------------------------------------------------------------
def load_model(path_or_name, *, ema: bool | None = None, device="cpu", map_location=None) -> UNet:
    """A ready UNet (eval mode, `.config`, `.schedule` and `.prediction` set) from a ddim-fast folder,
    a training run folder (its latest complete checkpoint; `checkpoint_info["run"]` names the run and
    ["path"] the checkpoint), a bundled model name, an official DDIM ckpt.pth or a diffusers folder.
    A diffusers UNet that does not convert exactly into this project's UNet comes back as the diffusers
    model itself (`.schedule`, `.prediction`, `.sampler_defaults` set the same way; `checkpoint_info`
    "as_is" and "why" say so), which every sampler and backend takes.

    ema: None = the EMA weights if the checkpoint has them; True = require them; False = the raw
    weights. (Official files: EMA preferred as well; diffusers folders hold one set of weights.)
    map_location: accepted as a synonym of `device`, as torch.load users write it.
    """
    if map_location is not None:
        if device not in ("cpu", None) and str(torch.device(device)) != str(torch.device(map_location)):
            raise ValueError(f"device={device!r} and map_location={map_location!r} disagree; give one")
        device = map_location
    if ema not in (None, True, False):
        raise ValueError(f"ema must be None (EMA if present), True or False, got {ema!r}")
    _check_path_or_name(path_or_name)
    path = _resolve(path_or_name)
    if path.is_file() and path.name in (MODEL_FILE, EMA_FILE) and _read_own_config(path.parent):
        if ema is None:  # naming one of the two weight files picks it
            ema = path.name == EMA_FILE
        path = path.parent
    elif path.is_file() and path.name.startswith("diffusion_pytorch_model."):
        path = path.parent
    kind = detect_format(path)
    if kind == "run":
        found = find_latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path} is a training run folder without a complete checkpoint yet; train "
                                    "until the first --save-every step, or give a checkpoint folder")
        model = _load_own(found, ema, device)
        model.checkpoint_info["run"] = str(path)
        return model
    if kind == FORMAT:
        return _load_own(path, ema, device)
    from .models import convert  # the importers; kept out of the own-format path

    if kind == "official":
        model = convert.load_official(path, ema=ema is not False)
    else:
        model = convert.load_diffusers(path)
    return model.to(device).eval()


def _check_path_or_name(path_or_name) -> None:
    if isinstance(path_or_name, bytes) or not isinstance(path_or_name, (str, os.PathLike)) \
            or not str(path_or_name).strip():
        names = ", ".join(bundled_names()) or "none are installed"
        raise ValueError(f"load_model takes a path (a str or pathlib.Path) to a checkpoint folder, a training run "
                         f"folder, an official ckpt.pth or a diffusers folder, or a bundled model name ({names}); "
                         f"got {path_or_name!r}")


def model_facts(path_or_name) -> dict | None:
    """What a model's config files say, without loading its weights: {"shape": (C, H, W) or None,
    "num_classes": N or None, "T": training timesteps, "kind": the model's class}, for checking a
    command's arguments before the weights load. None where the format keeps no config (an official
    ckpt.pth) or the config cannot be read (load_model then says what is wrong)."""
    try:
        _check_path_or_name(path_or_name)
        path = _resolve(path_or_name)
        if path.is_file() and path.name in (MODEL_FILE, EMA_FILE, *(f"diffusion_pytorch_model.{e}" for e in
                                                                  ("safetensors", "bin"))):
            path = path.parent
        kind = detect_format(path)
        if kind == "run":
            path = find_latest_checkpoint(path)
            kind = FORMAT if path is not None else None
        if kind == FORMAT:
            cfg = _read_own_config(path)
            config = UNetConfig.from_dict(cfg["model"])
            return {"shape": (config.in_channels, config.resolution, config.resolution),
                    "num_classes": config.num_classes, "T": NoiseSchedule.from_dict(cfg["schedule"]).T, "kind": "UNet"}
        if kind == "diffusers":
            from .models.convert import diffusers_facts

            return diffusers_facts(path)
    except (ValueError, OSError, KeyError, TypeError):
        return None
    return None


def detect_format(path) -> str:
    """"ddim-fast", "run" (a training run folder), "official" or "diffusers" for an existing path;
    ValueError otherwise."""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).exists() and ((path / "checkpoints").is_dir()
                                                                 or (path / "latest").is_file()):
        return "run"
    if path.is_dir():
        cfg = _read_json(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else None
        if isinstance(cfg, dict) and cfg.get("format") == FORMAT:
            return FORMAT
        if isinstance(cfg, dict) and ("_class_name" in cfg or "block_out_channels" in cfg):
            return "diffusers"
        if (path / "unet" / CONFIG_FILE).is_file() or (path / "model_index.json").is_file():
            return "diffusers"
        raise ValueError(
            f"{path} is a folder but not a model: expected a ddim-fast checkpoint (config.json with "
            '"format": "ddim-fast"), a training run folder (checkpoints/), a diffusers UNet2DModel folder '
            "or a diffusers pipeline folder"
        )
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return "official"
    if path.suffix == ".safetensors":
        raise ValueError(f"{path} is a bare weights file; load the folder that holds it and its config.json")
    raise ValueError(
        f"cannot tell the format of {path}: expected a folder (ddim-fast or diffusers) or an official "
        "DDIM checkpoint file (.pth, .pt, .ckpt)"
    )


def find_latest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint folder in a training run folder: the one `latest` names if it
    is complete, else the highest complete checkpoints/step-*; None when there is none."""
    out = Path(out)
    ckdir = out / "checkpoints"
    pointer = out / "latest"
    if pointer.is_file():
        p = ckdir / pointer.read_text().strip()
        if (p / TRAINER_JSON).is_file():
            return p
    done = sorted(p for p in ckdir.glob("step-*") if (p / TRAINER_JSON).is_file()) if ckdir.is_dir() else []
    return done[-1] if done else None


def bundled_names() -> list[str]:
    """Names of the models shipped in ddim_fast/assets/ (each a ddim-fast checkpoint folder)."""
    if not ASSETS.is_dir():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if _read_own_config(p) is not None)


def bundled_configs() -> dict:
    """{name: UNetConfig} of the bundled models, read from their config.json (no weights loaded)."""
    return {name: UNetConfig.from_dict(_read_own_config(ASSETS / name)["model"]) for name in bundled_names()}


def _resolve(path_or_name) -> Path:
    path = Path(path_or_name)
    if path.exists():
        return path
    aside = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() and path.name else []
    if aside:  # killed between move_into_place's two renames: the old folder is whole, set aside
        raise FileNotFoundError(
            f"no checkpoint at {path}: a save there was interrupted, and the previous checkpoint is intact "
            f"at {aside[-1]}; rename that folder back to {path.name} (or save again)"
        )
    name = str(path_or_name)
    is_name = os.sep not in name and "/" not in name and not path.suffix
    if is_name and _read_own_config(ASSETS / name) is not None:
        return ASSETS / name
    if is_name:
        names = bundled_names()
        listed = ", ".join(names) if names else "none are installed"
        raise FileNotFoundError(
            f"{name!r} is neither a path nor a bundled model; bundled models: {listed}. "
            "Give the path to a checkpoint folder, an official ckpt.pth or a diffusers folder"
        )
    raise FileNotFoundError(f"no checkpoint at {path}: check the path")


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is damaged: re-save it") from None


def _read_own_config(path: Path):
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("format") == FORMAT else None


def _load_own(path: Path, ema: bool | None, device) -> UNet:
    cfg = _read_json(path / CONFIG_FILE)
    version = cfg.get("version")
    if version != VERSION:
        raise ValueError(f"{path} is ddim-fast checkpoint version {version!r}; this ddim-fast reads "
                         f"version {VERSION}: upgrade ddim-fast")
    for key in ("model", "schedule"):
        if key not in cfg:
            raise ValueError(f"{path / CONFIG_FILE} has no {key!r} entry; "
                             "the checkpoint is damaged: re-save it")
    config = UNetConfig.from_dict(cfg["model"])
    schedule = NoiseSchedule.from_dict(cfg["schedule"])
    has_ema = (path / EMA_FILE).is_file()
    if ema is True and not has_ema:
        raise ValueError(f"{path} has no EMA weights ({EMA_FILE}); load it with ema=False (CLI: --no-ema)")
    use_ema = has_ema and ema is not False
    file = path / (EMA_FILE if use_ema else MODEL_FILE)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; the checkpoint is incomplete: re-save it")
    model = build_model(config, read_safetensors(file), schedule=schedule,
                        prediction=cfg.get("prediction", "eps"), device=device, what=f"the weights in {file}")
    model.sampler_defaults = check_sampler_defaults(cfg.get("sampler")) or None
    model.checkpoint_info = {"format": FORMAT, "path": str(path), "ema": use_ema,
                             **{k: v for k, v in cfg.items() if k not in RESERVED_KEYS}}
    return model


# -- converting other formats ------------------------------------------------------------------------
def convert(src, dst, *, ema: bool = True, config=None, overwrite: bool = False,
            resolution: int | None = None) -> dict:
    """Import `src` (an official ckpt.pth or a diffusers folder) and write it as a ddim-fast
    checkpoint folder at `dst`. With ema=True an official file's EMA weights are kept as
    ema.safetensors beside the raw ones (load_model then prefers them); ema=False keeps only the
    raw weights. Returns a summary dict (format, params, ema, config, dst)."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"no checkpoint at {src}: check the path")
    check_destination(dst, overwrite)  # before any reading: the output is checked first
    kind = detect_format(src)
    if kind == FORMAT:
        raise ValueError(f"{src} is already a ddim-fast checkpoint; nothing to convert (copy the folder)")
    if kind == "run":
        raise ValueError(f"{src} is a ddim-fast training run; nothing to convert: use it as it is (--model {src} "
                         "loads its latest checkpoint) or copy one of its checkpoints/step-* folders")
    from .models import convert as importers

    if kind == "official":
        raw, ema_sd, info = importers.read_official(src)
        unet, schedule = importers.official_config(config, raw, resolution, src)
        if config is None:
            info["resolution"] = "given" if resolution is not None else "guessed"
        model = build_model(unet, raw, schedule=schedule, what=f"the model weights in {src}")
        keep_ema = ema_sd if ema else None
        if keep_ema is not None:
            check_state_dict(unet, keep_ema, what=f"the EMA weights in {src}")
    else:
        if config is not None or resolution is not None:
            raise ValueError(f"{'config' if config is not None else 'resolution'}= applies to official checkpoints "
                             "only; a diffusers folder has its own config.json")
        model_dir, _ = importers._diffusers_folders(src)
        route, why = importers.diffusers_route(importers._read_json(model_dir / CONFIG_FILE))
        if route == "as_is":  # before any weights are read
            raise ValueError(f"{src} holds a diffusers UNet that does not convert into ddim-fast's UNet: {why}. "
                             f"Use the folder as it is instead (dd.load_model({str(src)!r}), --model {src}): it loads "
                             "with diffusers and samples on every backend, without the fused GroupNorm/attention "
                             "kernels")
        model, keep_ema = importers.load_diffusers(src), None
        info = model.checkpoint_info
    source = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) or v is None}
    save_model(dst, model, ema_state_dict=keep_ema, extra={"source": source}, overwrite=overwrite)
    return {"format": kind, "params": model.num_parameters(), "ema": keep_ema is not None,
            "config": model.config, "dst": str(dst), "prediction": model.prediction,
            "schedule": model.schedule, "sampler": getattr(model, "sampler_defaults", None)}
