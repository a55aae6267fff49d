"""Plans as files (ddim_fast/plan_files.py): the float64 table round-trips exactly, a file is tied to its model by
fingerprint, every damaged, cut-short or edited file is refused in one line; the tuned plans bundled with the
models load and are found by steps and guidance."""

import copy
import json
from dataclasses import replace

import pytest
import torch

import ddim_fast as dd
from ddim_fast import tune
from ddim_fast.cli import main
from ddim_fast.models.analytic import GaussianEps
from ddim_fast.onnx.cache import plan_fingerprint
from ddim_fast.plan_files import PlanFileError, bundled_files

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)


def _plans():
    """One plan of every kind: DDIM with noise, clipping, plms (repeated timestep), dpmpp_3m with thresholding,
    unipc, an inversion plan, and a unipc plan whose table is no longer analytic, with a tuner-like record."""
    unipc = dd.SamplingPlan.build(SCHED, 6, sampler="unipc", spacing="trailing")
    wiggle = torch.ones_like(unipc.coef)
    wiggle[:, :9] += 0.01 * torch.arange(unipc.steps * 9).reshape(unipc.steps, 9).double().sin()  # not the pushes
    odd = replace(unipc, coef=unipc.coef * wiggle,
                  meta={"tuned": {"steps": 6, "held_out_mse": {"untuned": 0.1, "table": 0.05}, "kept": ["table"]}})
    return {
        "ddim-eta": dd.SamplingPlan.build(SCHED, 7, eta=0.3, clip_x0=1.0),
        "large": dd.SamplingPlan.build(SCHED, 5, variance="large", spacing="quad"),
        "plms": dd.SamplingPlan.build(SCHED, 6, sampler="plms"),
        "dpmpp_3m": dd.SamplingPlan.build(SCHED, 8, sampler="dpmpp_3m", threshold=0.9, threshold_max=2.0),
        "unipc": unipc,
        "invert": dd.SamplingPlan.build(SCHED, 6).inverse("target"),
        "explicit": dd.SamplingPlan.build(SCHED, spacing=[999, 700, 321, 42, 5], sampler="dpmpp_2m"),
        "tuned-like": odd,
    }


@pytest.fixture(scope="module")
def model():
    return GaussianEps(SCHED)


@pytest.mark.parametrize("name", list(_plans()))
def test_round_trip_is_exact(tmp_path, name, model):
    plan = _plans()[name]
    path = plan.save(tmp_path / "p.json", model=model)
    back = dd.SamplingPlan.load(path, model=model)
    for k in ("timesteps", "alpha", "alpha_next", "coef"):
        a, b = getattr(plan, k), getattr(back, k)
        assert a.dtype == b.dtype and torch.equal(a, b), k  # bit for bit, -0.0 included
        assert torch.equal(torch.signbit(a.double()), torch.signbit(b.double()))
    assert back.describe() == plan.describe() and back.meta == plan.meta
    assert plan_fingerprint(back) == plan_fingerprint(plan)  # the ONNX cache sees the same plan
    assert back.threshold_max == plan.threshold_max and back.clip_x0 == plan.clip_x0
    x_T = dd.rng.initial_noise(1, (2, 1, 4, 4)).double() if name != "invert" else None
    if x_T is not None:
        assert torch.equal(dd.sample(model, x_T, back, seed=3), dd.sample(model, x_T, plan, seed=3))
    body = json.loads(path.read_text())
    assert body["format"] == "ddim-fast-plan" and body["version"] == 1 and len(body["model"]["fingerprint"]) == 64


def test_the_file_is_written_atomically_and_never_half(tmp_path, model):
    path = tmp_path / "p.json"
    good = _plans()["unipc"]
    good.save(path)
    before = path.read_bytes()
    bad = replace(good, coef=good.coef.clone().index_fill_(0, torch.tensor([2]), float("nan")))
    with pytest.raises(ValueError, match="non-finite"):
        bad.save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_another_models_file_is_refused_in_one_line_unless_forced(tmp_path, model):
    path = _plans()["unipc"].save(tmp_path / "p.json", model=model)
    other = GaussianEps(SCHED, mu=0.31)  # same class and schedule, other output
    with pytest.raises(PlanFileError, match="was made for another model") as e:
        dd.SamplingPlan.load(path, model=other)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert torch.equal(dd.SamplingPlan.load(path, model=other, force=True).coef, _plans()["unipc"].coef)
    assert dd.SamplingPlan.load(path).steps == 6  # without a model nothing is checked against one
    with pytest.raises(PlanFileError, match="T=1000 .* T=100"):
        dd.SamplingPlan.load(path, model=GaussianEps(dd.NoiseSchedule.linear(100, 1e-3, 0.05)), force=True)
    with pytest.raises(PlanFileError, match="predicts 'eps'; this one predicts 'v'"):
        dd.SamplingPlan.load(path, model=GaussianEps(SCHED, prediction="v"), force=True)


