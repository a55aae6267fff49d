"""Image and array files in and out: grids, folders of PNGs, .npz archives (writes are atomic).
Drawing a model's samples into a grid is sample_grid.py, one layer up.

Images are float tensors (N, C, H, W) in [-1, 1]; C is 1 (grey) or 3 (RGB).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write_bytes, check_creatable, check_writable_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # read as inputs
# Written as a grid: the format its suffix names. JPEG and WebP are written at high quality / lossless.
GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
MANIFEST = "manifest.json"  # the one metadata file of every output folder
SEPARATOR = 128  # grid separators in mid grey: visible on black backgrounds (digits) and on white


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, *, scale: int = 1,
               pad_value: int = SEPARATOR):
    """A PIL image of images (N, C, H, W) in [-1, 1] tiled in rows of `nrow`, `pad` px apart on a
    `pad_value` grey background, then enlarged `scale` times (nearest neighbour: pixels stay sharp)."""
    from PIL import Image

    from .checks import is_int

    if not is_int(scale) or not 1 <= scale <= 64:
        raise ValueError(f"scale must be an int in [1, 64], got {scale!r}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i, im in enumerate(to_uint8(images)):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = im
    if scale > 1:
        grid = grid.repeat(int(scale), axis=0).repeat(int(scale), axis=1)
    return Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")


def png_bytes(im) -> bytes:
    return image_bytes(im, ".png")


def image_bytes(im, suffix: str) -> bytes:
    """The bytes of a PIL image in the format `suffix` names (GRID_FORMATS)."""
    fmt = GRID_FORMATS.get(suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write a {suffix or 'suffix-less'} image; use one of {', '.join(GRID_FORMATS)}")
    buf = io.BytesIO()
    options = {"JPEG": {"quality": 95, "subsampling": 0}, "WEBP": {"lossless": True}}.get(fmt, {})
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def single_image(image: torch.Tensor):
    """A PIL image of one (C, H, W) tensor in [-1, 1]."""
    from PIL import Image

    arr = to_uint8(image[None])[0]
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, mode="L" if arr.shape[-1] == 1 else "RGB")


def output_kind(out) -> str:
    """'grid' for an image suffix (GRID_FORMATS: .png, .jpg, ...), 'npz' for *.npz, else 'folder'
    (one PNG per image)."""
    suffix = Path(out).suffix.lower()
    if suffix in GRID_FORMATS:
        return "grid"
    if suffix == ".npz":
        return "npz"
    if suffix:
        raise ValueError(f"cannot write {out}: use a grid image ({', '.join(GRID_FORMATS)}), a .npz archive or a "
                         "folder name without suffix")
    return "folder"


def check_output(out, overwrite: bool) -> Path:
    """Refuse to replace what a user wrote unless asked to; check the output can be written: its folder
    exists (only an output folder itself is created, never the folders above it) and is writable."""
    out = Path(out)
    kind = output_kind(out)
    if out.exists() and (kind == "folder") != out.is_dir():
        what = "a file, not a folder" if kind == "folder" else "a folder, not a file"
        raise FileExistsError(f"{out} is {what}; remove it or choose another output path")
    if out.exists() and not overwrite:
        if kind != "folder" or any(out.iterdir()):
            raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    if kind == "folder" and out.is_dir():
        check_writable_folder(out)
    else:
        check_creatable(out)
    return out


def save_images(images: torch.Tensor, out, *, overwrite: bool = False, indices=None, meta: dict | None = None,
                nrow: int | None = None, scale: int = 1, names=None) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as a grid image (the format its suffix names), a folder
    of PNGs or an .npz archive. An output folder is created, but not the folders above an output (like
    mkdir without -p: a missing one is refused, see check_output).

    indices: the global sample index of each image (folder file names, npz 'indices').
    meta: JSON-able facts (model, plan, seed) stored in the npz / a folder's manifest.json.
    scale: grid only, each pixel enlarged scale x scale.
    names: folder only, the file stem of each image (e.g. the names `encode` stored) instead of its
    index; names that are not safe, distinct file names fall back to the indices.
    """
    out = check_output(out, overwrite)
    kind = output_kind(out)
    idx = list(range(len(images))) if indices is None else [int(i) for i in indices]
    if kind == "folder":
        out.mkdir(exist_ok=True)
    if kind == "grid":
        atomic_write_bytes(out, image_bytes(image_grid(images, nrow=nrow, scale=scale), out.suffix))
    elif kind == "npz":
        buf = io.BytesIO()
        np.savez(buf, images=images.detach().float().cpu().numpy(), indices=np.asarray(idx, dtype=np.int64),
                 meta=np.asarray(json.dumps(meta or {})))
        atomic_write_bytes(out, buf.getvalue())
    else:
        stems = names if names is not None and safe_names(names, len(images)) else [f"{i:06d}" for i in idx]
        for stem, im in zip(stems, images):
            atomic_write_bytes(out / f"{stem}.png", png_bytes(single_image(im)))
        if meta is not None:
            atomic_write_bytes(out / MANIFEST, json.dumps(meta, indent=1).encode())
    return out


