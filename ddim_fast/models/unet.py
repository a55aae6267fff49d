"""The DDPM UNet (Ho et al. 2020), as used by every model in the DDIM paper.

The same network as the official DDIM code's `models/diffusion.py` `Model`, with the same
state-dict key names (conv_in, temb.dense.{0,1}, down.{i}.block.{j}, down.{i}.attn.{j},
down.{i}.downsample.conv, mid.block_1, mid.attn_1, mid.block_2, up.{i}.block.{j},
up.{i}.attn.{j}, up.{i}.upsample.conv, norm_out, conv_out), so an official checkpoint loads after
stripping the DataParallel 'module.' prefix.

    eps = UNet(UNetConfig.cifar10())(x, t)      # x (B, 3, 32, 32), t (B,) training timesteps
    eps = UNet(UNetConfig(num_classes=10))(x, t, class_labels=y)   # y (B,) in [0, 10]; 10 = null

Class conditioning (num_classes=N): a label embedding `label_emb` (N + 1 rows, 4ch wide) is added
to the time embedding after its MLP, where diffusers' UNet2DModel adds its class embedding
(`emb = emb + class_emb`) and guided-diffusion its `label_emb`. Row N is the null label: the
unconditional branch of classifier-free guidance, which the trainer teaches by replacing labels
with N at random (--class-dropout). `class_labels=None` means all-null.

The fusable operations (GroupNorm with the time-embedding add and SiLU; the attention core) go
through `self.ops` (see ops/__init__.py), so `model.set_ops("triton")` swaps in fused kernels without
touching this file. Convolutions and linear layers stay PyTorch. The nn.GroupNorm modules only
hold the affine parameters (their forward is never called), which keeps the key names natural.

Where this differs from the official code, it is only in how things are computed:
  - ResBlock: norm2(h + temb_proj(silu(temb))) is one `group_norm(h, add=..., silu=True)` call;
  - swish is F.silu (x * sigmoid(x) to float rounding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check, is_int, is_number, positive_int
from .ops import ReferenceOps, get_ops

PRESETS = ("cifar10", "celeba", "lsun", "tiny", "digits")


@dataclass(frozen=True)
class UNetConfig:
    """The architecture of a DDPM UNet. Defaults are the official CIFAR-10 model (35.7M params)."""

    in_channels: int = 3  # RGB images
    out_channels: int = 3  # eps has the image's shape
    resolution: int = 32  # CIFAR-10's image size
    ch: int = 128  # base width of every official DDPM/DDIM model
    ch_mult: tuple = (1, 2, 2, 2)  # width of level i is ch * ch_mult[i]; one level per resolution
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attn_resolutions: tuple = (16,)  # feature-map sizes with self-attention (DDPM: 16x16)
    dropout: float = 0.1  # the official CIFAR-10 value; inactive in eval mode
    resamp_with_conv: bool = True  # strided conv down / conv after nearest up (else avg-pool / none)
    num_groups: int = 32  # GroupNorm(32) in every official model
    norm_eps: float = 1e-6  # the official Normalize(); torch's own default is 1e-5
    num_classes: int | None = None  # class-conditional on labels 0..N-1 (+ null label N); None: unconditional

    def __post_init__(self):
        # Lists (from JSON or YAML) become tuples, so configs hash and compare; numpy integers become
        # ints, so configs stay JSON-able.
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(int(v) if is_int(v) else v for v in value))
        for name in ("in_channels", "out_channels", "resolution", "ch", "num_res_blocks", "num_groups"):
            object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        check(isinstance(self.ch_mult, tuple) and len(self.ch_mult) > 0,
              f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}")
        for m in self.ch_mult:
            positive_int("every ch_mult entry", m)
        check(isinstance(self.attn_resolutions, tuple),
              f"attn_resolutions must be a tuple of ints, got {self.attn_resolutions!r}; use () for none")
        check(self.ch % 2 == 0 and self.ch >= 4,
              f"ch must be even and >= 4 (the sinusoidal time embedding has ch dims), got {self.ch}")
        halvings = len(self.ch_mult) - 1
        check(self.resolution % 2**halvings == 0,
              f"resolution {self.resolution} cannot be halved {halvings} times (ch_mult has {len(self.ch_mult)} "
              f"levels); use a multiple of {2**halvings}")
        for r in self.attn_resolutions:
            check(r in self.level_resolutions, f"attention resolution {r!r} matches no level; the levels have sizes "
                  f"{self.level_resolutions}: pick attn_resolutions from those")
        for m in self.ch_mult:
            check((self.ch * m) % self.num_groups == 0, f"width ch*ch_mult = {self.ch * m} is not divisible by "
                  f"num_groups={self.num_groups}; change ch or num_groups")
        check(is_number(self.dropout) and 0.0 <= self.dropout < 1.0,
              f"dropout must be a float in [0, 1), got {self.dropout!r}")
        check(isinstance(self.resamp_with_conv, bool),
              f"resamp_with_conv must be True or False, got {self.resamp_with_conv!r}")
        check(is_number(self.norm_eps) and self.norm_eps > 0,
              f"norm_eps must be a positive float, got {self.norm_eps!r}")
        if self.num_classes is not None:
            object.__setattr__(self, "num_classes",
                               positive_int("num_classes (None for an unconditional model)", self.num_classes))

    @property
    def level_resolutions(self) -> tuple:
        """The feature-map size of each level: resolution, resolution/2, ..."""
        return tuple(self.resolution // 2**i for i in range(len(self.ch_mult)))

    @property
    def attn_levels(self) -> tuple:
        """Indices of the levels with self-attention."""
        return tuple(i for i, r in enumerate(self.level_resolutions) if r in self.attn_resolutions)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        if self.num_classes is None:  # unconditional files stay as before (and readable by older versions)
            del d["num_classes"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a UNetConfig is read from a dict, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(
                f"unknown UNetConfig key(s) {unknown}; the known keys are {known} "
                "(was the file written by a newer ddim-fast? upgrade it)"
            )
        return cls(**d)

    # -- presets ------------------------------------------------------------------------------
    @classmethod
    def cifar10(cls) -> UNetConfig:
        """The official CIFAR-10 32x32 model (DDPM / DDIM paper): 35.7M parameters."""
        return cls()

    @classmethod
    def celeba(cls) -> UNetConfig:
        """The official CelebA 64x64 model: 78.7M parameters."""
        return cls(resolution=64, ch_mult=(1, 2, 2, 2, 4))

    @classmethod
    def lsun(cls) -> UNetConfig:
        """The official LSUN church / bedroom 256x256 model: 113.7M parameters."""
        return cls(resolution=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)

    @classmethod
    def tiny(cls) -> UNetConfig:
        """For tests and CI: every op of the big models (two levels, channel change, attention in a
        level and in the middle, strided down / nearest up) at a few hundred thousand parameters.
        num_groups=8 keeps 4+ channels per group, so GroupNorm's grouping is really exercised."""
        return cls(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                   dropout=0.0, num_groups=8)

    @classmethod
    def digits(cls) -> UNetConfig:
        """The bundled model: 16x16 grey-scale digits (trained by `ddim-fast train`)."""
        return cls(in_channels=1, out_channels=1, resolution=16, ch=32, ch_mult=(1, 2, 2),
                   num_res_blocks=1, attn_resolutions=(8,), dropout=0.1, num_groups=8)

    @classmethod
    def preset(cls, name: str) -> UNetConfig:
        """A preset by name: one of PRESETS."""
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; expected one of {PRESETS}")
        return getattr(cls, name)()


