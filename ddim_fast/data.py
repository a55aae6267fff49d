"""Datasets for the reference trainer: images as float32 tensors in [-1, 1], shape (C, H, W).

`load_dataset(spec, resolution, channels)` understands these specs:

    digits          scikit-learn's bundled 8x8 handwritten digits (1797 images, offline),
                    upsampled to `resolution`. Never flipped: a mirrored 2, 3, 4, 5, 6, 7 or 9
                    is not that digit any more (flip_ok = False).
    folder:PATH     every image file under PATH (recursive), read with Pillow, center-cropped
                    to a square and resized. Flipped at random during training (flip_ok = True).
                    Labelled when every image sits in a sub-folder of PATH (PATH/CLASS/...,
                    torchvision's ImageFolder layout): the label is the index of CLASS among
                    the sorted names of the sub-folders that hold images. Any image directly
                    in PATH: no labels.
    cifar10:PATH    the CIFAR-10 "python version" batches in PATH (the cifar-10-batches-py
                    folder or its parent). The files are pickles, so they are read with a
                    restricted unpickler that only rebuilds numpy arrays and plain containers;
                    anything else is refused before it runs.
    synthetic[:N]   N (default 256) deterministic smooth random images, for tests.

Every dataset has `flip_ok` (whether a horizontal flip keeps an image in the data
distribution), `name`, `labels` (a LongTensor (N,), or None when the data has no labels) and
`classes` (the name of each label, or None): what the trainer's class-conditional models learn.
scikit-learn is an optional dependency (the "train" extra); it is imported only for `digits`.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPECS = "digits, synthetic[:N], folder:PATH or cifar10:PATH"
SPLITS = ("train", "test", "all")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DIGITS_TEST_FRACTION = 0.2  # held out for the classifier's accuracy and for FD-digits
DIGITS_SPLIT_SEED = 0  # fixed: the split is part of the data, not of a run
DIGITS_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class TensorImages(torch.utils.data.Dataset):
    """A dataset held in memory: images (N, C, H, W) float32 in [-1, 1]."""

    def __init__(self, images: torch.Tensor, *, name: str, flip_ok: bool, labels=None, classes=None):
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
        self.images = images.float().contiguous()  # (N, C, H, W)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.classes = None if labels is None or classes is None else tuple(classes)
        self.name = name
        self.flip_ok = flip_ok

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i) -> torch.Tensor:
        return self.images[i]  # (C, H, W)


class FolderImages(torch.utils.data.Dataset):
    """Image files decoded on access (center crop + resize), so a large folder costs no memory."""

    def __init__(self, files: list[Path], resolution: int, channels: int, *, name: str, labels=None,
                 classes=None):
        self.files = files
        self.resolution = resolution
        self.mode = "RGB" if channels == 3 else "L"
        self.name = name
        self.flip_ok = True
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)  # (N,)
        self.classes = None if labels is None or classes is None else tuple(classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                im = center_crop_resize(im.convert(self.mode), self.resolution)
                a = np.asarray(im, dtype=np.float32)  # (H, W) or (H, W, 3), 0..255
        except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
            raise ValueError(f"{self.files[i]} is not a readable image ({e}); remove or replace it "
                             f"in the dataset folder") from None
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0  # (C, H, W)


# -- the entry point -------------------------------------------------------------------------------
def load_dataset(spec: str, resolution: int, channels: int, *, split: str = "train"):
    """The dataset named by `spec` (see the module docstring) at `resolution` with `channels`.

    split: "train" (default), "test" or "all"; only digits and cifar10 have a test split.
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a dataset spec must be a non-empty string: {SPECS}")
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        images, labels = load_digits(resolution, split=split)
        return TensorImages(_to_channels(images, channels), name="digits", flip_ok=False, labels=labels,
                            classes=DIGITS_CLASSES)
    if kind == "synthetic":
        n = _parse_count(arg, spec)
        return TensorImages(synthetic_images(n, resolution, channels), name=spec, flip_ok=True)
    if kind == "folder" and arg:
        if split == "test":
            raise ValueError("a folder dataset has no test split; use split='train' or 'all'")
        return _folder(arg, resolution, channels)
    if kind == "cifar10" and arg:
        images, labels = load_cifar10(arg, split=split)
        images = _resize(images, resolution)
        return TensorImages(_to_channels(images, channels), name="cifar10", flip_ok=True, labels=labels,
                            classes=CIFAR10_CLASSES)
    if kind in ("folder", "cifar10"):
        raise ValueError(f"dataset spec {spec!r} needs a path: write {kind}:PATH")
    raise ValueError(f"unknown dataset spec {spec!r}; use {SPECS}")