def safe_names(names, n: int) -> bool:
    """Whether `names` are n distinct file stems that stay inside a folder (no separators, no dot first)."""
    if not isinstance(names, (list, tuple)) or len(names) != n or len(set(names)) != n:
        return False
    return all(isinstance(s, str) and s and s[0] != "." and "/" not in s and "\\" not in s and "\0" not in s
               and len(s) < 200 for s in names)


def load_images(path, channels: int, resolution: int, *, changes: list | None = None
                ) -> tuple[torch.Tensor, list[str]]:
    """Images from a file, a folder of images or an .npz ('images' in [-1, 1]) as (N, C, R, R).
    changes: a list that receives one line per image that had to be converted (colour mode),
    centre-cropped to a square or resized to fit the model."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        x, names = load_npz(path, "images"), None
        names = [f"{i:06d}" for i in range(len(x))]
    else:
        files = image_files(path)
        x = torch.stack([_read_image(f, channels, resolution, changes) for f in files])
        names = [f.stem for f in files]
    if x.ndim != 4 or x.shape[1:] != (channels, resolution, resolution):
        raise ValueError(f"{path} holds images of shape {tuple(x.shape[1:])}; the model wants "
                         f"({channels}, {resolution}, {resolution})")
    return x, names


def image_files(path) -> list[Path]:
    """The image files at `path` (one file, or a folder's files with an image suffix, sorted); one clear
    error when there are none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no images at {path}: check the path")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_npz(path, key: str) -> torch.Tensor:
    """One finite float array from an .npz, refusing pickled objects and damaged files clearly."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .npz file at {path}: check the path")
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle anything that is not a zip
        with open(path, "rb") as fh:
            pickled = fh.read(1) == b"\x80"  # the PROTO opcode that starts every modern pickle
        if pickled:
            raise ValueError(f"{path} is a pickle, which is never loaded (it can run code): save plain arrays "
                             "with numpy.savez")
        raise ValueError(f"{path} is not an .npz archive (damaged, truncated or another format): "
                         "give the .npz that ddim-fast wrote, or recreate it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            files = f.files
            arr = f[key] if key in files else None
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise ValueError(f"{path} holds pickled objects, which are never loaded: save plain arrays") from None
        raise _damaged_npz(path, e) from None
    except Exception as e:  # numpy's header parser also raises SyntaxError, tokenize errors, zip errors...
        raise _damaged_npz(path, e) from None
    if arr is None:
        raise ValueError(f"{path} has no {key!r} array (it has {sorted(files)})")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: {key!r} must be a float array, got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: {key!r} holds NaN or inf values; recreate the file from finite data")
    return torch.from_numpy(arr.astype(np.float32))


def load_npz_meta(path) -> dict:
    """The JSON 'meta' entry that ddim-fast stores in its .npz files ({} when absent or unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "meta" not in f.files:
                return {}
            meta = json.loads(str(f["meta"]))
    except Exception:  # the arrays were checked by load_npz; a bad meta entry only loses the names
        return {}
    return meta if isinstance(meta, dict) else {}


def _damaged_npz(path, err) -> ValueError:
    return ValueError(f"{path} is not a readable .npz archive ({type(err).__name__}: {err}); the file is damaged: "
                      "recreate it")


def _read_image(path: Path, channels: int, resolution: int, changes: list | None = None) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = "L" if channels == 1 else "RGB"
            done = []
            if im.mode != mode:
                done.append(f"converted from {im.mode} to {mode}")
            im = im.convert(mode)
            if im.size != (resolution, resolution):
                from .data import center_crop_resize

                w, h = im.size
                if w != h:
                    done.append(f"centre-cropped from {w}x{h} to {min(w, h)}x{min(w, h)}")
                if min(w, h) != resolution:
                    done.append(f"resized from {min(w, h)}x{min(w, h)} to {resolution}x{resolution}")
                im = center_crop_resize(im, resolution)
            if done and changes is not None:
                changes.append(f"{path.name}: {', '.join(done)}")
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e}); the file is damaged or not an image") from None
    except Image.DecompressionBombError as e:  # a header claiming billions of pixels: never decoded
        raise ValueError(f"{path} is refused: {e} Give an image of ordinary size") from None
    t = torch.from_numpy(arr / 127.5 - 1.0)
    return t[None] if channels == 1 else t.permute(2, 0, 1)
