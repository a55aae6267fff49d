"""Plans as files, and the tuned plans bundled with the models.

    plan.save("digits-5.json")                                   # JSON; the float64 table exactly
    plan = dd.SamplingPlan.load("digits-5.json", model=model)    # refused if made for another model
    plan = dd.SamplingPlan.for_model(model, 5, tuned=True)       # a bundled tuned plan (guidance=w: CFG)

The file:

    {"format": "ddim-fast-plan", "version": 1,
     "model": {"fingerprint": sha256 (ddim_fast.fingerprint), "name": "digits"} or null,
     "plan": every field of the SamplingPlan (tensors as lists; "columns" names the table's columns),
     "sha256": of the three entries above, as written}

Floats are written by Python's shortest repr, which reads back to the same float64, so the table, the
alphas and the tuner's record round-trip bit for bit. A file is refused in one line (ValueError naming
the file and what is wrong, never a traceback) when it is not JSON or is cut short, is not a plan file,
has a version this ddim-fast does not read, has non-finite values, wrong shapes or types, a sampler,
prediction or column layout this version does not know, or when its content no longer matches its
checksum (edited by hand: the scores a tuned plan records would no longer describe it). With a model,
a file made for another model (by fingerprint) is refused too. `force=True` loads the last two anyway.

This module imports nothing from plan.py (plan.py's thin save / load / for_model(tuned=True) call in
here, handing over the class and the names it checks against), so the two never import each other.
Bundled plans live in ddim_fast/assets/<model>/plans/*.json and are found by the model's fingerprint,
so a bundled model loaded from any path finds its plans; benchmarks/tune_bundled.py makes them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import fields
from pathlib import Path

import torch

from .files import atomic_write_bytes
from .fingerprint import model_fingerprint

FORMAT = "ddim-fast-plan"
VERSION = 1
ASSETS = Path(__file__).resolve().parent / "assets"
TENSORS = {"timesteps": torch.int64, "alpha": torch.float64, "alpha_next": torch.float64, "coef": torch.float64}
REQUIRED = ("T", "timesteps", "alpha", "alpha_next", "coef", "sampler", "direction", "columns")


class PlanFileError(ValueError):
    """A plan file that cannot be used: one line naming the file and the reason."""


# -- writing ------------------------------------------------------------------------------------------------
def save(plan, path, *, model=None, columns) -> Path:
    """Write `plan` to `path` (JSON, atomically). The file records `model`'s fingerprint when given, else
    the one a tuned plan recorded; a tuned plan is refused with a model other than its own. columns: the
    names of the table's columns (plan.py's), written beside it so a later layout is never misread."""
    path = Path(path)
    tuned = (plan.meta or {}).get("tuned") or {}
    owner = tuned.get("model") or None
    if model is not None:
        fp = model_fingerprint(model)
        if owner and owner.get("fingerprint") not in (None, fp):
            raise ValueError(f"this plan was tuned for another model ({_who(owner)}), not the one given: save it "
                             "without model=, or tune a plan for this model")
        owner = {"fingerprint": fp, "name": (owner or {}).get("name") or _model_name(model)}
    record = _record(plan)
    record = {**{k: v for k, v in record.items() if k != "coef"}, "columns": list(columns), "coef": record["coef"]}
    body = {"format": FORMAT, "version": VERSION, "model": owner, "plan": record}
    try:
        json.dumps(body, allow_nan=False)
    except ValueError:
        raise ValueError("the plan holds non-finite numbers (NaN or inf) and cannot be saved") from None
    except TypeError as e:
        raise ValueError(f"the plan's meta is not JSON-able ({e}); keep plain dicts, lists, strings and numbers "
                         "in plan.meta") from None
    body["sha256"] = _digest(body)
    return atomic_write_bytes(path, _text(body).encode())


def _text(body: dict) -> str:
    """The file's JSON laid out for a reader: one line per plan field, one per table row, meta indented."""
    plan = body["plan"]
    lines = []
    for k, v in plan.items():
        if k == "coef":
            rows = ",\n".join("   " + json.dumps(r) for r in v)
            lines.append(f'  "coef": [\n{rows}\n  ]')
        elif k == "meta":
            lines.append('  "meta": ' + json.dumps(v, indent=1).replace("\n", "\n  "))
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v)}")
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(body[k])}" for k in ("format", "version", "model"))
    return "{\n" + head + ',\n "plan": {\n' + ",\n".join(lines) + "\n },\n" + \
        f' "sha256": {json.dumps(body["sha256"])}\n}}\n'


