"""The paper's Tables 1 and 2, reproduced on the bundled digits model.

    python -m benchmarks.paper_tables                 # full grid (about 30-60 min on 2 CPU cores)
    python -m benchmarks.paper_tables --quick         # S in {10, 50}, fewer samples: a smoke run
    python -m benchmarks.paper_tables --rows sigma-hat-clip --no-recon --merge OLD.json   # one row, rest kept

Table 1 (sample quality): for S in {10, 20, 50, 100, 1000} and eta in {0, 0.2, 0.5, 1} plus two
sigma-hat rows, N samples of the bundled model scored by FD-digits: the Frechet distance in
the 128-d penultimate features of the project's digits classifier (ddim_fast.metrics), against
the digits test split. Lower is better. FD-digits is not FID: absolute numbers are not
comparable with the paper's CIFAR-10 FIDs, only the trends are, and FD at small N is biased
upwards (every cell uses the same N, so cells compare).

The two sigma-hat rows: "sigma-hat-clip" is the official code's `ddpm_noisy` sampler, the one
behind the paper's sigma-hat column: x0 clamped to [-1, 1] (variance="large", clip_x0=1).
"sigma-hat" is variance="large" alone, without the clamp. The paper's numbers belong to the
clamped row.

Table 2 (reconstruction): the digits test split encoded with DDIM inversion (S steps) and
decoded with DDIM (the same S), per-dimension MSE with data in [-1, 1], beside the paper's
CIFAR-10 numbers.

The script prints the tables beside the paper's, checks the paper's trends and says where they
do not hold, and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import ddim_fast as dd
from benchmarks.common import machine_info, result_path, write_json
from ddim_fast.checks import require
from ddim_fast.data import load_digits
from ddim_fast.metrics import fd_digits, load_digits_classifier

STEPS = (10, 20, 50, 100, 1000)
# Table 1's rows: the SamplingPlan.build settings of each, and its label.
ROWS = {
    "0.0": (dict(eta=0.0), "0 (DDIM)"),
    "0.2": (dict(eta=0.2), "0.2"),
    "0.5": (dict(eta=0.5), "0.5"),
    "1.0": (dict(eta=1.0), "1"),
    "sigma-hat-clip": (dict(variance="large", clip_x0=1.0), "sigma-hat, x0 clamped (official ddpm_noisy)"),
    "sigma-hat": (dict(variance="large"), "sigma-hat, unclamped"),
}
ETAS = tuple(ROWS)
SIGMA_HAT = ("sigma-hat-clip", "sigma-hat")
PAPER_T1 = {  # CIFAR-10 FID, Table 1 of the paper (its sigma-hat column is the official, clamped sampler)
    "0.0": (13.36, 6.84, 4.67, 4.16, 4.04),
    "0.2": (14.04, 7.11, 4.77, 4.25, 4.09),
    "0.5": (16.66, 8.35, 5.25, 4.46, 4.29),
    "1.0": (41.07, 18.36, 8.01, 5.78, 4.73),
    "sigma-hat-clip": (367.43, 133.37, 32.72, 9.99, 3.17),
}
RECON_STEPS = (10, 20, 50, 100, 200, 500, 1000)
PAPER_T2 = (0.014, 0.0065, 0.0023, 0.0009, 0.0004, 0.0001, 0.0001)  # CIFAR-10 MSE, Table 2


def _plan(model, S, eta):
    return dd.SamplingPlan.build(model.schedule, S, prediction=model.prediction, **ROWS[eta][0])


def table1(model, clf, steps, n, batch, backend, rows=ETAS):
    cells = {}
    for eta in rows:
        for S in steps:
            eng = dd.Engine(model, _plan(model, S, eta), backend=backend)
            t0 = time.perf_counter()
            imgs = torch.cat([eng.sample(min(batch, n - lo), seed=0, first_index=lo).cpu()
                              for lo in range(0, n, batch)])
            cells[(eta, S)] = fd_digits(imgs, clf)
            print(f"  eta={eta:<9} S={S:<5} FD-digits {cells[(eta, S)]:8.2f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return cells


def table2(model, steps, n, batch, backend):
    x0, _ = load_digits(model.config.resolution, split="test")
    x0 = x0[:n]
    out = {}
    for S in steps:
        eng = dd.Engine(model, _plan(model, S, "0.0"), backend=backend)
        rec = torch.cat([eng(eng.invert(x0[lo : lo + batch])).cpu() for lo in range(0, len(x0), batch)])
        out[S] = (rec - x0).pow(2).mean().item()
        print(f"  S={S:<5} reconstruction MSE {out[S]:.5f}", flush=True)
    return out


def trends(cells, steps, recon):
    """The paper's claims, checked on our numbers; each with whether it holds. A claim whose cells
    were not measured (a partial run) is left out. Each sigma-hat row is ranked against the eta rows."""
    notes = []
    small, large = steps[0], steps[-1]
    etas = [e for e in ETAS if e not in SIGMA_HAT and all((e, S) in cells for S in steps)]
    sigmas = [e for e in SIGMA_HAT if all((e, S) in cells for S in steps)]
    if "0.0" in etas:
        best_small = min(etas + sigmas, key=lambda e: cells[(e, small)])
        notes.append((f"DDIM (eta=0) is best at S={small}", best_small == "0.0", f"best: eta={best_small}"))
    for sig in sigmas if etas else []:
        rows = etas + [sig]
        worst_small = max(rows, key=lambda e: cells[(e, small)])
        notes.append((f"{sig} is worst at S={small}", worst_small == sig, f"worst: eta={worst_small}"))
        if large == 1000:
            ranked = sorted(rows, key=lambda e: cells[(e, large)])
            notes.append((f"{sig} is competitive at S=1000 (within the best two)", sig in ranked[:2],
                          f"order at 1000: {', '.join(ranked)}"))
    if "0.0" in etas:
        seq = [cells[("0.0", S)] for S in steps]
        notes.append(("eta=0.0: quality improves with S", all(b <= a * 1.05 for a, b in zip(seq, seq[1:])),
                      " -> ".join(f"{v:.2f}" for v in seq)))
    if recon:
        seq = [recon[S] for S in sorted(recon)]
        notes.append(("reconstruction error falls with S", all(b <= a for a, b in zip(seq, seq[1:])),
                      " -> ".join(f"{v:.5f}" for v in seq)))
    return notes


def _merged(path, steps, cells, recon):
    """Cells and reconstruction errors of an earlier result JSON, under this run's (measured wins)."""
    import json

    old = json.loads(open(path).read())
    kept = {}
    for key, v in old.get("table1", {}).items():
        eta, _, S = key.rpartition("|")
        if eta in ROWS and int(S) in steps:
            kept[(eta, int(S))] = v
    kept.update(cells)
    return kept, recon or {int(S): v for S, v in old.get("table2", {}).items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--n", type=int, default=500, help="samples per Table 1 cell")
    ap.add_argument("--n-recon", type=int, default=360, help="test images for Table 2")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--quick", action="store_true", help="S in {10, 50}, n=200: a smoke run")
    ap.add_argument("--rows", default=",".join(ETAS), help=f"Table 1 rows to measure (of {', '.join(ETAS)})")
    ap.add_argument("--no-recon", dest="recon", action="store_false", help="skip Table 2")
    ap.add_argument("--merge", metavar="JSON", help="an earlier result: its cells fill the rows not measured now")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown --rows {unknown}; choose from {', '.join(ETAS)}")
    require("sklearn", "train", "FD-digits against the digits test split")
    info = machine_info()
    steps = (10, 50) if args.quick else STEPS
    recon_steps = (10, 50) if args.quick else RECON_STEPS
    n = 200 if args.quick else args.n
    model = dd.load_model(args.model)
    clf = load_digits_classifier()
    t0 = time.perf_counter()
    print(f"Table 1: FD-digits of {n} samples per cell ({args.model}, backend {args.backend})")
    measured = table1(model, clf, steps, n, args.batch, args.backend, rows)
    recon = {}
    if args.recon:
        print("Table 2: reconstruction MSE (digits test split)")
        recon = table2(model, recon_steps, args.n_recon, args.batch, args.backend)
    cells = dict(measured)
    if args.merge:
        cells, recon = _merged(args.merge, steps, measured, recon)
    notes = trends(cells, steps, recon)

    print(f"\nmachine: {info['cpu']} ({info['cores']} cores){', ' + info['gpu'] if info['gpu'] else ''}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"\nTable 1, FD-digits, {n} samples (paper: CIFAR-10 FID in brackets)")
    print("| eta \\ S | " + " | ".join(map(str, steps)) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for eta in ETAS:
        if not any((eta, S) in cells for S in steps):
            continue
        paper = dict(zip(STEPS, PAPER_T1.get(eta, ())))
        shown = [f"{cells[(eta, S)]:.2f}" if (eta, S) in cells else "-" for S in steps]
        shown = [f"{v} ({paper[S]})" if S in paper else v for v, S in zip(shown, steps)]
        print(f"| {ROWS[eta][1]} | " + " | ".join(shown) + " |")
    if recon:
        print("\nTable 2, reconstruction MSE (paper: CIFAR-10 in brackets)")
        paper2 = dict(zip(RECON_STEPS, PAPER_T2))
        print("| S | " + " | ".join(map(str, sorted(recon))) + " |")
        print("|---" * (len(recon) + 1) + "|")
        print("| MSE | " + " | ".join(f"{recon[S]:.5f} ({paper2.get(S, '-')})" for S in sorted(recon)) + " |")
    print("\nThe paper's trends on this model:")
    for claim, holds, detail in notes:
        print(f"- {'holds' if holds else 'DOES NOT HOLD'}: {claim} ({detail})")
    stem = "paper-tables" if set(rows) == set(ETAS) and args.recon else "paper-tables-" + "-".join(rows)
    path = write_json(result_path(stem, info), {
        "machine": info, "model": args.model, "n": n, "quick": args.quick, "backend": args.backend,
        "rows": {r: {"settings": ROWS[r][0], "label": ROWS[r][1]} for r in rows},
        "measured": [f"{eta}|{S}" for (eta, S) in measured], "merged_from": args.merge,
        "table1": {f"{eta}|{S}": v for (eta, S), v in cells.items()},
        "table2": recon, "trends": [{"claim": c, "holds": h, "detail": d} for c, h, d in notes],
    })
    print(f"\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
