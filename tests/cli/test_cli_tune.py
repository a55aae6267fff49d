"""`ddim-fast tune` and `--plan FILE|tuned` on sample, decode, interpolate and export, through ddim_fast.cli.main:
the file it writes, the images a plan gives, and the one-line refusals (options that contradict the plan, bad
output paths, the bundled plans that do not exist)."""

import json

import numpy as np
import pytest
import torch

import ddim_fast as dd
from ddim_fast.checkpoint import save_model
from ddim_fast.cli import main

TUNE = ["--steps", 3, "--samples", 4, "--held-out", 4, "--teacher-steps", 12, "--grid", 6, "--iterations", 2,
        "--no-progress"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny model folder (T=100) and a plan file `ddim-fast tune` made for it."""
    base = tmp_path_factory.mktemp("tune")
    torch.manual_seed(0)
    m = dd.UNet(dd.UNetConfig.tiny())
    m.schedule = dd.NoiseSchedule.linear(100, 1e-3, 0.05)
    folder = str(save_model(base / "tiny", m))
    out = base / "plan.json"
    assert main(["tune", "--model", folder, "--out", str(out), *map(str, TUNE)]) == 0
    return folder, out


def _run(*argv):
    return main([str(a) for a in argv])


def test_tune_writes_a_plan_file_for_its_model(tuned, capsys):
    folder, out = tuned
    model = dd.load_model(folder)
    plan = dd.SamplingPlan.load(out, model=model)
    rec = plan.describe()["tuned"]
    assert plan.steps == 3 and plan.sampler == "unipc" and rec["samples"] == 4 and rec["teacher"]["steps"] == 12
    assert rec["model"]["name"] == folder and json.loads(out.read_text())["model"]["fingerprint"] == \
        rec["model"]["fingerprint"]


def test_tune_says_what_it_kept(tmp_path, tuned, capsys):
    folder, _ = tuned
    out = tmp_path / "p.json"
    assert _run("tune", "--model", folder, "--out", out, *TUNE, "--stages", 1) == 0
    text = capsys.readouterr().out
    rec = dd.SamplingPlan.load(out).meta["tuned"]
    assert "held-out MSE to the teacher: untuned" in text and f"-> {out}" in text and "table" not in rec["held_out_mse"]
    assert f"{rec['held_out_mse']['untuned']:.3g}" in text


@pytest.mark.parametrize("out, why", [("plan.txt", "must name a .json"), ("exists.json", "already exists")])
def test_tune_refuses_a_bad_output_before_any_work(tmp_path, tuned, capsys, out, why):
    (tmp_path / "exists.json").write_text("keep me")
    assert _run("tune", "--model", "no-such-model", "--out", tmp_path / out, *TUNE) == 2
    err = capsys.readouterr().err
    assert why in err and err.count("\n") == 1 and (tmp_path / "exists.json").read_text() == "keep me"


def test_sample_with_a_plan_file_is_that_plan(tuned, tmp_path):
    folder, out = tuned
    assert _run("sample", "--model", folder, "--plan", out, "--num", 3, "--backend", "reference", "--no-progress",
                "--out", tmp_path / "a.npz") == 0
    got = np.load(tmp_path / "a.npz")
    model = dd.load_model(folder)
    plan = dd.SamplingPlan.load(out, model=model)
    want = dd.Engine(model, plan, backend="reference", device="cpu").sample(3, seed=0)
    np.testing.assert_allclose(got["images"], want.numpy(), atol=1e-6)
    assert json.loads(str(got["meta"]))["plan"]["tuned"]["steps"] == 3


@pytest.mark.parametrize("extra, clash", [
    (["--steps", 4], "--steps 4 (the plan has 3)"), (["--sampler", "ddim"], "--sampler ddim (the plan has unipc)"),
    (["--eta", 0.5], "--eta 0.5 (the plan has 0.0)"), (["--spacing", "uniform"], "--spacing uniform"),
    (["--clip-x0", 1], "--clip-x0"), (["--order", 3], "--order 3 (the plan has 2)"),
])
def test_an_option_that_contradicts_the_plan_is_refused(tuned, tmp_path, capsys, extra, clash):
    folder, out = tuned
    rc = _run("sample", "--model", folder, "--plan", out, *extra, "--num", 1, "--backend", "reference",
              "--no-progress", "--out", tmp_path / "x.png")
    err = capsys.readouterr().err
    assert rc == 2 and clash in err and err.count("\n") == 1 and not (tmp_path / "x.png").exists()
    assert err.startswith("ddim-fast sample: error: --plan")


def test_a_contradiction_is_refused_before_the_model_loads(tuned, tmp_path, capsys, monkeypatch):
    """A --plan FILE is read and checked against the options in the cheap checks, before any model is loaded."""
    from ddim_fast.cli import common

    folder, out = tuned

    def no_load(*a, **k):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(common, "load_model", no_load)
    rc = _run("sample", "--model", folder, "--plan", out, "--sampler", "ddim", "--num", 1, "--out", tmp_path / "x.png")
    assert rc == 2 and "--sampler ddim (the plan has unipc)" in capsys.readouterr().err


def test_a_saved_plan_keeps_its_own_eta_and_variance(tmp_path, capsys):
    """The --eta and --variance defaults are not options the user gave: a saved eta = 0.5 plan samples as it is,
    and only a typed --eta that differs is refused."""
    model = dd.load_model("digits")
    path = dd.SamplingPlan.for_model(model, 3, eta=0.5).save(tmp_path / "eta.json", model=model)
    args = ("sample", "--plan", path, "--num", 2, "--backend", "reference", "--no-progress")
    assert _run(*args, "--out", tmp_path / "a.npz") == 0
    got = np.load(tmp_path / "a.npz")["images"]
    want = dd.Engine(model, dd.SamplingPlan.load(path), backend="reference").sample(2, seed=0)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    assert _run(*args, "--eta", 0, "--out", tmp_path / "b.npz") == 2
    assert "--eta 0.0 (the plan has 0.5)" in capsys.readouterr().err


def test_options_that_agree_with_the_plan_are_fine(tuned, tmp_path):
    folder, out = tuned
    assert _run("sample", "--model", folder, "--plan", out, "--steps", 3, "--sampler", "unipc", "--eta", 0,
                "--num", 1, "--backend", "reference", "--no-progress", "--out", tmp_path / "x.png") == 0


def test_decode_and_interpolate_take_the_plan(tuned, tmp_path):
    folder, out = tuned
    common = ["--model", folder, "--plan", out, "--backend", "reference", "--no-progress"]
    assert _run("interpolate", *common, "--num", 3, "--out", tmp_path / "i.npz") == 0
    frames = np.load(tmp_path / "i.npz")["images"]
    z = dd.slerp(*(dd.rng.initial_noise(s, (1, 3, 16, 16))[0] for s in (0, 1)), torch.linspace(0, 1, 3))
    model = dd.load_model(folder)
    plan = dd.SamplingPlan.load(out, model=model)
    np.testing.assert_allclose(frames, dd.Engine(model, plan, backend="reference", device="cpu")(z).numpy(),
                               atol=1e-6)
    np.savez(tmp_path / "lat.npz", latents=z.numpy())
    assert _run("decode", *common, "--input", tmp_path / "lat.npz", "--out", tmp_path / "d.npz") == 0
    np.testing.assert_allclose(np.load(tmp_path / "d.npz")["images"], frames, atol=1e-6)
    assert _run("decode", *common, "--steps", 5, "--input", tmp_path / "lat.npz", "--out", tmp_path / "e.npz") == 2


def test_export_takes_the_plan(tuned, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from ddim_fast.cli import export as cli_export

    folder, out = tuned
    seen = {}
    monkeypatch.setattr(cli_export, "export_onnx", lambda model, path, plan, **kw: seen.update(plan=plan))
    monkeypatch.setattr(cli_export, "onnx_metadata", lambda path: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        _run("export", "--model", folder, "--whole-sampler", "--plan", out, "--out", tmp_path / "t.onnx")
    plan = dd.SamplingPlan.load(out)
    assert torch.equal(seen["plan"].coef, plan.coef) and seen["plan"].describe() == plan.describe()
    assert _run("export", "--model", folder, "--plan", out, "--out", tmp_path / "t.onnx") == 2
    assert "--plan only applies to --whole-sampler" in capsys.readouterr().err
    assert _run("export", "--model", folder, "--whole-sampler", "--plan", out, "--steps", 7,
                "--out", tmp_path / "t.onnx") == 2
    assert "--steps 7 (the plan has 3)" in capsys.readouterr().err


def test_the_bundled_plan_by_name(tmp_path, capsys):
    c = ["--backend", "reference", "--no-progress", "--num", 2]
    assert _run("sample", "--plan", "tuned", "--steps", 5, *c, "--out", tmp_path / "a.npz") == 0
    model = dd.load_model("digits")
    want = dd.Engine(model, dd.SamplingPlan.for_model(model, 5, tuned=True), backend="reference",
                     device="cpu").sample(2, seed=0)
    np.testing.assert_allclose(np.load(tmp_path / "a.npz")["images"], want.numpy(), atol=1e-6)
    assert _run("sample", "--plan", "tuned", *c, "--out", tmp_path / "b.png") == 2
    assert "--plan tuned picks the bundled tuned plan by --steps" in capsys.readouterr().err
    assert _run("sample", "--plan", "tuned", "--steps", 7, *c, "--out", tmp_path / "b.png") == 2
    assert "there are: 4 steps, 5 steps, 6 steps, 8 steps" in capsys.readouterr().err
    assert _run("sample", "--model", "digits-cond", "--plan", "tuned", "--steps", 5, "--class", 3, "--guidance", 2,
                *c, "--out", tmp_path / "c.npz") == 0
    assert _run("sample", "--model", "digits-cond", "--plan", "tuned", "--steps", 5, "--class", 3, "--guidance", 3,
                *c, "--out", tmp_path / "d.png") == 2
    assert "5 steps at guidance 1, 5 steps at guidance 2" in capsys.readouterr().err


def test_a_guidance_other_than_the_plans_is_refused(tuned, tmp_path, capsys):
    folder, out = tuned
    plan = dd.SamplingPlan.load(out)
    guided = tmp_path / "guided.json"
    from dataclasses import replace

    replace(plan, meta={"tuned": {**plan.meta["tuned"], "guidance": 2.0}}).save(guided)
    rc = _run("sample", "--model", folder, "--plan", guided, "--class", 1, "--guidance", 1, "--num", 1,
              "--backend", "reference", "--no-progress", "--out", tmp_path / "x.png")
    err = capsys.readouterr().err
    assert rc == 2 and "--guidance 1 (the plan was tuned for guidance 2)" in err and err.count("\n") == 1