def _record(plan) -> dict:
    out = {}
    for f in fields(plan):
        v = getattr(plan, f.name)
        if f.name in TENSORS:
            v = v.detach().to("cpu", TENSORS[f.name]).tolist()
        elif f.name == "threshold_max":
            v = None if math.isinf(v) else v
        elif f.name == "clip_x0" and v is not None:
            v = list(v)
        out[f.name] = v
    return out


def _digest(body: dict) -> str:
    core = {k: body[k] for k in ("format", "version", "model", "plan")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, allow_nan=False).encode()).hexdigest()


# -- reading ------------------------------------------------------------------------------------------------
def load(cls, path, *, model=None, force: bool = False, rules: dict):
    """The plan in `path` as an instance of `cls` (SamplingPlan), checked against `rules` (plan.py's names:
    samplers, max_order, columns, coef_columns, max_history, variances, predictions, eps_at, plms_starts)
    and, with a model, against its fingerprint, schedule length and prediction type."""
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise PlanFileError(f"{path} is not a plan file (not text)") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except _NonFinite as e:
        raise PlanFileError(f"{path} holds a non-finite number ({e}): a plan's numbers must be finite") from None
    except json.JSONDecodeError as e:
        what = "cut short" if e.pos >= len(text.rstrip()) else "not valid JSON"
        raise PlanFileError(f"{path} is not a readable plan file ({what}: {e.msg} at line {e.lineno})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise PlanFileError(f"{path} is not a ddim-fast plan file (no \"format\": \"{FORMAT}\")")
    if body.get("version") != VERSION:
        raise PlanFileError(f"{path} is a plan file of version {body.get('version')!r}; this ddim-fast reads version "
                            f"{VERSION}: save it again with the ddim-fast that wrote it, or upgrade")
    try:
        kw = _fields(cls, body.get("plan"), rules)
        owner = _owner(body.get("model"))
    except (ValueError, TypeError) as e:
        raise PlanFileError(f"{path}: {e}") from None
    if not force and body.get("sha256") != _digest(body):
        raise PlanFileError(f"{path} was changed after it was written (its checksum does not match its content), so "
                            "what it records may not describe it: restore it, save the plan again, or pass force=True "
                            "(--force-plan)")
    plan = cls(**kw)
    if model is not None:
        _check_model(path, plan, owner, model, force)
    return plan


class _NonFinite(ValueError):
    pass


def _no_constant(name):
    raise _NonFinite(name)


def _owner(m):
    if m is None:
        return None
    if not (isinstance(m, dict) and isinstance(m.get("fingerprint"), str) and len(m["fingerprint"]) == 64):
        raise ValueError("its \"model\" entry must be null or {\"fingerprint\": a sha256 hex string, \"name\": ...}")
    return m


def _check_model(path, plan, owner, model, force):
    schedule = getattr(model, "schedule", None)
    if schedule is not None and schedule.T != plan.T:
        raise PlanFileError(f"{path} is a plan over T={plan.T} timesteps; this model's schedule has T={schedule.T}")
    prediction = getattr(model, "prediction", "eps")
    if prediction != plan.prediction:
        raise PlanFileError(f"{path} is a plan for a model that predicts {plan.prediction!r}; this one predicts "
                            f"{prediction!r}")
    if owner is not None and not force:
        fp = model_fingerprint(model)
        if fp != owner["fingerprint"]:
            raise PlanFileError(f"{path} was made for another model ({_who(owner)}; this one is {fp[:12]}): its "
                                "timesteps and table were fitted to that model. Tune one for this model, or pass "
                                "force=True (--force-plan) to use it anyway")


def _who(owner):
    name = owner.get("name")
    return f"{name + ', ' if name else ''}fingerprint {str(owner.get('fingerprint'))[:12]}"


def _fields(cls, d, rules) -> dict:
    """The constructor keywords of `cls` from a file's "plan" entry, every value checked."""
    if not isinstance(d, dict):
        raise ValueError("its \"plan\" entry is missing or not an object")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names - {"columns"})
    if unknown:
        raise ValueError(f"unknown plan field(s) {unknown}: written by a newer ddim-fast?")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ValueError(f"the plan lacks {', '.join(missing)}")
    kw = {k: v for k, v in d.items() if k != "columns"}
    T = kw["T"]
    _want(_int(T) and T >= 1, f"T must be a positive int, got {T!r}")
    sampler = kw["sampler"]
    _want(sampler in rules["samplers"], f"unknown sampler {sampler!r}; this ddim-fast knows {list(rules['samplers'])}")
    cols = list(rules["coef_columns"] if sampler == "ddim" else rules["columns"])
    _want(d["columns"] == cols, f"its table's columns {d['columns']} are not those of a {sampler} table in this "
          f"ddim-fast ({cols})")
    ts = kw["timesteps"]
    _want(isinstance(ts, list) and len(ts) >= 1 and all(_int(t) and 0 <= t < T for t in ts),
          f"timesteps must be a non-empty list of ints in [0, T={T})")
    S = len(ts)
    for k in ("alpha", "alpha_next"):
        v = kw[k]
        _want(isinstance(v, list) and len(v) == S and all(_num(a) and 0 < a <= 1 for a in v),
              f"{k} must be a list of {S} numbers in (0, 1] (one per timestep)")
    coef = kw["coef"]
    _want(isinstance(coef, list) and len(coef) == S and all(isinstance(r, list) and len(r) == len(cols)
                                                             and all(_num(v) for v in r) for r in coef),
          f"coef must be {S} rows (one per timestep) of {len(cols)} finite numbers")
    out = {k: torch.tensor(kw[k], dtype=dt) for k, dt in TENSORS.items()}
    _check_settings(kw, rules, sampler, out["coef"], cols)
    for k, v in kw.items():
        if k not in TENSORS:
            out[k] = v
    if out.get("clip_x0") is not None:
        out["clip_x0"] = tuple(float(v) for v in out["clip_x0"])
    out["threshold_max"] = math.inf if out.get("threshold_max") is None else float(out["threshold_max"])
    return out


