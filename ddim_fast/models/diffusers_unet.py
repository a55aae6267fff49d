"""A diffusers UNet2DModel or UNet2DConditionModel used as it is (no conversion): the Engine, the
reference sampler and the ONNX export wrap it in DiffusersUNet, which calls it as model(x, t, **cond),
takes the output's .sample, and says what conditioning it takes (cond_spec) and its sample shape.

diffusers is never imported here: a model is recognised by its class (name and module), so
`import ddim_fast` and every other model work without diffusers installed. The fused GroupNorm and
attention kernels are this project's UNet's; a diffusers model runs its own layers, and the fused step
kernel, the CUDA graph and the ONNX sampler serve it like any model.
"""

from __future__ import annotations

import torch

KINDS = ("UNet2DModel", "UNet2DConditionModel")


def is_diffusers_unet(model) -> bool:
    """A diffusers UNet2DModel / UNet2DConditionModel (or a subclass), recognised without importing diffusers."""
    if not isinstance(model, torch.nn.Module):
        return False
    return any(c.__name__ in KINDS and c.__module__.startswith("diffusers") for c in type(model).__mro__)


def adapt(model):
    """`model` wrapped in DiffusersUNet when it is a diffusers UNet, else unchanged."""
    return DiffusersUNet(model) if is_diffusers_unet(model) else model


class DiffusersUNet(torch.nn.Module):
    """model(x, t, **cond) -> the prediction tensor of a diffusers UNet (its output's .sample)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.kind = next(c.__name__ for c in type(unet).__mro__ if c.__name__ in KINDS)
        cfg = unet.config
        size = cfg.get("sample_size") if hasattr(cfg, "get") else getattr(cfg, "sample_size", None)
        self.shape = _shape(cfg["in_channels"] if hasattr(cfg, "__getitem__") else cfg.in_channels, size)
        for attr in ("prediction", "schedule", "sampler_defaults"):  # set by ddim-fast on a loaded model only
            if getattr(unet, attr, None) is not None:
                setattr(self, attr, getattr(unet, attr))

    def cond_spec(self) -> dict:
        cfg = self.unet.config
        spec = {}
        if self.kind == "UNet2DConditionModel":
            spec["encoder_hidden_states"] = {
                "shape": ("L", int(cfg["cross_attention_dim"])), "dtype": torch.float32, "null": None,
                "about": "text-encoder states (B, L, D); no null: pass uncond (e.g. the empty prompt's states)"}
        n = cfg.get("num_class_embeds")
        if n is not None and cfg.get("class_embed_type") is None:
            k = int(n) - 1
            spec["class_labels"] = {
                "shape": (), "dtype": torch.int64, "range": (0, k), "null": k,
                "about": f"class labels 0..{k - 1}; {k} (the last class row) taken as the null label, which "
                         "means 'unconditional' only if the model was trained with it"}
        return spec

    def forward(self, x, t, **cond):
        if "class_labels" in self.cond_spec() and "class_labels" not in cond:  # diffusers requires them
            cond["class_labels"] = torch.full((x.shape[0],), self.cond_spec()["class_labels"]["null"],
                                              dtype=torch.long, device=x.device)
        t = t.expand(x.shape[0]) if isinstance(t, torch.Tensor) and t.ndim == 1 and t.shape[0] == 1 else t
        return self.unet(x, t, **cond, return_dict=False)[0]


def _shape(channels, size):
    if isinstance(size, (list, tuple)):
        h, w = (int(s) for s in size)
    elif size is not None:
        h = w = int(size)
    else:
        return None
    return (int(channels), h, w)