# -- building blocks ------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of training timesteps, as the official get_timestep_embedding:
    frequencies 10000^(-i/(dim/2 - 1)), sines in the first half and cosines in the second."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -step)  # (half,)
    arg = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)  # (B, dim); dim is even (config check)


def _norm(channels: int, cfg: UNetConfig) -> nn.GroupNorm:
    # A parameter holder: the network calls ops.group_norm with its weight and bias.
    return nn.GroupNorm(cfg.num_groups, channels, eps=cfg.norm_eps)


class ResnetBlock(nn.Module):
    """x + conv2(dropout(silu(norm2(conv1(silu(norm1(x))) + temb_proj(silu(temb)))))), with a 1x1
    `nin_shortcut` on x when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, cfg: UNetConfig):
        super().__init__()
        self.ops = ReferenceOps()
        self.norm1 = _norm(in_channels, cfg)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _norm(out_channels, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, temb):
        ops, n1, n2 = self.ops, self.norm1, self.norm2
        h = ops.group_norm(x, n1.weight, n1.bias, n1.num_groups, n1.eps, silu=True)  # (B, Cin, H, W)
        h = self.conv1(h)  # (B, Cout, H, W)
        add = self.temb_proj(F.silu(temb))  # (B, Cout)
        h = ops.group_norm(h, n2.weight, n2.bias, n2.num_groups, n2.eps, add=add, silu=True)
        h = self.conv2(self.dropout(h))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """x + proj_out(attention(q, k, v)) over the H*W positions, single head (head_dim = C)."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.ops = ReferenceOps()
        self.norm = _norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        n = self.norm
        h = self.ops.group_norm(x, n.weight, n.bias, n.num_groups, n.eps)  # (B, C, H, W)
        q = self.q(h).reshape(B, C, H * W)  # (B, C, N)
        k = self.k(h).reshape(B, C, H * W)
        v = self.v(h).reshape(B, C, H * W)
        h = self.ops.attention(q, k, v).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv after padding one zero row/column at the bottom/right
    (TensorFlow's 'SAME' for stride 2, as the original DDPM), or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then (optionally) a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


# -- the network ------------------------------------------------------------------------------------
class UNet(nn.Module):
    """eps_theta(x_t, t): x (B, in_channels, R, R) and t (B,) -> (B, out_channels, R, R).

    Attributes set by the loaders: `schedule` (the NoiseSchedule it was trained with, or None)
    and `prediction` ("eps", "x0" or "v").
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        if config is None:
            config = UNetConfig()
        if not isinstance(config, UNetConfig):
            raise ValueError(f"UNet takes a UNetConfig, got {type(config).__name__}; "
                             "e.g. UNet(UNetConfig.cifar10())")
        self.config = config
        self.schedule = None
        self.prediction = "eps"
        self.sampler_defaults = None  # SamplingPlan.build settings the model came with (SamplingPlan.for_model)
        self.ops = ReferenceOps()
        cfg, ch = config, config.ch
        temb_ch = 4 * ch
        levels = len(cfg.ch_mult)

        # 1. Timestep embedding: sinusoid (ch) -> dense (4ch) -> swish -> dense (4ch).
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])

        # 2. Down path; `skips` records the channels of every feature map the up path will concat.
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        skips = [ch]
        block_in = ch
        self.down = nn.ModuleList()
        for i in range(levels):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, temb_ch, cfg))
                block_in = block_out
                if i in cfg.attn_levels:
                    level.attn.append(AttnBlock(block_in, cfg))
                skips.append(block_in)
            if i != levels - 1:
                level.downsample = Downsample(block_in, cfg.resamp_with_conv)
                skips.append(block_in)
            self.down.append(level)

        # 3. Middle: ResBlock, attention, ResBlock at the lowest resolution.
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, cfg)
        self.mid.attn_1 = AttnBlock(block_in, cfg)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, cfg)

        # 4. Up path, built from the lowest level up but stored by level index (up.{i}), as the
        #    official code does; each ResBlock takes the running features concatenated with a skip.
        up = [None] * levels
        for i in reversed(range(levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in + skips.pop(), block_out, temb_ch, cfg))
                block_in = block_out
                if i in cfg.attn_levels:
                    level.attn.append(AttnBlock(block_in, cfg))
            if i != 0:
                level.upsample = Upsample(block_in, cfg.resamp_with_conv)
            up[i] = level
        self.up = nn.ModuleList(up)

        # 5. Output: GroupNorm + swish + conv.
        self.norm_out = _norm(block_in, cfg)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

        # 6. Class labels (num_classes=N): one embedding row per label plus the null label N, added
        #    to the time embedding. Registered last, so the other weights draw the same random
        #    initialisation as the unconditional model's under the same seed.
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes + 1, temb_ch)

    # -- the seam ----------------------------------------------------------------------------
    def set_ops(self, name_or_ops) -> UNet:
        """Use `name_or_ops` ("reference", "triton" or an object with group_norm and attention)
        for every GroupNorm(+SiLU) and attention call of the network. Returns self."""
        ops = get_ops(name_or_ops) if isinstance(name_or_ops, str) else name_or_ops
        if not (callable(getattr(ops, "group_norm", None)) and callable(getattr(ops, "attention", None))):
            raise ValueError(
                f"set_ops takes 'reference', 'triton' or an object with group_norm() and attention() "
                f"methods (see ddim_fast/models/ops/__init__.py), got {name_or_ops!r}"
            )
        for m in self.modules():
            if "ops" in m.__dict__:
                m.ops = ops
        return self

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) timesteps; class_labels (B,) ints in [0, N] for a model with
        num_classes=N (N is the null label; None means all-null), never for an unconditional one."""
        cfg = self.config
        levels = len(cfg.ch_mult)
        t = self._timesteps(x, t)  # (B,)

        # 1. Timestep embedding (+ the label embedding: diffusers' `emb = emb + class_emb`).
        temb = timestep_embedding(t, cfg.ch).to(self.temb.dense[0].weight.dtype)  # (B, ch)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))  # (B, 4ch)
        if cfg.num_classes is not None:
            temb = temb + self.label_emb(self._class_labels(x, class_labels))  # (B, 4ch)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional model (num_classes=None); drop them, "
                             "or use a class-conditional model, e.g. UNetConfig(..., num_classes=10)")

        # 2. Down path, keeping every feature map for the skips.
        hs = [self.conv_in(x)]  # (B, ch, R, R)
        for i in range(levels):
            level = self.down[i]
            for j in range(cfg.num_res_blocks):
                h = level.block[j](hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if i != levels - 1:
                hs.append(level.downsample(hs[-1]))

        # 3. Middle.
        h = self.mid.block_1(hs[-1], temb)
        h = self.mid.block_2(self.mid.attn_1(h), temb)

        # 4. Up path.
        for i in reversed(range(levels)):
            level = self.up[i]
            for j in range(cfg.num_res_blocks + 1):
                h = level.block[j](torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)

        # 5. Output.
        n = self.norm_out
        h = self.ops.group_norm(h, n.weight, n.bias, n.num_groups, n.eps, silu=True)
        return self.conv_out(h)  # (B, out_channels, R, R)

    def _timesteps(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x must be (B, {self.config.in_channels}, H, W) for this model, got {tuple(x.shape)}"
            )
        levels = len(self.config.ch_mult)
        if x.shape[2] % 2 ** (levels - 1) or x.shape[3] % 2 ** (levels - 1):
            raise ValueError(
                f"H and W must be multiples of {2 ** (levels - 1)} (the model halves them "
                f"{levels - 1} times), got {tuple(x.shape[2:])}"
            )
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
            raise ValueError(
                f"t must be a scalar or a (B,) tensor of timesteps with B = {x.shape[0]}, "
                f"got shape {tuple(t.shape)}"
            )
        return t.to(x.device).reshape(-1).expand(x.shape[0])

    # The range check costs one host sync per call; the Engine's backends check the labels once per
    # sampling call (ddim_fast.conditioning.resolve) and turn it off on their private copy.
    check_labels = True

    def _class_labels(self, x: torch.Tensor, y) -> torch.Tensor:
        """(B,) long labels for a conditional model: None -> all null (N); a scalar or (1,) is
        broadcast like t. Values outside [0, N] are refused, except while the forward is traced
        (torch.export / ONNX / torch.compile) or captured in a CUDA graph, where a data-dependent
        check cannot run; there an out-of-range label fails in the embedding lookup instead."""
        n, batch = self.config.num_classes, x.shape[0]
        if y is None:
            return torch.full((batch,), n, dtype=torch.long, device=x.device)  # the null label
        if not isinstance(y, torch.Tensor):
            y = torch.tensor(y)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"class_labels must be an integer tensor (e.g. torch.long), got {y.dtype}")
        if y.ndim > 1 or (y.ndim == 1 and y.shape[0] not in (1, batch)):
            raise ValueError(f"class_labels must be a scalar or a (B,) tensor of labels with B = {batch}, "
                             f"got shape {tuple(y.shape)}")
        traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
        capturing = y.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.check_labels and not (traced or capturing) and y.numel() and bool(((y < 0) | (y > n)).any()):
            raise ValueError(f"class_labels must be in [0, {n}] (labels 0..{n - 1}, {n} the null label), "
                             f"got values from {int(y.min())} to {int(y.max())}")
        return y.to(device=x.device, dtype=torch.long).reshape(-1).expand(batch)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"{self.config}, prediction={self.prediction!r}, ops={getattr(self.ops, 'name', self.ops)!r}"