def _check_settings(kw, rules, sampler, coef, cols):
    direction = kw["direction"]
    _want(direction in ("sample", "invert"), f"direction must be 'sample' or 'invert', got {direction!r}")
    _want(direction == "sample" or sampler == "ddim", "only a ddim plan can be an inversion plan")
    if "prediction" in kw:
        _want(kw["prediction"] in rules["predictions"], f"unknown prediction {kw['prediction']!r}")
    if "variance" in kw:
        _want(kw["variance"] in rules["variances"], f"unknown variance {kw['variance']!r}")
    if "eta" in kw:
        _want(_num(kw["eta"]) and kw["eta"] >= 0, f"eta must be a number >= 0, got {kw['eta']!r}")
    if "eps_at" in kw:
        _want(kw["eps_at"] in ((None,) if direction == "sample" else tuple(rules["eps_at"])),
              f"eps_at {kw['eps_at']!r} does not fit a {direction} plan")
    if "spacing" in kw:
        _want(isinstance(kw["spacing"], str), "spacing must be a string (a name, or 'explicit')")
    if kw.get("clip_x0") is not None:
        c = kw["clip_x0"]
        _want(isinstance(c, list) and len(c) == 2 and all(_num(v) for v in c) and c[0] < c[1],
              "clip_x0 must be null or [lo, hi] with lo < hi")
    if kw.get("threshold") is not None:
        _want(_num(kw["threshold"]) and 0 < kw["threshold"] <= 1, "threshold must be null or a quantile in (0, 1]")
    if kw.get("threshold_max") is not None:
        _want(_num(kw["threshold_max"]) and kw["threshold_max"] >= 1, "threshold_max must be null or >= 1")
    if "order" in kw:
        top = rules["max_order"][sampler]
        _want(_int(kw["order"]) and 1 <= kw["order"] <= top,
              f"a {sampler} plan has order 1..{top}, got {kw['order']!r}")
    if "lower_order_final" in kw:
        _want(isinstance(kw["lower_order_final"], bool), "lower_order_final must be true or false")
    if kw.get("plms_start") is not None:
        _want(sampler == "plms" and kw["plms_start"] in rules["plms_starts"], "plms_start fits only a plms plan")
    if "meta" in kw:
        _want(isinstance(kw["meta"], dict), "meta must be an object")
    history = kw.get("history", 0)
    _want(_int(history) and 0 <= history <= rules["max_history"], f"history must be 0..{rules['max_history']}")
    if len(cols) > len(rules["coef_columns"]):
        h = coef[:, cols.index("h1"): cols.index("h1") + rules["max_history"]]
        _want(not bool((h[:, history:] != 0).any()), f"the table uses history terms beyond its history depth {history}")
        push = coef[:, cols.index("push")]
        _want(bool(((push == 0) | (push == 1)).all()), "the push column must hold 0 or 1")
    else:
        _want(history == 0, "a ddim table has no history")


