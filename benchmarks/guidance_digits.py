"""Classifier-free guidance on the bundled class-conditional model (issue 16): per guidance scale w,
how often the project's digits classifier agrees with the requested class, and FD-digits.

    python -m benchmarks.guidance_digits                 # 500 samples per scale, DDIM-20 (the README table)
    python -m benchmarks.guidance_digits --quick         # 20 samples, 4 steps: the script runs (a test)

Sample i asks for class i % 10 (50 per class at n=500), seed 0, with guidance w: m = m_u + w (m_c - m_u)
from one network call on [null label; class] (w = 0: the unconditional branch alone, w = 1: the
conditional branch alone, as issue 16 defines them). Every scale uses the same x_T and noise (a
sample's noise depends only on (seed, index)). FD-digits is against the digits test split, at the same
N for every row. Writes JSON under benchmarks/results/ and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import ddim_fast as dd
from ddim_fast.files import atomic_write_bytes
from ddim_fast.metrics import fd_digits, load_digits_classifier

SCALES = (0.0, 1.0, 2.0, 4.0)
RESULTS = Path(__file__).parent / "results"


def measure(n=500, steps=20, scales=SCALES, seed=0, batch=250, backend="auto") -> dict:
    model = dd.load_model("digits-cond")
    plan = dd.SamplingPlan.for_model(model, steps)
    eng = dd.Engine(model, plan, backend=backend, device="cpu")
    clf = load_digits_classifier()
    k = model.config.num_classes
    labels = torch.arange(n) % k
    rows = []
    for w in scales:
        t0 = time.perf_counter()
        imgs = torch.cat([eng.sample(min(batch, n - lo), seed=seed, first_index=lo,
                                     cond={"class_labels": labels[lo:lo + batch]}, guidance=w)
                          for lo in range(0, n, batch)])
        secs = time.perf_counter() - t0
        _, pred = clf.predict(imgs)
        per_class = [float((pred[labels == c] == c).float().mean()) for c in range(k)]
        rows.append({"guidance": w, "agreement": float((pred == labels).float().mean()),
                     "agreement_per_class": per_class, "fd_digits": fd_digits(imgs, clf),
                     "seconds": round(secs, 2)})
        print(f"w={w:g}: agreement {rows[-1]['agreement']:.2%}, FD-digits {rows[-1]['fd_digits']:.2f} "
              f"({secs:.1f} s)", flush=True)
    return {"model": "digits-cond", "n": n, "steps": steps, "seed": seed, "plan": plan.describe(),
            "backend": eng.backend, "machine": _machine(), "date": time.strftime("%Y-%m-%d"),
            "torch_threads": torch.get_num_threads(), "rows": rows}


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {platform.system()}"


def table(result: dict) -> str:
    lines = ["| guidance w | classifier agrees with the requested class | FD-digits |", "|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['guidance']:g} | {100 * r['agreement']:.1f}% | {r['fd_digits']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20 samples, 4 steps (checks the script runs)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/guidance-digits-DATE.json)")
    args = p.parse_args(argv)
    n, steps = (20, 4) if args.quick else (args.n, args.steps)
    result = measure(n=n, steps=steps, backend=args.backend)
    out = Path(args.out) if args.out else RESULTS / f"guidance-digits-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(result, indent=1).encode())
    print(table(result))
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
