"""What every benchmark script shares: the machine's name, result paths, wall-clock medians."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """The facts a reader needs to weigh a number: processor, cores, GPU, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "logical_cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": str(_dt.date.today()),
    }
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def machine_tag(info: dict) -> str:
    """A short file-name-safe name of the machine: the GPU's, else '<cores>core-<cpu>'."""
    name = info["gpu"] or f"{info['cores']}core-{info['cpu']}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:48]


def result_path(stem: str, info: dict, suffix: str = ".json") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{stem}-{machine_tag(info)}-{info['date']}{suffix}"


def write_json(path: Path, obj) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    return path


def wall_median(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn() over `reps` runs after `warmup` (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of rows (dicts) restricted to columns."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