def _want(ok, message):
    if not ok:
        raise ValueError(message)


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -- bundled tuned plans ------------------------------------------------------------------------------------
def bundled_files(folder: Path = ASSETS) -> list[dict]:
    """Every bundled plan file: {"path", "model" (its folder's name), "fingerprint", "steps", "guidance"},
    read from the files' own records (no plan is built)."""
    out = []
    for path in sorted(Path(folder).glob("*/plans/*.json")):
        try:
            body = json.loads(path.read_text())
            plan = body["plan"]
            tuned = plan.get("meta", {}).get("tuned", {})
            out.append({"path": path, "model": path.parent.parent.name, "fingerprint": body["model"]["fingerprint"],
                        "steps": len(plan["timesteps"]), "guidance": tuned.get("guidance")})
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged bundled file is found by its test, not by every user
    return out


def for_model(cls, model, steps, *, tuned=False, guidance=None, rules, **overrides):
    """SamplingPlan.for_model(model, steps, tuned=True[, guidance=w]): the bundled tuned plan for this model,
    step count and guidance; one clear error naming what exists otherwise. tuned=False: the usual plan."""
    if not tuned:
        if guidance is not None:
            raise ValueError("guidance= picks a bundled tuned plan (tuned=True); the guidance of an untuned plan is "
                             "given when sampling (dd.sample / Engine.sample)")
        return cls.for_model(model, steps, **overrides)
    if overrides:
        raise ValueError(f"a bundled tuned plan fixes its own settings; drop {', '.join(sorted(overrides))} "
                         "(or build an untuned plan with tuned=False)")
    fp = model_fingerprint(model)
    files = bundled_files()
    mine = [f for f in files if f["fingerprint"] == fp]
    if not mine:
        names = sorted({f["model"] for f in files})
        raise ValueError(f"no tuned plan is bundled for this model (fingerprint {fp[:12]}); bundled tuned plans exist "
                         f"for {', '.join(names) or 'no model'}: tune one with dd.tune_plan or `ddim-fast tune`")
    name = mine[0]["model"]
    w = None if guidance is None else float(guidance)
    match = [f for f in mine if f["steps"] == steps and f["guidance"] == w]
    if not match:
        have = ", ".join(f"{f['steps']} steps" + ("" if f["guidance"] is None else f" at guidance {f['guidance']:g}")
                         for f in sorted(mine, key=lambda f: (f["guidance"] or 0, f["steps"])))
        want = f"{steps} steps" + ("" if w is None else f" at guidance {w:g}")
        raise ValueError(f"no bundled tuned plan for {name} with {want}; there are: {have}")
    return load(cls, match[0]["path"], model=model, rules=rules)


def _model_name(model):
    info = getattr(model, "checkpoint_info", None) or {}
    path = info.get("run") or info.get("path")
    return Path(str(path)).name if path else None
