"""Tuned plans: a deterministic sampler's timesteps and table fitted to one model, offline.

    plan = dd.tune_plan(model, 5, sampler="unipc")        # a SamplingPlan like any other
    plan.describe()["tuned"]                               # how it was made, what it scored on held-out noise

A plan is a list of timesteps and a table of per-step coefficients (ddim_fast/plan.py), so a plan fitted
to one model runs unchanged on every backend (the fused step, the CUDA graph, the ONNX table graph) at no
cost at sampling time. The tuner works in two stages; each is kept only when it beats the one before it
on held-out noise (the distance of the final samples to the teacher's, from noise the fit never saw).

The teacher. `teacher_steps` (100) steps of UniPC (trailing spacing) from training noise x_T, with every
state kept: X_k at the teacher's timestep tau_k, and the final sample X_K. Distances below are mean
squared errors per element against these states, from the same x_T.

Stage 1, timestep search (after OSS, Pei et al. 2025, arXiv 2503.21774; GITS, Chen et al. 2024,
arXiv 2405.11326). The first step stays at the teacher's start (the noise is drawn there); the S - 1
others are chosen from a grid of G candidate timesteps (a subset of the teacher's, uniform in log-SNR
lambda, so dense near the data and near the noise) by dynamic programming over (step i, grid node g):

    D[i+1][g'] = min over g of  || step_i(state D[i][g] at node g  ->  node g') - X(g') ||^2

per sample, where step_i is one step of this sampler's own update (its row i, built by
SamplingPlan.build from the node's path, so a multistep solver carries its own history along the path)
and the state is the student's own, propagated along its best path: the cost is the global error,
not a local one. One network evaluation per (step, node) serves every candidate g'. Each sample's
best path ends on the data (the final state against X_K); the schedule is the median over samples of
each step's timestep. The programme keeps one state per node (the one nearest the teacher there, which
need not end nearest) and the median path is never scored as a whole, so the schedule is then polished
on the real objective, the final distance of whole runs over the training noise: from the better of the
median and the untuned schedule, one timestep moves by +-10 (then 5, 2, 1) while that lowers it
(refine_timesteps). NOTE measured on the bundled digits model (held-out MSE): the median alone lost to
the untuned trailing schedule at S = 6 (6.4e-3 against 5.2e-3) and S = 8; polished, it wins at every S.

Stage 2, table calibration (after S4S, Frankel et al. 2025, arXiv 2502.17423). A small set of the
stage-1 plan's coefficients get a multiplicative correction per step, coef * (1 + delta), delta = 0
at the start (the analytic values), so zeros stay zeros and the table keeps its structure (its history
depth, pushes and columns: every backend's graph for the untuned plan serves it):

    ce           the weight of the network output in the x0 estimate: the step's eps scaling (the
                 exposure-bias correction of Ning et al. 2024), carried into the history it pushes;
    d0, dx       the weights of the current x0 estimate and of the state in the update;
    h1, h2, h3   the weights of the earlier estimates (the solver's extrapolation), where non-zero.

cx is left alone (with ce and dx it is redundant in the update), as are the push columns and zeros.
The corrections are fitted by Adam through the reference sampler's own update (sampling.step) with the
network frozen, on the final-sample distance to the teacher from the same x_T; the held-out distance is
checked every few iterations, the best corrections are kept and the fit stops when it has not improved
for `patience` checks (early stopping; a rising held-out distance while the training one falls is
overfitting, and it is recorded).

A separate time input (the timestep given to the network differing from the one the coefficients
assume) is not tuned. Every backend could feed it (plan.timesteps is an int64 input everywhere), but
only as an integer, so it takes a discrete search of whole runs, and the continuous ce correction
already does what a time shift does to the x0 estimate (the eps scaling against exposure bias). NOTE
measured on the bundled digits model: a coordinate search of per-step shifts in {+-5, +-10, +-20} on top
of the tuned plans (two sweeps, 19k network evaluations at S = 5, more than the timestep search) lowered
the held-out MSE by 0.1% at S = 4 (7.40e-3 -> 7.39e-3) and 3.4% at S = 5 (4.92e-3 -> 4.76e-3).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from . import conditioning, rng
from .checks import check, is_int, positive_int, sample_shape
from .fingerprint import model_fingerprint
from .models.diffusers_unet import adapt
from .plan import ALL_COLUMNS, COEF_COLUMNS, MAX_HISTORY, SamplingPlan
from .sampling import step

TUNABLE = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc")  # the deterministic samplers (eta = 0)
CALIBRATED = ("ce", "d0", "dx", "h1", "h2", "h3")  # the columns stage 2 corrects, where non-zero
TEACHER_SAMPLER = "unipc"
# NOTE measured on the bundled digits model (64 samples, trailing spacing): UniPC-100 lies 7.1e-6 (MSE per
# element) from UniPC-200 and UniPC-50 6.0e-5, against 1.3e-3 (UniPC-10) to 1.6e-2 (UniPC-4) for the plans
# being tuned. So 100 steps is a teacher whose own error is 0.1-0.5% of the smallest error tuned here, at half
# the cost of 200 (the teacher is the largest part of a tuning run); the benchmark measures against 200.
TEACHER_STEPS = 100


@dataclass
class Teacher:
    """A many-step run from known noise with every state kept: states[k] at timesteps[k] (descending,
    states[0] = x_T), states[-1] the final sample. Rows are the samples in order (training, then held out)."""

    timesteps: list  # (K,) the teacher's timesteps
    states: torch.Tensor  # (K + 1, N, C, H, W) float32
    plan: SamplingPlan
    seconds: float  # wall-clock
    cpu_seconds: float = 0.0  # this process's CPU time


# -- the public entry point ---------------------------------------------------------------------------------
def tune_plan(model, steps: int, *, sampler: str = "unipc", order: int | None = None, cond: dict | None = None,
              guidance: float | None = None, samples: int = 64, held_out: int = 64, seed: int = 12345,
              teacher_steps: int = TEACHER_STEPS, grid: int = 40, stages: int = 2, iterations: int = 60,
              batch: int = 64, lr: float = 0.03, check_every: int = 5, patience: int = 2, shape=None,
              progress: bool = True, teacher: Teacher | None = None, name: str | None = None) -> SamplingPlan:
    """A `steps`-step plan of `sampler` fitted to `model` (see the module docstring for the method).

    sampler, order: a deterministic sampler ("unipc" (default), "dpmpp_2m", "dpmpp_3m", "ddim") and its order.
    cond, guidance: the conditioning and guidance scale the plan is for; the teacher and the fit use the same.
        cond is a dict of tensors with samples + held_out rows (training rows first). With guidance and no
        cond, a class-conditional model gets the labels i % num_classes.
    samples, held_out: training and held-out noise (rows of rng.initial_noise(seed, ...)); the held-out
        rows decide whether each stage is kept and when stage 2 stops.
    teacher_steps: the teacher's UniPC steps (trailing). grid: candidate timesteps of the search.
    stages: 1 (timestep search only) or 2 (and table calibration).
    iterations, batch, lr, check_every, patience: stage 2's Adam fit (the most iterations; minibatch of
        training rows; step size; held-out checks every so many iterations; checks without improvement
        before it stops).
    shape: (C, H, W) of one sample when the model does not say (a UNet's config does).
    progress: a progress bar (tqdm) over the network evaluations, with the time left.
    teacher: a Teacher from an earlier call with the same model, conditioning, noise and teacher_steps
        (tuning several step counts of one model shares it); name: the model's name, for the record.

    Returns a SamplingPlan with spacing "explicit" (after stage 1) and `meta["tuned"]`, the record that
    `describe()` reports: model fingerprint and name, settings, the held-out distance of every stage, which
    stages were kept, and the seconds spent.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    _check_args(model, steps, sampler, order, samples, held_out, seed, teacher_steps, grid, stages,
                iterations, batch, lr, check_every, patience)
    net = _frozen(adapt(model))
    shape = sample_shape(model, shape)
    n = samples + held_out
    cc = _conditioning(model, n, cond, guidance)
    base = SamplingPlan.for_model(model, steps, sampler=sampler, spacing="trailing",
                                  **({} if order is None else {"order": order}))
    x_T = rng.initial_noise(seed, (n, *shape))
    bar = _Progress(progress, _work(base, grid, samples, held_out, teacher_steps, stages, iterations, batch,
                                    check_every, teacher is None))
    shared = teacher is not None
    try:
        if teacher is None:
            teacher = run_teacher(net, x_T, model.schedule, teacher_steps, cc, base.prediction, bar)
        else:
            _check_teacher(teacher, x_T, teacher_steps)
        train, val = slice(0, samples), slice(samples, n)
        score = lambda p: distance(net, p, x_T[val], teacher.states[-1][val], _take(cc, val))  # noqa: E731
        scores = {"untuned": score(base)}
        bar.update(held_out * base.steps)
        # Stage 1: the timesteps.
        t1 = time.perf_counter()
        nodes = grid_nodes(teacher, grid, base.steps)
        median = search_timesteps(net, base, model.schedule, teacher, nodes, train, cc, bar)
        found, polish = refine_timesteps(net, base, model.schedule, teacher, [median, base.timesteps.tolist()],
                                         train, cc, stride=max(1, model.schedule.T // teacher_steps), bar=bar)
        stage1 = build_like(base, model.schedule, found)
        scores["timesteps"] = score(stage1)
        bar.update(held_out * base.steps)
        seconds = {"teacher": round(teacher.seconds, 1), "timesteps": round(time.perf_counter() - t1, 1)}
        plan = stage1 if scores["timesteps"] < scores["untuned"] else base
        kept = ["timesteps"] if plan is stage1 else []
        fit = None
        if stages >= 2:
            t2 = time.perf_counter()
            fit = calibrate(net, plan, teacher, x_T, train, val, cc, iterations=iterations, batch=batch, lr=lr,
                            check_every=check_every, patience=patience, seed=seed, bar=bar)
            seconds["table"] = round(time.perf_counter() - t2, 1)
            scores["table"] = fit["best_held_out"]
            if fit["best_held_out"] < scores[kept[-1] if kept else "untuned"]:
                plan, kept = fit["plan"], kept + ["table"]
    finally:
        bar.close()
    # total: the time to tune this plan from nothing (a shared teacher's time counted here as well)
    seconds["total"] = round(time.perf_counter() - t_start + (teacher.seconds if shared else 0.0), 1)
    # cpu: this process's CPU seconds (all threads), a measure the load of other jobs inflates less than the wall
    seconds["cpu"] = round(time.process_time() - cpu_start + (teacher.cpu_seconds if shared else 0.0), 1)
    seconds["teacher_shared"] = shared
    record = {
        "model": {"fingerprint": model_fingerprint(model), "name": name or _model_name(model)},
        "sampler": sampler, "order": base.order, "steps": base.steps, "guidance": cc.guidance if cc else None,
        "cond": _cond_record(cc), "teacher": {"sampler": TEACHER_SAMPLER, "steps": teacher_steps,
                                              "spacing": "trailing"},
        "samples": samples, "held_out": held_out, "seed": seed, "noise": "rng.initial_noise(seed, (samples + "
        "held_out, C, H, W)): rows 0..samples-1 fit, the rest held out", "grid": len(nodes),
        "search_timesteps": [int(t) for t in median], "stage1_timesteps": [int(t) for t in found],
        "polish": polish, "kept": kept,
        "held_out_mse": {k: float(f"{v:.6g}") for k, v in scores.items()},
        "calibrated": list(fit["columns"]) if fit else [],
        "fit": None if fit is None else {k: fit[k] for k in ("iterations", "best_iteration", "stopped", "history",
                                                             "overfit")},
        "seconds": seconds, "ddim_fast": _version(),
    }
    return replace(plan, meta={**plan.meta, "tuned": record})


def distance(net, plan: SamplingPlan, x_T, target, cc=None, batch: int = 256) -> float:
    """Mean squared error per element of `plan`'s final samples from x_T against `target` (reference sampler,
    float32, no gradient)."""
    total = 0.0
    with torch.no_grad():
        for lo in range(0, x_T.shape[0], batch):
            hi = min(lo + batch, x_T.shape[0])
            x = rollout(net, plan, plan.coef.float(), x_T[lo:hi], _take(cc, slice(lo, hi)))
            total += float(((x - target[lo:hi]) ** 2).sum())
    return total / target.numel()


# -- the teacher -------------------------------------------------------------------------------------------
def make_teacher(model, *, samples: int = 64, held_out: int = 64, seed: int = 12345,
                 teacher_steps: int = TEACHER_STEPS, cond: dict | None = None, guidance: float | None = None,
                 shape=None) -> Teacher:
    """The teacher tune_plan would run with these settings, to share between several tune_plan(teacher=...)
    calls for one model (several step counts): the noise rows, conditioning and steps must be the same."""
    n = samples + held_out
    cc = _conditioning(model, n, cond, guidance)
    x_T = rng.initial_noise(seed, (n, *sample_shape(model, shape)))
    return run_teacher(_frozen(adapt(model)), x_T, model.schedule, teacher_steps, cc,
                       getattr(model, "prediction", "eps"))


def run_teacher(net, x_T, schedule, teacher_steps, cc=None, prediction="eps", bar=None, batch: int = 128) -> Teacher:
    """Teacher: teacher_steps of UniPC (trailing) from x_T, every state kept (float32)."""
    t0, c0 = time.perf_counter(), time.process_time()
    plan = SamplingPlan.build(schedule, teacher_steps, sampler=TEACHER_SAMPLER, spacing="trailing",
                              prediction=prediction)
    states = torch.empty(plan.steps + 1, *x_T.shape)
    states[0] = x_T
    coef = plan.coef.float()
    with torch.no_grad():
        for lo in range(0, x_T.shape[0], batch):
            hi = min(lo + batch, x_T.shape[0])
            c = _take(cc, slice(lo, hi))
            x, hist = x_T[lo:hi].clone(), _history(plan, x_T[lo:hi])
            for i in range(plan.steps):
                m = output(net, x, int(plan.timesteps[i]), c)
                x, _ = step(x, m, coef[i], plan, None, hist)
                states[i + 1, lo:hi] = x
                if bar is not None:
                    bar.update(hi - lo)
    return Teacher(plan.timesteps.tolist(), states, plan, time.perf_counter() - t0, time.process_time() - c0)


def _check_teacher(teacher, x_T, teacher_steps):
    check(isinstance(teacher, Teacher), f"teacher must be a Teacher from run_teacher, got {type(teacher).__name__}")
    check(len(teacher.timesteps) == teacher_steps and teacher.states.shape[1:] == x_T.shape
          and torch.equal(teacher.states[0], x_T),
          "this teacher was run from other noise or with another number of steps: pass the same samples, held_out, "
          "seed and teacher_steps, or teacher=None")


# -- stage 1: the timesteps --------------------------------------------------------------------------------
def grid_nodes(teacher: Teacher, grid: int, steps: int) -> list[int]:
    """The candidate timesteps as indices into the teacher's timesteps: index 0 (the start) and grid - 1 more,
    uniform in lambda = log(alpha / sigma) between the teacher's second and last timestep (rounded to the
    teacher's nearest, duplicates dropped)."""
    ts = teacher.timesteps
    ac = teacher.plan.alpha.tolist()  # alpha_bar at the teacher's timesteps
    lam = [0.5 * (math.log(a) - math.log1p(-a)) for a in ac]
    want = torch.linspace(lam[1], lam[-1], max(grid - 1, steps)).tolist()
    nodes = {0}
    for w in want:
        nodes.add(min(range(1, len(ts)), key=lambda k: abs(lam[k] - w)))
    return sorted(nodes)


def search_timesteps(net, base: SamplingPlan, schedule, teacher: Teacher, nodes: list[int], rows: slice, cc=None,
                     bar=None) -> list[int]:
    """Stage 1: the S timesteps (descending) chosen by dynamic programming over the grid `nodes` (indices into
    the teacher's timesteps), per sample with the student's own state, then the median over samples."""
    S, G = base.steps, len(nodes)
    tts = teacher.timesteps
    target = teacher.states[:, rows]  # (K + 1, N, ...)
    N = target.shape[1]
    c_all = _take(cc, rows)
    rowcache = {}

    def row(path, i):  # coefficient row i of the plan over grid path `path` (completed below its end)
        key = (tuple(path), i)
        if key not in rowcache:
            ts = [tts[nodes[g]] for g in path]
            fill = [tts[nodes[g]] for g in range(path[-1] + 1, path[-1] + 1 + S - len(path))]
            p = build_like(base, schedule, ts + fill)
            rowcache[key] = p.coef[i].float()
        return rowcache[key]

    # D[g]: per sample, the best state entering step i at node g: (x, hist, path (N, i + 1), cost (N,))
    x0 = target[0]
    D = {0: (x0, _history(base, x0), torch.zeros(N, 1, dtype=torch.long))}
    with torch.no_grad():
        for i in range(S):
            last = i == S - 1
            best = {}
            for g, (x, hist, path) in sorted(D.items()):
                m = output(net, x, tts[nodes[g]], c_all)
                if bar is not None:
                    bar.update(N)
                targets = [None] if last else [h for h in range(g + 1, G) if G - 1 - h >= S - 2 - i]
                groups = {}
                for k, p in enumerate(path.tolist()):
                    groups.setdefault(tuple(p), []).append(k)
                for p, idx in groups.items():
                    idx = torch.tensor(idx)
                    xs, ms, hs = x[idx], m[idx], [h[idx] for h in hist]
                    for h in targets:
                        full = list(p) + ([] if h is None else [h])
                        hh = list(hs)
                        xn, _ = step(xs, ms, row(full, i), base, None, hh)
                        want = target[-1][idx] if h is None else target[nodes[h]][idx]
                        cost = ((xn - want) ** 2).flatten(1).mean(1)
                        key = "end" if h is None else h
                        _keep(best, key, idx, xn, hh, torch.tensor(full).expand(len(idx), -1), cost, N)
            if last:
                paths = best["end"][2]
            else:
                D = {h: (b[0], b[1], b[2]) for h, b in best.items()}
    chosen = paths.median(dim=0).values.tolist()  # (S,) grid indices: the median over samples of each step
    for i in range(1, S):  # strictly descending timesteps (medians of descending paths can tie)
        chosen[i] = max(chosen[i], chosen[i - 1] + 1)
    if chosen[-1] > G - 1:
        chosen = list(range(G - S, G))  # unreachable in practice: the paths leave room below each node
    return [int(tts[nodes[g]]) for g in chosen]


def refine_timesteps(net, base: SamplingPlan, schedule, teacher: Teacher, starts: list, rows: slice, cc=None, *,
                     stride: int = 10, sweeps: int = 4, bar=None) -> tuple[list[int], dict]:
    """The search's schedule polished on its real objective: the mean final distance to the teacher over the
    training rows, of whole runs. The dynamic programme keeps one state per node (the one nearest the teacher
    there, not necessarily the one that ends nearest) and the median of per-sample paths is never scored as a
    whole; this scores it, starts from the best of `starts` (the median and the untuned schedule, so stage 1
    cannot end worse than untuned on the training noise), and moves one timestep at a time by +-`stride` (then
    +-stride/2, ...) while a move lowers the error. Returns (timesteps, {"start", "moves", "train_mse"})."""
    c = _take(cc, rows)
    x_T, target = teacher.states[0][rows], teacher.states[-1][rows]
    T, S = schedule.T, base.steps
    cache = {}

    def prefix(ts):  # the states entering each step of ts's run (x, hist), and its final distance
        key = tuple(ts)
        if key not in cache:
            plan = build_like(base, schedule, ts)
            coef = plan.coef.float()
            x, hist, states = x_T, _history(plan, x_T), []
            with torch.no_grad():
                for i in range(S):
                    states.append((x, list(hist)))
                    m = output(net, x, int(plan.timesteps[i]), c)
                    x, _ = step(x, m, coef[i], plan, None, hist)
            if bar is not None:
                bar.update(len(x_T) * S)
            cache[key] = (states, float(((x - target) ** 2).mean()))
        return cache[key]

    def cost_from(ts, states, first):  # the final distance of ts, rerun from step `first` of a cached run
        key = tuple(ts)
        if key in cache:
            return cache[key][1]
        plan = build_like(base, schedule, ts)
        coef = plan.coef.float()
        x, hist = states[first][0], list(states[first][1])
        with torch.no_grad():
            for i in range(first, S):
                m = output(net, x, int(plan.timesteps[i]), c)
                x, _ = step(x, m, coef[i], plan, None, hist)
        if bar is not None:
            bar.update(len(x_T) * (S - first))
        return float(((x - target) ** 2).mean())

    ranked = sorted((prefix(list(map(int, ts)))[1], k) for k, ts in enumerate(starts))
    best_k = ranked[0][1]
    ts, err = list(map(int, starts[best_k])), ranked[0][0]
    moves, delta = 0, stride
    for _ in range(sweeps):
        moved = False
        for i in range(1, S):  # the first timestep stays where the noise is drawn
            states, _ = prefix(ts)
            for d in (-delta, delta):
                t = ts[i] + d
                lo = ts[i + 1] if i + 1 < S else -1
                if not lo < t < ts[i - 1] or t >= T:
                    continue
                cand = ts[:i] + [t] + ts[i + 1:]
                e = cost_from(cand, states, max(i - 1, 0))
                if e < err:
                    ts, err, moves, moved = cand, e, moves + 1, True
                    break
        if not moved:
            if delta == 1:
                break
            delta = max(1, delta // 2)
    return ts, {"start": ["search", "untuned"][best_k] if best_k < 2 else best_k, "moves": moves,
                "train_mse": float(f"{err:.6g}")}


def _keep(best, key, idx, x, hist, path, cost, N):
    """Merge candidates into best[key] = (x (N, ...), hist, path (N, L), cost (N,)), per sample."""
    if key not in best:
        best[key] = [torch.zeros(N, *x.shape[1:]), [torch.zeros(N, *x.shape[1:]) for _ in hist],
                     torch.zeros(N, path.shape[1], dtype=torch.long), torch.full((N,), math.inf)]
    b = best[key]
    better = cost < b[3][idx]
    if not bool(better.any()):
        return
    if len(idx) == N:  # every sample (one shared path): elementwise selection, no scatter
        w = better.view(-1, *([1] * (x.ndim - 1)))
        b[0] = torch.where(w, x, b[0])
        b[1] = [torch.where(w, h, bh) for h, bh in zip(hist, b[1])]
        b[2] = torch.where(better[:, None], path, b[2])
        b[3] = torch.where(better, cost, b[3])
        return
    j = idx[better]
    b[0][j] = x[better]
    for k, h in enumerate(hist):
        b[1][k][j] = h[better]
    b[2][j] = path[better]
    b[3][j] = cost[better]


# -- stage 2: the table ------------------------------------------------------------------------------------
def calibration_mask(plan: SamplingPlan) -> torch.Tensor:
    """(S, C) bool: the entries stage 2 corrects, the non-zero entries of the CALIBRATED columns."""
    names = ALL_COLUMNS[: plan.coef.shape[1]]
    cols = torch.tensor([n in CALIBRATED for n in names])
    return (plan.coef != 0) & cols


def calibrate(net, plan: SamplingPlan, teacher: Teacher, x_T, train: slice, val: slice, cc=None, *,
              iterations=60, batch=64, lr=0.03, check_every=5, patience=2, seed=0, bar=None) -> dict:
    """Stage 2: coef * (1 + delta) on calibration_mask(plan), delta fitted by Adam on the final-sample MSE to
    the teacher (training rows, minibatches), with early stopping on the held-out rows.

    delta = theta / scale, theta the parameters Adam moves: scale is how much the step's result moves per unit
    of relative change of the entry (term_scales), so a step of lr in theta moves every term by about lr in
    the state's own units. Without it Adam moves every delta alike, and the first step's x0 weights (x0 =
    157 x - 157 eps at t = 999 of the linear schedule) turn a 2% change into an error larger than the image."""
    base = plan.coef.clone()
    mask = calibration_mask(plan).double()
    xt, yt, ct = x_T[train], teacher.states[-1][train], _take(cc, train)
    xv, yv, cv = x_T[val], teacher.states[-1][val], _take(cc, val)
    scale = term_scales(net, plan, xt, ct).clamp_min(1e-12)
    theta = torch.zeros_like(base, requires_grad=True)
    with torch.no_grad():  # lr is relative to the error there is to correct: the RMS distance to the teacher
        err = float(((rollout(net, plan, base.float(), xt[:batch], _take(ct, slice(0, batch))) - yt[:batch]) ** 2)
                    .mean().sqrt())
    opt = _Adam(theta, lr * err)
    table = lambda: base * (1 + theta / scale * mask)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)

    def held_out():
        with torch.no_grad():
            got = rollout(net, plan, table().float(), xv, cv)
        if bar is not None:
            bar.update(xv.shape[0] * plan.steps)
        return float(((got - yv) ** 2).mean())

    best = held_out()
    best_theta, best_it, since, history, it = theta.detach().clone(), 0, 0, [], 0
    history.append({"iteration": 0, "train": None, "held_out": float(f"{best:.6g}")})
    train_loss = []
    stopped = "iterations"
    for it in range(1, iterations + 1):
        idx = torch.randperm(xt.shape[0], generator=gen)[:batch]
        with torch.enable_grad():
            got = rollout(net, plan, table().float(), xt[idx], _take(ct, idx))
            loss = ((got - yt[idx]) ** 2).mean()
            (grad,) = torch.autograd.grad(loss, theta)
        opt.step(grad)
        train_loss.append(float(loss.detach()))
        if bar is not None:
            bar.update(3 * len(idx) * plan.steps)  # forward and backward: about three evaluations
        if it % check_every == 0:
            h = held_out()
            history.append({"iteration": it, "train": float(f"{sum(train_loss[-check_every:]) / check_every:.6g}"),
                            "held_out": float(f"{h:.6g}")})
            if h < best:
                best, best_theta, best_it, since = h, theta.detach().clone(), it, 0
            else:
                since += 1
                if since >= patience:
                    stopped = "early"
                    break
    tuned = replace(plan, coef=(base * (1 + best_theta / scale * mask)).detach())
    # Overfitting: after the best check, the training loss kept falling while the held-out distance rose.
    at_best = next(r for r in history if r["iteration"] == best_it)
    last = history[-1]
    overfit = (last["iteration"] > best_it and last["held_out"] > best and at_best["train"] is not None
               and last["train"] < at_best["train"])
    names = ALL_COLUMNS[: plan.coef.shape[1]]
    return {"plan": tuned, "best_held_out": best, "best_iteration": best_it, "iterations": it, "stopped": stopped,
            "history": history, "overfit": overfit,
            "columns": [n for j, n in enumerate(names) if bool(mask[:, j].any())]}


class _Adam:
    """Adam (Kingma & Ba 2015) on one tensor, updated in place: the few lines of it this fit needs (torch.optim's
    first use imports its compile machinery, several seconds on a CPU, for 20 numbers)."""

    def __init__(self, param, lr, betas=(0.9, 0.999), eps=1e-8):
        self.p, self.lr, self.b1, self.b2, self.eps, self.t = param, lr, *betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self, grad):
        self.t += 1
        self.m.mul_(self.b1).add_(grad, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        self.p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def term_scales(net, plan: SamplingPlan, x_T, cc=None) -> torch.Tensor:
    """(S, C): for each calibrated entry, the RMS over x_T's rows of what it adds to the step's result (its
    change per unit of relative change): ce |d0 ce m|, d0 |d0 x0|, dx |dx x|, h_k |h_k H_k|."""
    names = ALL_COLUMNS[: plan.coef.shape[1]]
    out = torch.zeros_like(plan.coef)
    coef = plan.coef.float()
    x, hist = x_T, _history(plan, x_T)
    rms = lambda v: float(v.double().pow(2).mean().sqrt())  # noqa: E731
    with torch.no_grad():
        for i in range(plan.steps):
            c = plan.coef[i]
            m = output(net, x, int(plan.timesteps[i]), cc)
            terms = {"dx": rms(x), **{f"h{k + 1}": rms(h) for k, h in enumerate(hist)}}
            x_new, x0 = step(x, m, coef[i], plan, None, hist)
            terms.update(d0=rms(x0), ce=abs(float(c[names.index("d0")])) * rms(m))
            for j, name in enumerate(names):
                if name in terms:
                    out[i, j] = abs(float(c[j])) * terms[name]
            x = x_new
    return out


# -- the sampler, differentiable ---------------------------------------------------------------------------
def rollout(net, plan: SamplingPlan, coef: torch.Tensor, x_T, cc=None):
    """The final state of `plan`'s update from x_T with the table `coef` (S, C) (float32; gradients flow to
    coef when it requires them): the reference sampler's loop, without its no_grad."""
    x, hist = x_T, _history(plan, x_T)
    for i in range(plan.steps):
        m = output(net, x, int(plan.timesteps[i]), cc)
        x, _ = step(x, m, coef[i], plan, None, hist)
    return x


def output(net, x, t: int, cc=None):
    """The model output m at integer timestep t for every row of x: one call, or with guidance one call on the
    doubled batch and m = m_u + w (m_c - m_u)."""
    tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
    if cc is None:
        m = net(x, tt)
    elif not cc.guided:
        m = net(x, tt, **cc.cond)
    else:
        m = conditioning.combine(_plain(net(torch.cat([x, x]), torch.cat([tt, tt]), **cc.doubled())), cc.guidance)
    return _plain(m)


def _plain(m):
    return m.sample if not isinstance(m, torch.Tensor) and isinstance(getattr(m, "sample", None), torch.Tensor) else m


def _history(plan, x):
    """Zeroed history buffers H1..H3 for a multistep table (none for a DDIM one): the update reads as many
    as the table has columns for, so every plan of one sampler shares the buffers' count."""
    return [torch.zeros_like(x) for _ in range(MAX_HISTORY)] if plan.coef.shape[1] > len(COEF_COLUMNS) else []


# -- helpers -----------------------------------------------------------------------------------------------
def _check_args(model, steps, sampler, order, samples, held_out, seed, teacher_steps, grid, stages, iterations,
                batch, lr, check_every, patience):
    check(sampler in TUNABLE, f"tune_plan tunes the deterministic samplers {TUNABLE}, got {sampler!r} (plms's "
          "extra Heun row and dpmpp_2m_sde's noise have no single trajectory to fit)")
    positive_int("steps", steps)
    check(2 <= steps <= 50, f"tune_plan tunes 2 to 50 steps (a plan that needs tuning is short), got {steps}")
    for k, v in (("samples", samples), ("held_out", held_out), ("grid", grid), ("iterations", iterations),
                 ("batch", batch), ("check_every", check_every), ("patience", patience)):
        positive_int(k, v)
    check(samples >= 2 and held_out >= 2, "samples and held_out must be >= 2")
    check(is_int(seed) and seed >= 0, f"seed must be an int >= 0, got {seed!r}")
    positive_int("teacher_steps", teacher_steps)
    check(teacher_steps >= 4 * steps, f"the teacher needs many more steps than the plan: teacher_steps >= "
          f"4 * steps = {4 * steps}, got {teacher_steps}")
    check(grid >= steps + 1, f"grid must hold more candidate timesteps than steps ({steps}), got {grid}")
    check(stages in (1, 2), f"stages must be 1 (timesteps) or 2 (timesteps and table), got {stages!r}")
    check(isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr), f"lr must be > 0, got {lr!r}")
    check(getattr(model, "schedule", None) is not None, "the model carries no noise schedule (model.schedule): "
          "load it with dd.load_model")
    return None


def _frozen(net):
    if isinstance(net, torch.nn.Module):
        net = net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
    return net


def _conditioning(model, n, cond, guidance):
    if cond is None and guidance is not None:
        spec = conditioning.cond_spec(model) or {}
        labels = [k for k, s in spec.items() if not s["dtype"].is_floating_point and s.get("range")]
        check(len(spec) == 1 and labels, "guidance needs cond: pass cond={name: tensor with samples + held_out rows}")
        k = labels[0]
        cond = {k: torch.arange(n) % spec[k]["range"][1]}
    return conditioning.resolve(model, n, cond, None, guidance)


def _take(cc, idx):
    if cc is None:
        return None
    if isinstance(idx, slice):
        return cc.slice(idx.start or 0, idx.stop)
    cut = lambda d: None if d is None else {k: v[idx] for k, v in d.items()}  # noqa: E731
    return conditioning.Conditioning(cut(cc.cond), cut(cc.uncond), cc.guidance)


def _cond_record(cc):
    if cc is None:
        return None
    out = {}
    for k, v in cc.cond.items():
        if not v.is_floating_point() and v.ndim == 1:
            n = int(v.max()) + 1
            out[k] = "i % " + str(n) if torch.equal(v, torch.arange(len(v)) % n) else "given"
        else:
            out[k] = "given"
    return out


def build_like(base: SamplingPlan, schedule, ts) -> SamplingPlan:
    """`base`'s sampler and settings over the explicit timesteps `ts` of `schedule`."""
    import warnings

    kw = dict(spacing=list(ts), sampler=base.sampler, prediction=base.prediction, clip_x0=base.clip_x0,
              threshold=base.threshold, threshold_max=base.threshold_max, final_alpha=base.final_alpha,
              lower_order_final=base.lower_order_final)
    if base.sampler != "ddim":
        kw["order"] = base.order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # far-start notes: the tuner's plans start at the teacher's start
        return SamplingPlan.build(schedule, **kw)


def _model_name(model):
    info = getattr(model, "checkpoint_info", None) or {}
    return info.get("name") or info.get("path") and str(info["path"]).rstrip("/").split("/")[-1] or None


def _version():
    from . import __version__

    return __version__


def _work(base, grid, samples, held_out, teacher_steps, stages, iterations, batch, check_every, teacher):
    """Network evaluations (one sample, one call) the tuner will make at most: the progress bar's total."""
    S = base.steps
    n = (teacher_steps * (samples + held_out) if teacher else 0) + 2 * held_out * S
    n += samples * (1 + (S - 1) * (grid - S))  # the search: about one evaluation per (step, node)
    if stages >= 2:
        n += iterations * 3 * min(batch, samples) * S + (iterations // check_every + 1) * held_out * S
    return n


class _Progress:
    def __init__(self, enabled, total):
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=not enabled, desc="tune", unit="eval", unit_scale=True, leave=False)

    def update(self, n):
        self.bar.update(n)

    def close(self):
        self.bar.close()
