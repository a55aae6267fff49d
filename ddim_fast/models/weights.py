"""A UNet from weights: check a state dict against a config, build the model holding it, and read
the architecture back from the weights' shapes.

Below both checkpoint.py (the own format) and the importers (models/convert.py): every loader
checks keys and shapes first, so a mismatch names the missing, unexpected and mis-shaped keys and
the configuration the weights would fit.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..plan import PREDICTIONS
from .unet import PRESETS, UNet, UNetConfig


# -- checking and building ------------------------------------------------------------------------
def check_state_dict(config: UNetConfig, state_dict: dict, what: str = "the weights") -> None:
    """Raise ValueError unless `state_dict` has exactly the keys and shapes of UNet(config).

    The message lists missing, unexpected and mis-shaped keys and says which configuration the
    weights would fit."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected)) + not_tensors
    misshaped = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{what} do not fit {config}:"]
    for name, keys, fmt in (
        ("missing", missing, str),
        ("unexpected", unexpected, str),
        ("mis-shaped", misshaped, lambda k: f"{k} {got[k]} vs model {expected[k]}"),
    ):
        if keys:
            shown = ", ".join(fmt(k) for k in keys[:8])
            more = f", ... and {len(keys) - 8} more" if len(keys) > 8 else ""
            lines.append(f"  {name} ({len(keys)}): {shown}{more}")
    lines.append(f"  {describe_weights(state_dict)}")
    raise ValueError("\n".join(lines))


def build_model(config: UNetConfig, state_dict: dict, *, schedule=None, prediction: str = "eps",
                device="cpu", what: str = "the weights") -> UNet:
    """A UNet in eval mode holding `state_dict` (float32), after checking keys and shapes.

    The network is built on the meta device and the weights are assigned, so loading does not
    pay for a random initialisation."""
    check_state_dict(config, state_dict, what)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    with torch.device("meta"):
        model = UNet(config)
    # A copy: the model must not alias the caller's tensors (e.g. a trainer's live EMA dict).
    weights = {k: v.detach().to(torch.float32, copy=True).contiguous() for k, v in state_dict.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    model.schedule = schedule
    model.prediction = prediction
    return model.to(device).eval()


# -- reading an architecture back from weights -----------------------------------------------------
def infer_config(state_dict: dict, resolution: int | None = None) -> UNetConfig:
    """The UNetConfig whose weights have these keys and shapes.

    Shapes give the channels, ch, ch_mult, num_res_blocks, the attention levels and
    resamp_with_conv. They cannot give the resolution: a preset with the same shapes supplies
    it; otherwise `resolution`, else the DDPM convention that attention sits at 16x16.
    Raises ValueError when the weights are not a DDPM UNet in the official key layout.
    """
    arch = _shape_facts(state_dict)
    for name in PRESETS:  # presets are unconditional: a conditional one differs only in num_classes
        preset = replace(UNetConfig.preset(name), num_classes=arch["num_classes"])
        if _facts_of(preset) == arch and resolution in (None, preset.resolution):
            return preset
    if resolution is None:
        if not arch["attn_levels"]:
            raise ValueError(
                "cannot tell the resolution from the weights (no attention level to anchor it); "
                "give it explicitly (config=... or resolution=...)"
            )
        resolution = 16 * 2 ** arch["attn_levels"][0]
    levels = [resolution // 2**i for i in range(len(arch["ch_mult"]))]
    widths = [arch["ch"] * m for m in arch["ch_mult"]]
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))
    return UNetConfig(
        in_channels=arch["in_channels"], out_channels=arch["out_channels"], resolution=resolution,
        ch=arch["ch"], ch_mult=arch["ch_mult"], num_res_blocks=arch["num_res_blocks"],
        attn_resolutions=tuple(levels[i] for i in arch["attn_levels"]),
        resamp_with_conv=arch["resamp_with_conv"], num_groups=groups, num_classes=arch["num_classes"],
    )


def describe_weights(state_dict: dict) -> str:
    """One line: what architecture these weights look like, and which preset (if any) that is."""
    try:
        arch = _shape_facts(state_dict)
    except ValueError as e:
        return str(e)
    text = (f"the weights look like in_channels={arch['in_channels']}, out_channels={arch['out_channels']}, "
            f"ch={arch['ch']}, ch_mult={arch['ch_mult']}, num_res_blocks={arch['num_res_blocks']}, "
            f"attention at level(s) {list(arch['attn_levels'])}, resamp_with_conv={arch['resamp_with_conv']}")
    n = arch["num_classes"]
    if n is not None:
        text += f", num_classes={n}"
    fits = [p for p in PRESETS if _facts_of(replace(UNetConfig.preset(p), num_classes=n)) == arch]
    if fits:
        return text + f": that is UNetConfig.{fits[0]}()" + (f" with num_classes={n}" if n is not None else "")
    try:
        return text + f": e.g. {infer_config(state_dict)}"
    except ValueError:
        return text + " (no preset has these shapes; give a UNetConfig with them)"


def _facts_of(cfg: UNetConfig) -> dict:
    return {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "ch": cfg.ch,
            "ch_mult": cfg.ch_mult, "num_res_blocks": cfg.num_res_blocks, "attn_levels": cfg.attn_levels,
            "resamp_with_conv": cfg.resamp_with_conv or len(cfg.ch_mult) == 1, "num_classes": cfg.num_classes}


def _shape_facts(sd: dict) -> dict:
    """Architecture facts read from the key names and shapes of an official-layout state dict."""
    need = ("conv_in.weight", "conv_out.weight", "down.0.block.0.conv1.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        sample = sorted(sd)[:5]
        raise ValueError(
            f"these weights are not a DDPM UNet in the official key layout (no {missing[0]!r}; "
            f"keys start with {sample})"
        )
    ch, in_channels = sd["conv_in.weight"].shape[:2]
    out_channels = sd["conv_out.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down."))
    blocks = {int(k.split(".")[3]) for k in sd if k.startswith("down.0.block.")}
    ch_mult = []
    for i in range(levels):
        key = f"down.{i}.block.0.conv1.weight"
        width = sd[key].shape[0] if key in sd else 0
        ch_mult.append(width // ch if width % ch == 0 else width / ch)
    attn = tuple(i for i in range(levels) if f"down.{i}.attn.0.q.weight" in sd)
    labels = sd.get("label_emb.weight")  # (N + 1, 4ch): N labels and the null label
    num_classes = int(labels.shape[0]) - 1 if labels is not None else None
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"label_emb.weight has {labels.shape[0]} row(s); a class-conditional UNet has N + 1 "
                         "(N labels and the null label), so these weights are damaged")
    return {"in_channels": int(in_channels), "out_channels": int(out_channels), "ch": int(ch),
            "ch_mult": tuple(ch_mult), "num_res_blocks": len(blocks), "attn_levels": attn,
            "resamp_with_conv": levels == 1 or "down.0.downsample.conv.weight" in sd,
            "num_classes": num_classes}