def _parse_count(arg: str, spec: str) -> int:
    if not arg:
        return 256
    try:
        n = int(arg)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"dataset spec {spec!r}: the count after 'synthetic:' must be a positive int")
    return n


# -- digits ----------------------------------------------------------------------------------------
def load_digits(resolution: int, *, split: str = "train"):
    """scikit-learn's 8x8 digits as ((N, 1, R, R) float32 in [-1, 1], (N,) long labels).

    The 0..16 intensities map linearly to [-1, 1]; 8x8 is upsampled bilinearly to R x R. The
    train/test split is a fixed 80/20 shuffle (seed DIGITS_SPLIT_SEED), the same for everyone.
    """
    from .checks import require

    require("sklearn.datasets", "train", "the digits dataset (scikit-learn's)")
    from sklearn.datasets import load_digits as _sk_load_digits
    d = _sk_load_digits()
    images = torch.from_numpy(d.images.astype(np.float32))[:, None] / 8.0 - 1.0  # (N, 1, 8, 8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
    pick = {"train": order[n_test:], "test": order[:n_test], "all": torch.arange(len(labels))}[split]
    images, labels = images[pick], labels[pick]
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return images.clamp(-1.0, 1.0), labels


# -- synthetic -------------------------------------------------------------------------------------
def synthetic_images(n: int, resolution: int, channels: int, seed: int = 0) -> torch.Tensor:
    """n smooth images with structure a network can learn: one soft disc each, random centre,
    radius and colour, on a dark background. (n, C, R, R) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2  # (n, 2) in [0.2, 0.8]
    radius = torch.rand(n, 1, 1, generator=g) * 0.2 + 0.15  # (n, 1, 1)
    colour = torch.rand(n, channels, 1, 1, generator=g) * 1.5 + 0.5  # (n, C, 1, 1) brightness
    u = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution  # (R,)
    dy = u[None, :, None] - centre[:, 0, None, None]  # (n, R, 1)
    dx = u[None, None, :] - centre[:, 1, None, None]  # (n, 1, R)
    d2 = dy**2 + dx**2  # (n, R, R)
    disc = torch.sigmoid((radius - d2.sqrt()) * resolution * 2)  # (n, R, R), soft edge ~1 px
    return (disc[:, None] * colour - 1.0).clamp(-1.0, 1.0)  # (n, C, R, R)


# -- folder ----------------------------------------------------------------------------------------
def _folder(path: str, resolution: int, channels: int) -> FolderImages:
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"dataset folder {str(root)!r} does not exist; check the path after 'folder:'"
        )
    if not root.is_dir():
        raise NotADirectoryError(
            f"{str(root)!r} is a file; folder:PATH needs a folder of images (write folder:{root.parent})"
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(
            f"no images in {str(root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)} recursively); "
            "point folder:PATH at a folder that holds image files"
        )
    # One sub-folder per class when no image sits directly in the root (ImageFolder's layout).
    tops = [f.relative_to(root).parts for f in files]
    labels = classes = None
    if all(len(parts) > 1 for parts in tops):
        classes = sorted({parts[0] for parts in tops})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[parts[0]] for parts in tops]
    return FolderImages(files, resolution, channels, name=f"folder:{root}", labels=labels, classes=classes)


def center_crop_resize(im, resolution: int):
    """Crop the largest centred square, then resize it to resolution x resolution (Lanczos when
    shrinking, so that downsampling does not alias; bicubic when enlarging)."""
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    if s == resolution:
        return im
    resample = Image.LANCZOS if s > resolution else Image.BICUBIC
    return im.resize((resolution, resolution), resample=resample)


# -- cifar10 ---------------------------------------------------------------------------------------
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)


def load_cifar10(path: str, *, split: str = "train"):
    """CIFAR-10 python batches -> ((N, 3, 32, 32) float32 in [-1, 1], (N,) long labels)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"CIFAR-10 folder {str(root)!r} does not exist; give cifar10:PATH with the folder that holds "
            "data_batch_1..5 and test_batch (cifar-10-batches-py, extracted from cifar-10-python.tar.gz)"
        )
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = {"train": CIFAR_TRAIN_FILES, "test": CIFAR_TEST_FILES,
             "all": CIFAR_TRAIN_FILES + CIFAR_TEST_FILES}[split]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} lacks the CIFAR-10 batch file(s) {missing}; extract cifar-10-python.tar.gz "
            "and give the cifar-10-batches-py folder"
        )
    images, labels = [], []
    for n in names:
        batch = read_cifar_batch(root / n)
        images.append(batch[0])
        labels.append(batch[1])
    x = torch.from_numpy(np.concatenate(images)).float() / 127.5 - 1.0  # (N, 3, 32, 32)
    return x, torch.from_numpy(np.concatenate(labels))


