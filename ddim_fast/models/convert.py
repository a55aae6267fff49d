"""Importers for the DDPM checkpoints people already have (checkpoint.convert writes them in our format;
`ddim-fast convert` is ddim_fast/cli/convert.py).

Official DDIM code (ermongroup/ddim), `ckpt.pth`:
    a list [model state dict, optimizer state, epoch, step, EMA shadow]. The model keys carry the
    DataParallel 'module.' prefix; the EMA shadow (present when config.model.ema) holds the same
    parameters. The released pretrained files are bare state dicts. Key names are those of our
    UNet once the prefix is stripped. The schedule is linear 1e-4..0.02 over T=1000 unless the
    official YAML config says otherwise.
diffusers, a UNet2DModel folder in the google/ddpm-* layout:
    config.json + diffusion_pytorch_model.safetensors (or .bin). A pipeline folder holds it in
    unet/ and the schedule in scheduler/scheduler_config.json.

Safety: .pth/.pt/.ckpt/.bin files are read only with torch.load(weights_only=True); a file that
needs arbitrary unpickling is refused (UnsafeCheckpointError), never executed.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from ..checks import is_int, positive_int, require
from ..files import read_safetensors
from ..schedule import NoiseSchedule
from ..scheduler_config import (  # noqa: F401  (the scheduler-config readers live below plan.py; kept here too)
    DDIM_SCHEDULER_DEFAULTS,
    DIFFUSERS_PREDICTIONS,
    diffusers_sampler,
    diffusers_schedule,
)
from .diffusers_unet import KINDS as DIFFUSERS_KINDS
from .unet import UNetConfig
from .weights import build_model, infer_config

OFFICIAL_SCHEDULE = {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that cannot be read without executing arbitrary pickled code."""


