"""Bitwise before/after check for refactors: write every output of a fixed set of runs to one .npz, then
compare two such files array by array.

    python tools/bitwise_snapshot.py write before.npz        # on the old tree
    python tools/bitwise_snapshot.py write after.npz         # on the new tree
    python tools/bitwise_snapshot.py compare before.npz after.npz

The runs: both bundled models (digits; digits-cond with labels, with and without guidance), several plans
(DDIM at eta 0 and 0.5, quad spacing, sigma-hat with the clamp, thresholding, and the multistep samplers),
the reference sampler and inversion, and Engines on the reference and onnxruntime backends. A refactor that
claims "numerics unchanged" must compare equal here, byte for byte.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch


def _plans(model):
    build = __import__("ddim_fast").SamplingPlan.for_model
    return {
        "ddim10": build(model, 10),
        "ddim20_eta05_quad": build(model, 20, eta=0.5, spacing="quad"),
        "large10_clip": build(model, 10, variance="large", clip_x0=1.0),
        "ddim8_threshold": build(model, 8, spacing="trailing", threshold=0.995),
        "unipc6": build(model, 6, sampler="unipc", spacing="trailing"),
        "dpmpp3m7": build(model, 7, sampler="dpmpp_3m", spacing="trailing"),
        "plms5": build(model, 5, sampler="plms"),
        "sde6": build(model, 6, sampler="dpmpp_2m_sde", spacing="trailing"),
    }


def write(path):
    import ddim_fast as dd

    torch.manual_seed(0)
    out = {}
    for name in ("digits", "digits-cond"):
        model = dd.load_model(name)
        shape = (6, *dd.Engine(model, dd.SamplingPlan.for_model(model, 2), backend="reference").shape)
        x_T = dd.rng.initial_noise(seed=3, shape=shape)
        conds = {"plain": {}}
        if name == "digits-cond":
            y = {"class_labels": torch.arange(shape[0]) % 10}
            conds = {"cond": {"cond": y}, "cfg2": {"cond": y, "guidance": 2.0}}
        for pname, plan in _plans(model).items():
            for cname, kw in conds.items():
                key = f"{name}/{pname}/{cname}"
                out[f"{key}/ref_sample"] = dd.sample(model, x_T, plan, seed=5, **kw)
                if plan.sampler == "ddim" and plan.eta == 0 and plan.variance == "ddim" and plan.threshold is None:
                    out[f"{key}/ref_invert"] = dd.invert(model, out[f"{key}/ref_sample"].clamp(-1, 1), plan, **kw)
                for backend in ("reference", "onnxruntime"):
                    eng = dd.Engine(model, plan, backend=backend)
                    out[f"{key}/{backend}/sample"] = eng.sample(shape[0], seed=7, **kw)
                    out[f"{key}/{backend}/call"] = eng(x_T, seed=9, **kw)
                    if f"{key}/ref_invert" in out:
                        out[f"{key}/{backend}/invert"] = eng.invert(out[f"{key}/ref_sample"].clamp(-1, 1), **kw)
                print(key, flush=True)
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in out.items()})
    print(f"wrote {len(out)} arrays to {path}")


def compare(a, b):
    A, B = np.load(a), np.load(b)
    keys = sorted(set(A.files) | set(B.files))
    bad = [k for k in keys if k not in A.files or k not in B.files or A[k].dtype != B[k].dtype
           or A[k].shape != B[k].shape or A[k].tobytes() != B[k].tobytes()]
    for k in bad:
        if k in A.files and k in B.files and A[k].shape == B[k].shape:
            print(f"DIFFERS {k}: max abs {np.abs(A[k].astype(np.float64) - B[k]).max():.3g}")
        else:
            print(f"MISSING or reshaped {k}")
    print(f"{len(keys) - len(bad)} of {len(keys)} arrays byte-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        write(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
