"""Inception-v3 features for the standard FID, from a weights file the user provides.

The standard FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to the
2048-d "pool3" activations (after the last average pool) of one particular network: the
Inception-v3 graph TensorFlow published on 2015-12-05, as ported to PyTorch by pytorch-fid.
Numbers are comparable with published FIDs only with that network, its weights and its input
convention, so this module reproduces all three:

1. Architecture: torchvision's Inception-v3 layout (so the state-dict keys are the same:
   `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch_pool.bn.running_var`, ..., `fc.weight`) without
   the auxiliary classifier, with the differences of the TF graph:
   - every average pool inside the Inception blocks ignores the zero padding
     (`count_include_pad=False`, TF's behaviour);
   - the pool branch of the last block, Mixed_7c, uses a max pool instead of an average pool;
   - BatchNorm eps is 0.001 and convolutions have no bias;
   - the classifier has 1008 outputs (the TF graph's label count), unused for features.
   Parameters: 23,850,960 (torchvision's 27,161,264 with the auxiliary head, less that head's
   3,326,696, plus 8 x 2049 for the 1008-way fc).
2. Weights: `pt_inception-2015-12-05-6726825d.pth`, published in pytorch-fid's GitHub release
   `fid_weights` (https://github.com/mseitzer/pytorch-fid/releases). Nothing is downloaded here:
   the user gives the file to `load_fid_inception`, which reads it with
   `torch.load(weights_only=True)` (no code in the file can run) or from `.safetensors`, and
   checks every key and shape before loading.
3. Input: images in [-1, 1] are taken to [0, 1], rounded to 8-bit levels as a PNG would store
   them (`quantize=True`, the convention of `images.to_uint8`: pytorch-fid reads image files),
   resized to 299 x 299 bilinearly with align_corners=False and no antialiasing (what
   pytorch-fid's `F.interpolate` call does), then mapped to [-1, 1] for the network. Grey images
   are repeated to three channels.

    net = load_fid_inception("pt_inception-2015-12-05-6726825d.pth", device="cuda")
    score = fid(samples, "cifar10_train_stats.npz", net)   # or real images, or (mu, sigma)

Reference statistics in pytorch-fid's `.npz` format (arrays `mu` and `sigma`) are read and
written by `load_fid_statistics` / `save_fid_statistics`. The distance itself is
`metrics.frechet_distance` on `metrics.feature_statistics`. FID is biased upwards at small N:
compare numbers computed with the same N (50,000 samples is the usual choice).
"""

from __future__ import annotations

import functools
import io
import pickle
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import feature_statistics, frechet_distance

STANDARD_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SOURCE = "https://github.com/mseitzer/pytorch-fid/releases (release fid_weights)"
INPUT_SIZE = 299  # the TF graph's input resolution
FEATURE_DIM = 2048  # pool3: channels of Mixed_7c after the global average pool
NUM_CLASSES = 1008  # the TF 2015-12-05 graph's classifier size (1000 ImageNet classes + 8 unused)
PARAMETER_COUNT = 27_161_264 - 3_326_696 + 8 * (FEATURE_DIM + 1)  # = 23,850,960, see the docstring