def read_cifar_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: ((N, 3, 32, 32) uint8, (N,) int64), unpickled with RestrictedUnpickler."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        d = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except ForbiddenGlobal as e:
        raise ValueError(
            f"refused to unpickle {str(path)!r}: {e}. A CIFAR-10 batch holds only numpy arrays and "
            "lists; use the original files from cifar-10-python.tar.gz"
        ) from None
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"{str(path)!r} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
                         "re-extract it from cifar-10-python.tar.gz") from None
    if not isinstance(d, dict):
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 batch (expected a dict, got {type(d).__name__})")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels is None:
        raise ValueError(f"{str(path)!r} lacks the CIFAR-10 'data' (N, 3072) array or the 'labels'")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{str(path)!r}: {data.shape[0]} images but {labels.shape} labels")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels


def _numpy_private(module: str, name: str):
    """numpy's pickle helpers live in numpy._core since numpy 2 and numpy.core before."""
    from importlib import import_module

    try:
        return getattr(import_module(f"numpy._core.{module}"), name)
    except ImportError:  # numpy 1.x
        return getattr(import_module(f"numpy.core.{module}"), name)


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the allow-list; nothing was called."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays, dtypes and plain Python containers.

    Pickle runs whatever callable a file names (`find_class`), so a crafted "dataset" file can
    execute code on load. Dicts, lists, tuples, strings, bytes and numbers need no callable;
    numpy arrays need three (`_reconstruct`, `ndarray`, `dtype`; `_frombuffer` at protocol 5);
    bytes written by Python 3 at protocol 2 need `_codecs.encode`. Every other name raises
    UnpicklingError BEFORE anything is called.
    """

    def find_class(self, module: str, name: str):
        for sub, fn in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer")):
            if name == fn and module in (f"numpy.core.{sub}", f"numpy._core.{sub}"):
                return _numpy_private(sub, fn)
        numpy_home = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")
        if module in numpy_home and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            import _codecs

            return _codecs.encode
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "bytearray", "complex"):
            return {"set": set, "frozenset": frozenset, "bytearray": bytearray, "complex": complex}[name]
        raise ForbiddenGlobal(f"forbidden global {module}.{name} (only numpy arrays are allowed)")


# -- helpers ---------------------------------------------------------------------------------------
def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, channels, H, W): grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution:
        return images
    mode = "bicubic" if resolution > images.shape[-1] else "bilinear"
    out = F.interpolate(images, size=(resolution, resolution), mode=mode, align_corners=False, antialias=True)
    return out.clamp(-1.0, 1.0)


def num_workers_default(dataset) -> int:
    """Loader processes: none for in-memory data (indexing is free), some for decoded files."""
    if isinstance(dataset, FolderImages):
        return min(4, os.cpu_count() or 1)
    return 0