def _edit(path, fn):
    """Apply fn to the file's parsed JSON and write it back, keeping its checksum (so only the edit is caught)."""
    body = json.loads(path.read_text())
    fn(body)
    path.write_text(json.dumps(body))


def _set(key, value):
    return lambda b: b["plan"].__setitem__(key, value)


BAD = {
    "truncated": (lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), "cut short"),
    "not json": (lambda p: p.write_text("timesteps: 999, 500\n"), "not valid JSON"),
    "binary": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"), "not text"),
    "empty": (lambda p: p.write_text(""), "cut short"),
    "nan": (lambda p: p.write_text(p.read_text().replace('"eta": 0.0', '"eta": NaN', 1)), "non-finite number"),
    "infinity": (lambda p: p.write_text(p.read_text().replace('"alpha": [', '"alpha": [Infinity, ', 1)),
                 "non-finite"),
    "not a plan": (lambda p: p.write_text(json.dumps({"format": "ddim-fast", "version": 1})), "not a ddim-fast plan"),
    "a list": (lambda p: p.write_text("[1, 2, 3]"), "not a ddim-fast plan"),
    "newer version": (lambda p: _edit(p, lambda b: b.__setitem__("version", 2)), "version 2"),
    "unknown sampler": (lambda p: _edit(p, _set("sampler", "euler_a")), "unknown sampler 'euler_a'"),
    "row missing": (lambda p: _edit(p, lambda b: b["plan"]["coef"].pop()), "coef must be 6 rows"),
    "short row": (lambda p: _edit(p, lambda b: b["plan"]["coef"][1].pop()), "coef must be 6 rows .* of 13"),
    "string in table": (lambda p: _edit(p, lambda b: b["plan"]["coef"][1].__setitem__(0, "1.0")), "finite numbers"),
    "timestep range": (lambda p: _edit(p, lambda b: b["plan"]["timesteps"].__setitem__(0, 1000)), r"\[0, T=1000\)"),
    "alpha range": (lambda p: _edit(p, lambda b: b["plan"]["alpha"].__setitem__(0, 1.5)), r"alpha must be .* \(0, 1\]"),
    "columns": (lambda p: _edit(p, lambda b: b["plan"]["columns"].reverse()), "columns"),
    "history": (lambda p: _edit(p, _set("history", 0)), "history terms beyond"),
    "push": (lambda p: _edit(p, lambda b: b["plan"]["coef"][0].__setitem__(12, 0.5)), "push column"),
    "unknown field": (lambda p: _edit(p, _set("guidance_scale", 2.0)), "unknown plan field"),
    "missing field": (lambda p: _edit(p, lambda b: b["plan"].pop("alpha_next")), "lacks alpha_next"),
    "order": (lambda p: _edit(p, _set("order", 7)), "order 1..3"),
    "direction": (lambda p: _edit(p, _set("direction", "invert")), "only a ddim plan"),
    "fingerprint": (lambda p: _edit(p, lambda b: b["model"].__setitem__("fingerprint", "abc")), "fingerprint"),
    # a finite, well-formed value changed by hand: the checksum no longer matches
    "hand-edited value": (lambda p: p.write_text(p.read_text().replace('"timesteps": [999, ', '"timesteps": [998, ')),
                          "changed after it was written"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_file_is_refused_in_one_line(tmp_path, model, case):
    path = _plans()["unipc"].save(tmp_path / "p.json", model=model)
    damage, why = BAD[case]
    damage(path)
    with pytest.raises(ValueError, match=why) as e:
        dd.SamplingPlan.load(path, model=model)
    assert isinstance(e.value, PlanFileError) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_force_loads_a_hand_edited_file(tmp_path, model):
    path = _plans()["unipc"].save(tmp_path / "p.json", model=model)
    path.write_text(path.read_text().replace('"timesteps": [999, ', '"timesteps": [998, '))
    assert dd.SamplingPlan.load(path, model=model, force=True).timesteps[0] == 998


def test_the_command_line_says_one_line_for_a_bad_file(tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text('{"format": "ddim-fast-plan", "version": 1, "plan": {"coef": [')
    rc = main(["sample", "--plan", str(path), "--num", "1", "--out", str(tmp_path / "x.png"), "--no-progress",
               "--backend", "reference"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("ddim-fast sample: error: ") and "cut short" in err
    assert "Traceback" not in err and not (tmp_path / "x.png").exists()


def test_a_tuned_plan_is_refused_with_another_model_when_saved(tmp_path, model):
    plan = _plans()["tuned-like"]
    plan = replace(plan, meta={"tuned": {**plan.meta["tuned"], "model": {"fingerprint": "f" * 64, "name": "x"}}})
    with pytest.raises(ValueError, match="tuned for another model"):
        plan.save(tmp_path / "p.json", model=model)
    plan.save(tmp_path / "p.json")  # without a model it keeps its own fingerprint
    assert json.loads((tmp_path / "p.json").read_text())["model"] == {"fingerprint": "f" * 64, "name": "x"}


# -- the bundled tuned plans --------------------------------------------------------------------------------
BUNDLED = {("digits", None): (4, 5, 6, 8), ("digits-cond", 1.0): (5,), ("digits-cond", 2.0): (5,)}


def test_the_bundled_plans_are_those_promised():
    found = {}
    for f in bundled_files():
        found.setdefault((f["model"], f["guidance"]), []).append(f["steps"])
    assert {k: tuple(sorted(v)) for k, v in found.items()} == BUNDLED


@pytest.fixture(scope="module")
def digits():
    return dd.load_model("digits"), dd.load_model("digits-cond")


@pytest.mark.parametrize("name, guidance, steps", [(m, w, s) for (m, w), ss in BUNDLED.items() for s in ss])
def test_a_bundled_plan_loads_and_its_record_holds(digits, name, guidance, steps):
    model = digits[0] if name == "digits" else digits[1]
    plan = dd.SamplingPlan.for_model(model, steps, tuned=True, **({} if guidance is None else {"guidance": guidance}))
    rec = plan.describe()["tuned"]
    assert plan.steps == steps and plan.sampler == "unipc" and plan.spacing in ("explicit", "trailing")
    assert (plan.timesteps[1:] < plan.timesteps[:-1]).all() and int(plan.timesteps[0]) == 999
    assert rec["guidance"] == guidance and rec["model"]["name"] == name
    assert rec["teacher"]["steps"] == tune.TEACHER_STEPS
    mse = rec["held_out_mse"]
    kept = ["untuned"] + rec["kept"]
    for before, after in zip(kept, kept[1:]):  # each stage kept only where it beat the one before on held-out noise
        assert mse[after] < mse[before]
    if "table" not in rec["kept"]:
        assert torch.equal(plan.coef, _analytic(plan, model).coef)
    else:
        assert not torch.equal(plan.coef, _analytic(plan, model).coef)
    same = dd.SamplingPlan.build(model.schedule, steps, sampler="unipc", spacing="trailing")
    assert dd.onnx.structure(plan) == dd.onnx.structure(same)  # one table graph serves both


def _analytic(plan, model):
    return dd.SamplingPlan.build(model.schedule, spacing=plan.timesteps.tolist(), sampler="unipc")


def test_for_model_names_what_exists(digits):
    plain, cond = digits
    with pytest.raises(ValueError, match="no bundled tuned plan for digits with 7 steps; there are: 4 steps, 5 steps, "
                                         "6 steps, 8 steps"):
        dd.SamplingPlan.for_model(plain, 7, tuned=True)
    with pytest.raises(ValueError, match="digits-cond with 5 steps at guidance 3; there are: 5 steps at guidance 1, "
                                         "5 steps at guidance 2"):
        dd.SamplingPlan.for_model(cond, 5, tuned=True, guidance=3)
    with pytest.raises(ValueError, match="no tuned plan is bundled for this model"):
        dd.SamplingPlan.for_model(GaussianEps(SCHED), 5, tuned=True)
    with pytest.raises(ValueError, match="guidance= picks a bundled tuned plan"):
        dd.SamplingPlan.for_model(plain, 5, guidance=2)
    with pytest.raises(ValueError, match="fixes its own settings; drop spacing"):
        dd.SamplingPlan.for_model(plain, 5, tuned=True, spacing="uniform")
    assert dd.SamplingPlan.for_model(plain, 5, tuned=False).spacing == "uniform"  # the usual plan
    changed = copy.deepcopy(plain)
    with torch.no_grad():
        changed.conv_out.bias.add_(1e-3)
    with pytest.raises(ValueError, match="no tuned plan is bundled for this model"):
        dd.SamplingPlan.for_model(changed, 5, tuned=True)  # found by fingerprint, so other weights find nothing