# -- the network -----------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001, the TF graph's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool3x3(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The 3x3 stride-1 pool of an Inception block's pool branch, spatial size kept.

    "avg" averages the in-image values only (count_include_pad=False, as TF does; torchvision
    counts the padded zeros). "max" is Mixed_7c's pool in the FID graph."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1; out 224 + pool_features."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_pool3x3(x, "avg"))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2; out 384 + 96 + cin."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convolutions (1x7 and 7x1); out 768."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        h, v = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **h)
        self.branch7x7_3 = BasicConv2d(c7, 192, **v)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **v)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **h)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **v)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **h)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        bp = self.branch_pool(_pool3x3(x, "avg"))
        return torch.cat([self.branch1x1(x), b7, d, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2; out 320 + 192 + cin."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3 / 3x1 outputs; out 2048. `pool` is the pool
    branch's kind: "avg" for Mixed_7b, "max" for Mixed_7c in the FID graph."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        h, v = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, **h)
        self.branch3x3_2b = BasicConv2d(384, 384, **v)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **h)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **v)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        bp = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([self.branch1x1(x), b3, b3d, bp], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (see the module docstring). Build it, then load the weights with
    `load_fid_inception`; a bare instance has random weights (for tests only).

    forward(x): network input (N, 3, 299, 299) in [-1, 1] -> pool3 features (N, 2048).
    features(images): any (N, C, H, W) images in [-1, 1], C in {1, 3} -> (N, 2048) float32 on
    the CPU, batched, without autograd: what FID uses.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # kept so the standard file loads unchanged
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (N, 2048): pool3, the global average pool

    def preprocess(self, images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """(N, C, H, W) images -> the network input (N, 3, 299, 299) in [-1, 1], on the weights'
        device and in their dtype.

        Float images are in [-1, 1]; uint8 images in [0, 255] are taken as they are."""
        x01 = _to_unit_range(images, quantize).to(self.fc.weight)  # (N, C, H, W) in [0, 1], weights' dtype
        if x01.shape[1] == 1:
            x01 = x01.expand(-1, 3, -1, -1)  # grey -> RGB
        if x01.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x01 = F.interpolate(x01, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                                antialias=False)  # pytorch-fid's resize, done in [0, 1] as it does
        return 2.0 * x01 - 1.0

    @torch.no_grad()
    def features(self, images, batch_size: int = 50, quantize: bool = True) -> torch.Tensor:
        """pool3 features (N, 2048), float32 on the CPU (float64 for a float64 network), in eval
        mode, `batch_size` images at a time. On Ampere and newer GPUs, PyTorch runs cuDNN
        convolutions in TF32 by default (so does pytorch-fid); set
        torch.backends.cudnn.allow_tf32 = False for full fp32.

        images: a tensor (N, C, H, W) (float in [-1, 1] or uint8 in [0, 255], C = 1 or 3) or an
        iterable of such batches. quantize: round float images to 8 bits first, as saving them as
        PNG would (see the module docstring)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was = self.training
        self.eval()
        out = []
        try:
            for batch in _batches(images, batch_size):
                h = self(self.preprocess(batch, quantize))  # (B, 2048)
                out.append(h.cpu() if h.dtype == torch.float64 else h.float().cpu())
        finally:
            self.train(was)
        if not out:
            raise ValueError("no images given; pass a tensor (N, C, H, W) with N >= 1")
        return torch.cat(out)  # (N, 2048)


def _to_unit_range(images: torch.Tensor, quantize: bool) -> torch.Tensor:
    """Check (N, C, H, W), C in {1, 3}, and map to float32 [0, 1] (8-bit levels if quantize)."""
    from .images import to_uint8

    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}; "
                         "channels-last arrays (N, H, W, C) need .permute(0, 3, 1, 2)")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1] or uint8 in [0, 255], got dtype {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("images contain NaN or inf; check the sampler's output before computing FID")
    if lo < -2.0 or hi > 2.0:
        raise ValueError(f"float images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                         "images in [0, 255] need x / 127.5 - 1 (or pass them as uint8)")
    if quantize:
        return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 255.0
    return (images.float() + 1.0) / 2.0


def _batches(images, batch_size: int):
    if isinstance(images, (torch.Tensor, np.ndarray)):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:  # an iterable of batches (e.g. a DataLoader or a generator of sampled images)
        for batch in images:
            yield from _batches(batch if isinstance(batch, (torch.Tensor, np.ndarray)) else batch[0], batch_size)


# -- loading user-provided weights ------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if suffix not in (".pth", ".pt"):
        raise ValueError(f"unsupported weights file {str(path)!r}: give a .pth/.pt state dict or a .safetensors "
                         f"file (the standard FID weights are {STANDARD_WEIGHTS})")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # torch names the first disallowed callable
        reason = f" (it calls {found.group(1)})" if found else ""
        raise ValueError(
            f"refusing to load {str(path)!r}: it is a pickle that needs arbitrary Python objects or code to "
            f"load{reason}, which could run anything on this machine. Give a plain state dict "
            "(torch.save(model.state_dict(), path)) or a .safetensors file; the standard "
            f"{STANDARD_WEIGHTS} is a plain state dict") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} is not a state dict (a dict of tensors) but a {type(obj).__name__}; "
                         "save the weights with torch.save(model.state_dict(), path)")
    return obj


def _list(keys, limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}


def check_fid_state_dict(state: dict, what: str = "the weights") -> None:
    """Raise ValueError listing every missing, unexpected and mis-shaped key of `state` against
    the FID Inception's own state dict. BatchNorm `num_batches_tracked` counters may be absent
    (files saved before PyTorch 0.4.1 lack them; they do not affect eval-mode outputs)."""
    expected = _expected_shapes()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
              for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{what} do not fit the FID Inception-v3:"]
    if missing:
        lines.append(f"  missing keys: {_list(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_list(unexpected)}")
    if shapes:
        lines.append(f"  wrong shapes: {_list(shapes, 4)}")
    fc = state.get("fc.weight")
    if fc is not None and tuple(fc.shape) == (1000, FEATURE_DIM):
        lines.append("  (a 1000-class fc: these look like torchvision's ImageNet Inception-v3, which gives "
                     "different, non-standard FIDs)")
    lines.append(f"The standard FID weights are {STANDARD_WEIGHTS} from {WEIGHTS_SOURCE}; this machine "
                 "cannot download them: fetch the file elsewhere and pass its path.")
    raise ValueError("\n".join(lines))


def load_fid_inception(path, device="cpu") -> FIDInceptionV3:
    """The FID Inception-v3 with weights from `path` (.pth/.pt state dict read with
    weights_only=True, or .safetensors), checked key by key, in eval mode on `device`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no weights file at {str(path)!r}; the standard FID weights are {STANDARD_WEIGHTS} from "
            f"{WEIGHTS_SOURCE} (they cannot be downloaded from this machine: copy the file here)")
    state = _read_state_dict(path)
    check_fid_state_dict(state, what=f"the weights in {str(path)!r}")
    full = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 files run in fp32
    for k in _expected_shapes():
        if k.endswith("num_batches_tracked") and k not in full:
            full[k] = torch.zeros((), dtype=torch.long)  # older files lack the counter; unused in eval mode
    with torch.device("meta"):
        model = FIDInceptionV3()  # no random initialisation of 24M parameters only to overwrite them
    model.load_state_dict(full, strict=True, assign=True)
    return model.requires_grad_(False).to(device).eval()


# -- FID -------------------------------------------------------------------------------------------
def fid_statistics(images, extractor: FIDInceptionV3, batch_size: int = 50,
                   quantize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu (2048,), sigma (2048, 2048)) in float64 of the pool3 features of `images` (N >= 2)."""
    return feature_statistics(extractor.features(images, batch_size=batch_size, quantize=quantize))


def load_fid_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz with arrays `mu` and `sigma` (pytorch-fid's format). No pickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no statistics file at {str(path)!r}; write one with save_fid_statistics "
                                "(or pytorch-fid's --save-stats)")
    try:
        f = np.load(path, allow_pickle=False)  # a pickle is refused, never run
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"cannot read FID statistics from {str(path)!r} ({e}); give an .npz with arrays 'mu' "
                         "and 'sigma' (save_fid_statistics, or pytorch-fid's --save-stats)") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{str(path)!r} is a single array, not an .npz with arrays 'mu' and 'sigma'; "
                         "write the statistics with save_fid_statistics")
    with f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{str(path)!r} holds {sorted(f.files)}, not the arrays 'mu' and 'sigma' of "
                             "FID statistics; write them with save_fid_statistics")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def save_fid_statistics(path, mu, sigma) -> Path:
    """Write (mu, sigma) as an .npz with arrays `mu` and `sigma` (pytorch-fid's format), atomically."""
    from .files import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    return atomic_write_bytes(path, buf.getvalue())


def fid(images_a, images_b, extractor: FIDInceptionV3, batch_size: int = 50, quantize: bool = True) -> float:
    """FID between images_a and images_b, each >= 2 images (N, C, H, W) in [-1, 1] (or uint8), or
    given as reference statistics: a (mu, sigma) pair or the path of an .npz holding them."""

    def stats(x):
        if isinstance(x, (str, Path)):
            return load_fid_statistics(x)
        if isinstance(x, tuple) and len(x) == 2 and np.ndim(x[0]) == 1 and np.ndim(x[1]) == 2:
            return x  # (mu (D,), sigma (D, D))
        return fid_statistics(x, extractor, batch_size, quantize)

    return frechet_distance(*stats(images_a), *stats(images_b))
