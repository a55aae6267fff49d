"""The on-disk cache of exported graphs, and the content fingerprints that key it (model_fingerprint lives in
ddim_fast/fingerprint.py, shared with plan files; re-exported here).

Folder: $DDIM_FAST_CACHE/onnx (default ~/.cache/ddim-fast/onnx, or $XDG_CACHE_HOME/ddim-fast/onnx).
Size: at most $DDIM_FAST_CACHE_MAX_MB megabytes (default CACHE_MAX_MB); after each write the least
recently used files go first (a cache hit counts as a use), never the file just written. An
unwritable cache is not an error: one warning, and this process keeps its exports in a temporary
folder (the next command exports again). timings.json there records the last few exports (seconds,
parameters, exporter), for export_estimate_s.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..files import atomic_write_bytes
from ..fingerprint import model_fingerprint  # noqa: F401  (moved to a low module; still part of this API)
from ..plan import SamplingPlan

CACHE_MAX_MB = 2048  # default size limit of the cache ($DDIM_FAST_CACHE_MAX_MB)
# What a first export of a network costs (the TorchScript export and its check against the float64
# reference), before one was measured on this machine: BASE + PER_MPARAM x (millions of parameters).
# NOTE: measured on the 2-core VM at load averages of 2.7-3.0 (benchmarks/first_result.py, cold; docs/DESIGN.md,
# "The backend rule"): the digits UNet (1.1M parameters) 2.1-2.8 s, the CIFAR-10 UNet (35.7M) 9.1-9.4 s.
EXPORT_BASE_S = 2.3
EXPORT_S_PER_MPARAM = 0.19
TIMINGS_KEPT = 8  # exports remembered in timings.json

def cache_dir() -> Path:
    """Where exported graphs are kept: $DDIM_FAST_CACHE/onnx, default ~/.cache/ddim-fast/onnx."""
    root = os.environ.get("DDIM_FAST_CACHE")
    if root:
        return Path(root).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ddim-fast" / "onnx"


def cache_limit_bytes() -> int:
    """The cache's size limit: $DDIM_FAST_CACHE_MAX_MB megabytes, default CACHE_MAX_MB. Checked whenever the
    cache is used (lookup, store) and by the command line at start-up: a value that is not a number >= 0 is
    one ValueError naming the variable and the fix, before any export."""
    raw = os.environ.get("DDIM_FAST_CACHE_MAX_MB")
    fix = f"set it to a number of megabytes >= 0 (e.g. {CACHE_MAX_MB}, the default) or unset it"
    try:
        mb = float(raw) if raw is not None and raw.strip() else CACHE_MAX_MB
    except ValueError:
        raise ValueError(f"DDIM_FAST_CACHE_MAX_MB must be a number of megabytes, got {raw!r}; {fix}") from None
    if not (mb >= 0 and mb != float("inf")):
        raise ValueError(f"DDIM_FAST_CACHE_MAX_MB must be a number of megabytes >= 0, got {raw!r}; {fix}")
    return int(mb * 2**20)


def prune_cache(keep: Path | None = None) -> list[Path]:
    """Delete the least recently used .onnx files of cache_dir() until it fits cache_limit_bytes()
    (never `keep`). Returns what was deleted."""
    folder = cache_dir()
    files = []
    for path in folder.glob("*.onnx"):
        try:
            st = path.stat()
        except OSError:
            continue  # removed meanwhile by another process
        files.append((st.st_mtime, st.st_size, path))
    total, limit, gone = sum(size for _, size, _ in files), cache_limit_bytes(), []
    for _, size, path in sorted(files):
        if total <= limit:
            break
        if keep is not None and path == keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        gone.append(path)
    return gone


_fallback = {}  # "dir": this process's temporary folder once the cache proved unwritable


def store(path: Path, data: bytes) -> Path:
    """Write a cache entry atomically and prune the cache; where the cache cannot be written, say so
    once and keep the entry in a temporary folder for this process."""
    cache_limit_bytes()  # a bad limit is refused before anything is written
    if "dir" not in _fallback:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            prune_cache(keep=path)
            return path
        except OSError as e:
            folder = tempfile.mkdtemp(prefix="ddim-fast-onnx-")
            atexit.register(shutil.rmtree, folder, True)
            _fallback["dir"] = Path(folder)
            warnings.warn(f"the ONNX cache {cache_dir()} cannot be written ({type(e).__name__}: "
                          f"{e.strerror or e}); exports are kept in a temporary folder for this process only, so the "
                          "next command exports again: set DDIM_FAST_CACHE to a writable folder", stacklevel=4)
    return atomic_write_bytes(_fallback["dir"] / path.name, data)


def lookup(path: Path) -> Path | None:
    """The cached file for `path` (in the cache, or this process's fallback folder), marked as used."""
    cache_limit_bytes()  # the first use of the cache in a process (every export looks up first): a bad limit stops it
    for candidate in (path, _fallback["dir"] / path.name if "dir" in _fallback else None):
        if candidate is not None and candidate.is_file():
            try:
                os.utime(candidate)  # least recently used goes first when pruning
            except OSError:
                pass
            return candidate
    return None


def default_export_s(params: int) -> float:
    """The export's cost by the default model (EXPORT_BASE_S, EXPORT_S_PER_MPARAM)."""
    return EXPORT_BASE_S + EXPORT_S_PER_MPARAM * params / 1e6


def _timings() -> list:
    try:
        records = json.loads((cache_dir() / "timings.json").read_text())["exports"]
        return [r for r in records if float(r["seconds"]) > 0 and int(r["params"]) > 0]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # none yet, an older file ({"torch_export_s": ...}), or a damaged one


def export_estimate_s(params: int | None = None) -> float:
    """Seconds a first export of a network of `params` parameters (default: the bundled digits model's
    1.1M) takes here: the torch export and its check against the reference. The default model
    (default_export_s) scaled by this machine's speed: the median ratio of the TorchScript exports
    recorded in timings.json to what the model predicted for them."""
    params = 1_112_801 if params is None else params
    ratios = sorted(float(r["seconds"]) / default_export_s(int(r["params"])) for r in _timings()
                    if r.get("exporter") == "torchscript")
    factor = ratios[len(ratios) // 2] if ratios else 1.0
    return factor * default_export_s(params)


def record_export_time(seconds: float, params: int = 0, exporter: str = "torchscript"):
    """Add an export (its seconds, the network's parameter count, the exporter) to timings.json."""
    path = cache_dir() / "timings.json"
    records = _timings()[-(TIMINGS_KEPT - 1):] + [{"exporter": exporter, "seconds": round(seconds, 2),
                                                   "params": int(params), "when": int(time.time())}]
    try:
        atomic_write_bytes(path, json.dumps({"exports": records}, indent=1).encode())
    except OSError:
        pass  # an unwritable cache has already said so


def plan_fingerprint(plan: SamplingPlan) -> str:
    h = hashlib.sha256(json.dumps(plan.describe(), sort_keys=True).encode())
    h.update(plan.coef.to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()