# -- safe reading -----------------------------------------------------------------------------------
def safe_torch_load(path):
    """torch.load(path, weights_only=True) on the CPU, with errors a user can act on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}: check the path")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols says nothing to a user
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
        reason = (found.group(1) if found else str(e)).strip().split(". ")[0].splitlines()[0][:200]
        raise UnsafeCheckpointError(
            f"refusing to load {path}: the safe loader (torch.load with weights_only=True) cannot read "
            f"it ({reason}). It holds Python objects that only full unpickling could rebuild, which can "
            "run arbitrary code, or it is not a PyTorch checkpoint at all. If you trust the file, "
            "convert it to safetensors with a trusted tool first (load it yourself, save the tensors "
            "with safetensors.torch.save_file), then load that"
        ) from None
    except (RuntimeError, KeyError, EOFError, ValueError, OSError) as e:
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e}); "
                         "is it the right file, and complete?") from None


# -- official DDIM checkpoints ----------------------------------------------------------------------
def read_official(path) -> tuple[dict, dict | None, dict]:
    """(raw weights, EMA weights or None, info) from an official ckpt.pth, keys as in our UNet."""
    obj = safe_torch_load(path)
    info = {"format": "official", "path": str(path)}
    if _is_state_dict(obj):
        raw, ema = obj, None
        info["layout"] = "bare state dict (as the released pretrained files)"
    elif isinstance(obj, (list, tuple)) and obj and _is_state_dict(obj[0]):
        raw = obj[0]
        ema = obj[4] if len(obj) >= 5 and _is_state_dict(obj[4]) else None
        info["layout"] = f"list of {len(obj)} [model, optimizer, epoch, step{', ema' if ema else ''}]"
        for i, name in ((2, "epoch"), (3, "step")):
            if len(obj) > i and isinstance(obj[i], int):
                info[name] = obj[i]
    else:
        raise ValueError(
            f"{path} is not an official DDIM checkpoint: expected a list [state dict, optimizer, epoch, "
            f"step, ema] or a bare state dict, got {type(obj).__name__}"
        )
    return _clean_official(raw), (_clean_official(ema) if ema is not None else None), info


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _clean_official(sd: dict) -> dict:
    """Strip the DataParallel 'module.' prefix; drop 'logvar' (the 'bayesian' model type's learned
    variances, which a DDIM sampler never reads)."""
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k != "logvar"}


def read_official_yaml(config) -> tuple[UNetConfig, NoiseSchedule]:
    """UNetConfig and NoiseSchedule from an official DDIM YAML config (a path or the parsed dict)."""
    if not isinstance(config, dict):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}: give the official YAML, "
                                    "e.g. configs/cifar10.yml")
        try:
            import yaml
        except ImportError:
            raise ValueError("reading an official YAML config needs PyYAML: pip install pyyaml") from None
        config = yaml.safe_load(path.read_text())
    try:
        m, data, diff = config["model"], config["data"], config.get("diffusion", {})
        unet = UNetConfig(
            in_channels=m["in_channels"], out_channels=m["out_ch"], resolution=data["image_size"],
            ch=m["ch"], ch_mult=tuple(m["ch_mult"]), num_res_blocks=m["num_res_blocks"],
            attn_resolutions=tuple(m["attn_resolutions"]), dropout=float(m.get("dropout", 0.0)),
            resamp_with_conv=bool(m.get("resamp_with_conv", True)),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"the official config lacks {e} (needs model.ch, model.ch_mult, model.in_channels, "
                         "model.out_ch, model.num_res_blocks, model.attn_resolutions, "
                         "data.image_size)") from None
    return unet, _official_schedule(diff)


def _official_schedule(diff: dict) -> NoiseSchedule:
    """The official get_beta_schedule, by name."""
    kind = diff.get("beta_schedule", "linear")
    b0, b1 = float(diff.get("beta_start", 1e-4)), float(diff.get("beta_end", 0.02))
    T = int(diff.get("num_diffusion_timesteps", 1000))
    if kind == "linear":
        return NoiseSchedule.linear(T, b0, b1)
    if kind == "quad":  # linspace of sqrt(beta), squared: diffusers' scaled_linear
        return NoiseSchedule.scaled_linear(T, b0, b1)
    if kind == "const":
        return NoiseSchedule.from_betas(torch.full((T,), b1, dtype=torch.float64))
    if kind == "jsd":  # 1/T, 1/(T-1), ..., 1
        return NoiseSchedule.from_betas(1.0 / torch.linspace(T, 1, T, dtype=torch.float64))
    if kind == "sigmoid":
        s = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
        return NoiseSchedule.from_betas(s * (b1 - b0) + b0)
    raise ValueError(f"unknown official beta_schedule {kind!r}; expected linear, quad, const, jsd or sigmoid")


def load_official(path, *, ema: bool = True, config=None, resolution: int | None = None):
    """A UNet (eval mode) from an official DDIM ckpt.pth.

    ema:        True prefers the EMA weights (a warning if the file has none); False takes the raw ones.
    config:     None infers the architecture from the weights' shapes (see infer_config); else the
                official YAML file (path or parsed dict) or a UNetConfig.
    resolution: the image size, which the weights do not determine; without it (and without config)
                it is guessed and a warning says so.
    """
    raw, ema_sd, info = read_official(path)
    use_ema = bool(ema) and ema_sd is not None
    if ema and ema_sd is None and info["layout"].startswith("list"):
        warnings.warn(f"{path} has no EMA weights; loading the raw training weights", stacklevel=2)
    weights = ema_sd if use_ema else raw
    unet, schedule = official_config(config, weights, resolution, path)
    model = build_model(unet, weights, schedule=schedule, prediction="eps",
                        what=f"the {'EMA' if use_ema else 'model'} weights in {path}")
    model.checkpoint_info = {**info, "ema": use_ema, "has_ema": ema_sd is not None}
    return model


def official_config(config, weights, resolution=None, path="the checkpoint"):
    if config is not None and resolution is not None:
        raise ValueError("give the official config or a resolution, not both (the config has data.image_size)")
    if resolution is not None:
        resolution = positive_int("resolution", resolution, " (the image size)")
    if config is None:
        # The official Normalize() is always GroupNorm(32, eps=1e-6), whatever preset the shapes match.
        try:
            unet = replace(infer_config(weights, resolution), num_groups=32,
                           norm_eps=1e-6)
        except ValueError as e:
            raise ValueError(f"{e}. The weights fix the channels, ch_mult, blocks and attention levels; "
                             "the image size is not in them: give --resolution N (resolution=N) or the official "
                             "YAML (--config)") from None
        if resolution is None:
            why = ("the DDPM convention that self-attention sits at 16x16" if 16 in unet.attn_resolutions
                   else "the bundled preset with the same shapes")
            warnings.warn(
                f"{path}: the weights do not determine the image size; guessed {unet.resolution}x{unet.resolution} "
                f"from {why}. If the model was trained at another size, give it: --resolution N "
                "(resolution=N), or the official YAML with --config", stacklevel=3)
        return unet, NoiseSchedule.from_dict(OFFICIAL_SCHEDULE)
    if isinstance(config, UNetConfig):
        return config, NoiseSchedule.from_dict(OFFICIAL_SCHEDULE)
    return read_official_yaml(config)


# -- diffusers -------------------------------------------------------------------------------------
# diffusers' own defaults for the UNet2DModel fields that decide whether it is this network
# (a config.json written by diffusers omits nothing, but hand-written ones may).
DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "center_input_sample": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D",
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}
# (field, required value, what the other value would mean)
DIFFUSERS_REQUIRED = (
    ("center_input_sample", False, "inputs rescaled by 2x-1 inside the model"),
    ("time_embedding_type", "positional", "a Fourier or learned time embedding"),
    ("flip_sin_to_cos", False, "cosines before sines in the time embedding"),
    ("freq_shift", 1, "different time-embedding frequencies"),
    ("mid_block_type", "UNetMidBlock2D", "a different middle block"),
    ("mid_block_scale_factor", 1, "scaled middle-block outputs"),
    ("downsample_padding", 0, "symmetric padding in the strided conv (DDPM pads bottom/right only)"),
    ("downsample_type", "conv", "ResNet down-sampling"),
    ("upsample_type", "conv", "ResNet up-sampling"),
    ("act_fn", "silu", "another activation"),
    ("resnet_time_scale_shift", "default", "scale-shift (FiLM) time conditioning"),
    ("add_attention", True, "no attention in the middle block"),
    ("class_embed_type", None, "a class embedding other than a label lookup (num_class_embeds)"),
)


class NotTheDDPMUNet(ValueError):
    """A diffusers UNet whose settings have no exact equivalent in ddim-fast's UNet. `kind` is its class
    (UNet2DModel, UNet2DConditionModel, ...), `settings` the differing settings as `name=value`, the
    message says what each one means. load_diffusers loads such a UNet2DModel / UNet2DConditionModel
    as it is, with diffusers."""

    def __init__(self, message: str, kind: str, settings: list):
        super().__init__(message)
        self.kind, self.settings = kind, list(settings)


def diffusers_config(cfg: dict) -> UNetConfig:
    """The UNetConfig of a diffusers UNet2DModel config.json, or one NotTheDDPMUNet (a ValueError)
    listing every setting that differs from the DDPM UNet."""
    name = cfg.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise NotTheDDPMUNet(f"expected a diffusers UNet2DModel, got {name!r}; "
                             "only the DDPM UNet2DModel converts into ddim-fast's UNet", str(name), [])
    c = {**DIFFUSERS_DEFAULTS, **cfg}
    problems = []  # (setting, what it means): every unsupported setting, so one attempt names them all
    for key, want, meaning in DIFFUSERS_REQUIRED:
        if c[key] != want and not (key == "act_fn" and c[key] == "swish"):
            problems.append((f"{key}={c[key]!r}", f"{meaning}; the DDPM UNet needs {key}={want!r}"))
    widths = list(c["block_out_channels"])
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    L, ch = len(widths), widths[0]
    if len(down) != L or len(up) != L:
        raise ValueError(f"block_out_channels, down_block_types and up_block_types differ in length "
                         f"({widths}, {down}, {up}); the config is inconsistent")
    if any(w % ch for w in widths):
        problems.append((f"block_out_channels={widths}", "not multiples of the first"))
    attn = []
    if any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down) or \
            any(t not in ("UpBlock2D", "AttnUpBlock2D") for t in up):
        problems.append((f"unsupported block types {down} / {up}", "expected (Attn)DownBlock2D / (Attn)UpBlock2D"))
    else:
        attn = [i for i, t in enumerate(down) if t == "AttnDownBlock2D"]
        if attn != [L - 1 - k for k, t in reversed(list(enumerate(up))) if t == "AttnUpBlock2D"]:
            problems.append((f"attention in down blocks {down} and up blocks {up} is not mirrored", None))
    head = c["attention_head_dim"]
    for i in sorted(set(attn + [L - 1])):
        if head is not None and head != widths[i]:
            problems.append((f"attention_head_dim={head}", f"it splits attention into {widths[i] // head} heads at "
                             f"width {widths[i]}; the DDPM UNet uses one head: attention_head_dim null"))
            break
    if c["time_embedding_dim"] not in (None, 4 * ch):
        problems.append((f"time_embedding_dim={c['time_embedding_dim']}", f"the DDPM UNet uses 4 * {ch}"))
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        problems.append((f"attn_norm_num_groups={c['attn_norm_num_groups']}", "differs from norm_num_groups"))
    size = c.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            problems.append((f"sample_size={list(size)}", "not square; the DDPM UNet configs are square"))
        size = size[0] if size else None
    if not is_int(size) or size < 1:
        problems.append((f"sample_size={size!r}", "the image size must be set: an int"))
    n_cls = c["num_class_embeds"]
    if n_cls is not None and (not is_int(n_cls) or n_cls < 2):
        problems.append((f"num_class_embeds={n_cls!r}", "a class-conditional model needs at least one label "
                         "and the null row: num_class_embeds >= 2"))
    if problems:
        raise NotTheDDPMUNet(f"this UNet2DModel differs from the DDPM UNet in {len(problems)} setting(s), so it does "
                             "not convert into ddim-fast's UNet: "
                             + "; ".join(f"{k} ({v})" if v else k for k, v in problems), name, [k for k, _ in problems])
    return UNetConfig(
        in_channels=c["in_channels"], out_channels=c["out_channels"], resolution=int(size), ch=ch,
        ch_mult=tuple(w // ch for w in widths), num_res_blocks=c["layers_per_block"],
        attn_resolutions=tuple(size // 2**i for i in attn), dropout=float(c["dropout"]),
        resamp_with_conv=True, num_groups=c["norm_num_groups"], norm_eps=float(c["norm_eps"]),
        # num_class_embeds rows map to labels 0..N-1 plus the null label N (our last row): a model not
        # trained with a null row maps numerically, but its 'null' label means nothing
        num_classes=int(n_cls) - 1 if n_cls is not None else None,
    )


_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
           "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN_NEW = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_OLD = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}


def diffusers_key(key: str, levels: int, old_attention: bool = False) -> str:
    """The diffusers UNet2DModel name of one of our state-dict keys (official layout)."""
    attn = _ATTN_OLD if old_attention else _ATTN_NEW
    fixed = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
             "norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out",
             "label_emb": "class_embedding"}
    module, _, param = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{param}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", module)
    if m:
        side, i, kind, j, leaf = m.groups()
        block = f"down_blocks.{i}" if side == "down" else f"up_blocks.{levels - 1 - int(i)}"
        sub = f"resnets.{j}.{_RESNET[leaf]}" if kind == "block" else f"attentions.{j}.{attn[leaf]}"
        return f"{block}.{sub}.{param}"
    m = re.fullmatch(r"down\.(\d+)\.downsample\.conv", module)
    if m:
        return f"down_blocks.{m.group(1)}.downsamplers.0.conv.{param}"
    m = re.fullmatch(r"up\.(\d+)\.upsample\.conv", module)
    if m:
        return f"up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{param}"
    m = re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(\w+)", module)
    if m:
        part, leaf = m.groups()
        if part == "attn_1":
            return f"mid_block.attentions.0.{attn[leaf]}.{param}"
        return f"mid_block.resnets.{0 if part == 'block_1' else 1}.{_RESNET[leaf]}.{param}"
    raise ValueError(f"no diffusers name for {key!r}")


def from_diffusers_state_dict(config: UNetConfig, theirs: dict, what: str = "the diffusers weights") -> dict:
    """Our state dict from a UNet2DModel one: every key mapped exactly, 1x1 convs from Linear
    weights; ValueError listing missing, unexpected and mis-shaped keys."""
    from .unet import UNet

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    levels = len(config.ch_mult)
    old = any(".attentions." in k and ".query." in k for k in theirs)
    ours, missing, misshaped = {}, [], []
    for key, shape in expected.items():
        name = diffusers_key(key, levels, old)
        if name not in theirs:
            missing.append(name)
            continue
        t = theirs[name]
        if t.ndim == 2 and len(shape) == 4 and shape[2:] == (1, 1):
            t = t.reshape(shape)  # attention projections: Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        if tuple(t.shape) != shape:
            misshaped.append(f"{name} {tuple(theirs[name].shape)} vs {shape}")
            continue
        ours[key] = t
    used = {diffusers_key(k, levels, old) for k in expected}
    unexpected = sorted(set(theirs) - used)
    if missing or unexpected or misshaped:
        lines = [f"{what} do not fit the UNet2DModel config ({config}):"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                more = f", ... and {len(keys) - 8} more" if len(keys) > 8 else ""
                lines.append(f"  {label} ({len(keys)}): {', '.join(keys[:8])}{more}")
        lines.append("  check that config.json belongs to these weights")
        raise ValueError("\n".join(lines))
    return ours


def _diffusers_folders(folder: Path) -> tuple[Path, Path | None]:
    """(model folder, scheduler_config.json or None) for a UNet2DModel folder or a pipeline folder."""
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}: give a diffusers UNet2DModel or pipeline folder")
    if (folder / "unet" / "config.json").is_file():
        model_dir = folder / "unet"
    elif (folder / "config.json").is_file():
        model_dir = folder
    else:
        raise FileNotFoundError(f"{folder} has no config.json (nor unet/config.json); not a diffusers folder")
    # A pipeline keeps the model in unet/ and the schedule in a sibling scheduler/ folder.
    sched = model_dir.parent / "scheduler" / "scheduler_config.json"
    return model_dir, (sched if model_dir.name == "unet" and sched.is_file() else None)


def _diffusers_weights(model_dir: Path) -> dict:
    st = model_dir / "diffusion_pytorch_model.safetensors"
    if st.is_file():
        return read_safetensors(st)
    binf = model_dir / "diffusion_pytorch_model.bin"
    if binf.is_file():
        obj = safe_torch_load(binf)
        if not _is_state_dict(obj):
            raise ValueError(f"{binf} is not a state dict of tensors")
        return obj
    raise FileNotFoundError(
        f"{model_dir} has no diffusion_pytorch_model.safetensors or .bin "
        "(sharded or variant files, e.g. .fp16.safetensors, are not supported: save the model again)"
    )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the folder is damaged: save it again") from None


def _diffusers_scheduler(sched_path: Path | None) -> tuple[NoiseSchedule, str, dict | None]:
    """(schedule, prediction, sampler defaults) of a pipeline's scheduler config; without one the
    official DDPM schedule, eps, and no sampler defaults."""
    if sched_path is None:
        return NoiseSchedule.from_dict(OFFICIAL_SCHEDULE), "eps", None
    sched_cfg = _read_json(sched_path)
    schedule, prediction = diffusers_schedule(sched_cfg)
    return schedule, prediction, {"from": "diffusers", **diffusers_sampler(sched_cfg, schedule)}


def diffusers_route(cfg: dict) -> tuple[str, str | None]:
    """How a diffusers model config loads: ("convert", None) when it converts exactly into ddim-fast's
    UNet (the fused kernels apply), ("as_is", why) for another UNet2DModel / UNet2DConditionModel (loaded
    with diffusers); ValueError for anything else."""
    try:
        diffusers_config(cfg)
    except NotTheDDPMUNet as e:
        if e.kind not in DIFFUSERS_KINDS:
            raise ValueError(f"a diffusers {e.kind} is not a UNet ddim-fast can sample with; give a UNet2DModel or "
                             "UNet2DConditionModel folder (or a pipeline folder holding one in unet/)") from None
        if e.settings:
            return "as_is", f"its settings ({', '.join(e.settings)}) have no exact equivalent in ddim-fast's UNet"
        return "as_is", f"a {e.kind} has no equivalent in ddim-fast's UNet"
    return "convert", None


def diffusers_facts(folder) -> dict:
    """What a diffusers folder's config.json files say without loading weights: sample shape (C, H, W)
    or None, num_classes (None: no class labels), T, and its kind; for checking arguments early."""
    model_dir, sched_path = _diffusers_folders(Path(folder))
    cfg = _read_json(model_dir / "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{model_dir / 'config.json'} is not a model config (a JSON object)")
    size = cfg.get("sample_size")
    h, w = (size, size) if is_int(size) else (tuple(size) if isinstance(size, (list, tuple)) and len(size) == 2
                                               else (None, None))
    shape = (int(cfg.get("in_channels", 3)), int(h), int(w)) if h is not None else None
    n = cfg.get("num_class_embeds")
    labels = is_int(n) and n >= 2 and cfg.get("class_embed_type") is None
    T = _diffusers_scheduler(sched_path)[0].T
    return {"shape": shape, "num_classes": int(n) - 1 if labels else None, "T": T,
            "kind": cfg.get("_class_name", "UNet2DModel")}


def load_diffusers(folder):
    """A model (eval mode) from a diffusers UNet2DModel / UNet2DConditionModel folder, or a pipeline
    folder (unet/ + scheduler/). A UNet2DModel that converts exactly (diffusers_config) becomes this
    project's UNet (the fused kernels apply); any other UNet2DModel or UNet2DConditionModel is loaded as
    it is with diffusers (load_diffusers_as_is), used like a UNet object given directly. The schedule
    and prediction type come from scheduler/scheduler_config.json when there is one, else linear
    1e-4..0.02 over T=1000 and eps. A scheduler config also sets `model.sampler_defaults`: the settings
    DDIMPipeline samples with (see diffusers_sampler), which SamplingPlan.for_model and the CLI use.
    `model.checkpoint_info["as_is"]` says why a folder was loaded as it is."""
    model_dir, sched_path = _diffusers_folders(Path(folder))
    cfg = _read_json(model_dir / "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{model_dir / 'config.json'} is not a model config (a JSON object); save the model again")
    schedule, prediction, sampler = _diffusers_scheduler(sched_path)
    route, why = diffusers_route(cfg)
    if route == "as_is":
        model = load_diffusers_as_is(model_dir, str(cfg.get("_class_name", "UNet2DModel")), why)
    else:
        config = diffusers_config(cfg)
        ours = from_diffusers_state_dict(config, _diffusers_weights(model_dir),
                                         what=f"the weights in {model_dir}")
        model = build_model(config, ours, schedule=schedule, prediction=prediction)
    model.schedule, model.prediction = schedule, prediction
    model.sampler_defaults = sampler
    model.checkpoint_info = {"format": "diffusers", "path": str(model_dir), "ema": None,
                             "scheduler": str(sched_path) if sched_path else None,
                             **({"as_is": type(model).__name__, "why": why} if route == "as_is" else {})}
    return model


def load_diffusers_as_is(model_dir: Path, kind: str, why: str):
    """diffusers' own `kind`.from_pretrained of a local folder (no network: local_files_only), eval mode."""
    require("diffusers", "diffusers", f"{model_dir} is a diffusers {kind} that ddim-fast loads as it is ({why}); "
                                      "that")
    import importlib.util

    import diffusers

    # without accelerate diffusers would say at length that it falls back to this: ask for it directly
    quiet = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
    try:
        model = getattr(diffusers, kind).from_pretrained(str(model_dir), local_files_only=True, **quiet)
    except Exception as e:  # diffusers' own errors (OSError, ValueError, RuntimeError, ...): one line, the folder
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"diffusers could not load the {kind} in {model_dir} ({type(e).__name__}: {first}); "
                         "check that the folder is complete, or save the model again") from None
    return model.eval()
