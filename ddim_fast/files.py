"""Files written atomically, and safetensors read with an error that names the file.

Every file ddim-fast writes (checkpoints, images, .npz, ONNX graphs, manifests, logs) goes
through here: the data is written to a hidden temporary sibling, fsynced and renamed over the
destination, so a crash never leaves a half-written file under the final name and never
damages the file it replaces. A folder (a checkpoint) is assembled under a temporary name and
moved into place the same way (`move_into_place`). Every output is checked before any work
(`check_creatable`): like `mkdir` without `-p`, ddim-fast creates an output (a file, or an output
folder itself) but never the folders above it.

This module sits below everything else in ddim_fast and imports nothing of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a folder, so a rename inside it survives a power loss (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask_mode(base: int) -> int:
    """`base` under the process umask: what open()/mkdir() would have given (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def atomic_write(path, write) -> Path:
    """Call write(tmp_path) on a temporary sibling of `path`, fsync it, then os.replace it over
    `path`. On any error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the user's file, not the temporary sibling it could not create
        raise type(e)(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode(0o666))  # after write(): some writers replace the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary sibling, fsync, os.replace)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path, obj) -> Path:
    """Write `obj` as indented JSON to `path` atomically. Raises ValueError if not JSON-able."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot write {path}: the data is not JSON-able ({e}); "
                         "use plain dicts, lists, strings, ints and finite floats") from None
    return atomic_write_bytes(path, text.encode())


def atomic_save_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Save a dict of tensors to a .safetensors file atomically (copied to CPU, contiguous)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def temporary_folder(path: Path) -> Path:
    """A new empty hidden sibling folder of `path` (mode as mkdir gives) to assemble it in; the folder
    holding `path` must exist (check_creatable)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, umask_mode(0o777))
    return tmp


def writable(folder) -> bool:
    """Whether files can be created in the existing `folder`: os.access, then a real try (a probe file
    created and removed at once), since os.access says yes to root everywhere, /proc included, and knows
    nothing of read-only mounts."""
    if not os.access(folder, os.W_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=".ddim-fast-probe-", suffix=".tmp", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def check_creatable(path) -> Path:
    """That the output `path` (a file, or a folder ddim-fast creates) can be created: the folder that will
    hold it exists and is writable. ddim-fast creates the output itself, never the folders above it
    (like mkdir without -p). One line naming the folder and the fix: NotADirectoryError (a file is in
    the way), FileNotFoundError (the folder is missing) or PermissionError (it cannot be written)."""
    path = Path(path)
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {existing} is a file, not a folder; choose another output path")
    if existing != parent:
        raise FileNotFoundError(f"the folder {parent} does not exist; create it first (ddim-fast creates only the "
                                "output folder itself)")
    check_writable_folder(parent)
    return path


def check_writable_folder(folder) -> None:
    """PermissionError, one line naming `folder` and the fix, unless files can be created in it (writable)."""
    if not writable(folder):
        raise PermissionError(f"cannot write under {folder}: the folder is not writable; choose an output path in a "
                              "writable folder")


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` to `path`. An existing `path` is first renamed aside (to
    `.<name>.old-<hex>`) and only deleted once the new folder is in place (put back if the second
    rename fails)."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_safetensors(path, device="cpu") -> dict:
    """safetensors.torch.load_file with a ValueError naming the file when it is damaged or truncated
    (safetensors raises its own SafetensorError, which says neither which file nor what to do)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it is damaged or truncated: "
                         "re-save or re-download it") from None
