"""The sampling sub-commands through ddim_fast.cli.main: outputs, determinism, errors, restarts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ddim_fast as dd
from ddim_fast.checkpoint import save_model
from ddim_fast.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    m = dd.UNet(dd.UNetConfig.tiny())
    m.schedule = dd.NoiseSchedule.linear(100, 1e-3, 0.05)
    return str(save_model(tmp_path_factory.mktemp("m") / "tiny", m))


def _run(*argv):
    return main([str(a) for a in argv])


def _common(model_dir):
    return ["--model", model_dir, "--backend", "reference", "--steps", 4, "--no-progress"]


def test_sample_grid_npz_and_folder_agree(model_dir, tmp_path):
    c = _common(model_dir)
    assert _run("sample", *c, "--num", 5, "--batch-size", 2, "--out", tmp_path / "a.npz") == 0
    assert _run("sample", *c, "--num", 5, "--batch-size", 5, "--out", tmp_path / "b.npz") == 0
    a = np.load(tmp_path / "a.npz")
    b = np.load(tmp_path / "b.npz")
    assert a["images"].shape == (5, 3, 16, 16) and a["indices"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(a["images"], b["images"], atol=1e-5)  # batch size does not matter
    assert json.loads(str(a["meta"]))["plan"]["steps"] == 4
    assert _run("sample", *c, "--num", 5, "--out", tmp_path / "g.png") == 0
    assert Image.open(tmp_path / "g.png").size == (3 * 17 + 1, 2 * 17 + 1)  # 3 columns, 2 rows, 1px pad
    assert _run("sample", *c, "--num", 3, "--out", tmp_path / "dir") == 0
    png = np.asarray(Image.open(tmp_path / "dir" / "000002.png"), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(png.transpose(2, 0, 1), a["images"][2], atol=1 / 127.5 + 1e-6)
    assert json.loads((tmp_path / "dir" / "manifest.json").read_text())["num"] == 3


def test_sample_refuses_to_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"precious")
    assert _run("sample", *_common(model_dir), "--num", 1, "--out", out) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert _run("sample", *_common(model_dir), "--num", 1, "--out", out, "--overwrite") == 0
    assert out.read_bytes() != b"precious"


def test_folder_sampling_restarts_without_duplicates(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    c = _common(model_dir) + ["--num", 6, "--batch-size", 2, "--out", out]
    assert _run("sample", *c) == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    (out / "manifest.json").write_text(json.dumps({"complete": False, "settings": manifest["settings"]}))
    (out / "000003.png").unlink()  # as if killed mid-batch: the manifest written at the start says "pending"
    capsys.readouterr()
    assert _run("sample", *c) == 0
    assert "1 batch(es) to sample, 2 already complete" in capsys.readouterr().out
    again = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert again == first  # the refilled image is the same image
    assert _run("sample", *c) == 2  # a finished run is not sampled into again


def test_encode_decode_round_trip(model_dir, tmp_path):
    c = _common(model_dir)
    assert _run("sample", *c, "--num", 2, "--out", tmp_path / "x.npz") == 0
    assert _run("encode", *c, "--input", tmp_path / "x.npz", "--out", tmp_path / "z.npz") == 0
    assert _run("decode", *c, "--input", tmp_path / "z.npz", "--out", tmp_path / "y.npz") == 0
    z = np.load(tmp_path / "z.npz")["latents"]
    assert z.shape == (2, 3, 16, 16) and np.isfinite(z).all()
    x, y = np.load(tmp_path / "x.npz")["images"], np.load(tmp_path / "y.npz")["images"]
    # an untrained net with 4 steps: a loose but real check that decode inverts encode
    assert np.abs(x - y).mean() < 0.5 * np.abs(x).mean()


def test_interpolate_strip(model_dir, tmp_path):
    assert _run("interpolate", *_common(model_dir), "--seeds", 1, 2, "--num", 4, "--out", tmp_path / "s.npz") == 0
    imgs = np.load(tmp_path / "s.npz")["images"]
    assert imgs.shape == (4, 3, 16, 16)
    # the endpoints are the samples of seeds 1 and 2 (sample 0 of each)
    for k, seed in ((0, 1), (3, 2)):
        assert _run("sample", *_common(model_dir), "--num", 1, "--seed", seed, "--out", tmp_path / f"e{k}.npz") == 0
        np.testing.assert_allclose(imgs[k], np.load(tmp_path / f"e{k}.npz")["images"][0], atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--steps", 0], "steps must be an int"),
        (["sample", "--eta", -1], "eta must be finite and >= 0"),
        (["sample", "--num", 0], "--num must be >= 1"),
        (["sample", "--out", "x.txt"], "use a grid image (.png, .jpg, .jpeg, .webp, .bmp)"),
        (["sample", "--out", "x.gif"], "use a grid image (.png, .jpg"),
        (["sample", "--scale", 0], "--scale must be in [1, 64]"),
        (["encode", "--input", "missing.npz"], "no images at missing.npz"),
        (["sample", "--backend", "cuda_graph"], "needs a CUDA device"),
    ],
)
def test_errors_are_one_line(model_dir, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [argv[0], "--model", model_dir, "--no-progress", *argv[1:]]
    if "--backend" not in argv:
        argv += ["--backend", "reference"]
    assert _run(*argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_unknown_model_name_lists_the_bundled_ones(capsys):
    assert _run("sample", "--model", "no-such-model", "--no-progress") == 2
    assert "bundled" in capsys.readouterr().err


# -- training run folders, resumed folder runs, outputs and their formats, Ctrl-C, --sampler --------------
def _fake_run(root, steps=(2, 4)):
    """A training run folder as `ddim-fast train` leaves it: checkpoints/step-N (weights, EMA, trainer.json)
    and `latest`. Each checkpoint's weights differ, so the test sees which one was loaded."""
    emas = {}
    (root / "checkpoints").mkdir(parents=True)  # the trainer makes it; save_model makes only the checkpoint folder
    for step in steps:
        torch.manual_seed(step)
        m = dd.UNet(dd.UNetConfig.tiny())
        m.schedule = dd.NoiseSchedule.linear(100, 1e-3, 0.05)
        ema = {k: v + 0.01 * step for k, v in m.state_dict().items()}
        folder = save_model(root / "checkpoints" / f"step-{step:07d}", m, ema_state_dict=ema)
        (folder / "trainer.json").write_text(json.dumps({"step": step}))
        emas[step] = ema
    (root / "latest").write_text(f"step-{steps[-1]:07d}\n")
    return emas


def test_a_training_run_folder_loads_its_latest_checkpoints_ema(tmp_path, capsys):
    emas = _fake_run(tmp_path / "run")
    m = dd.load_model(tmp_path / "run")
    assert all(torch.equal(m.state_dict()[k], emas[4][k]) for k in emas[4])
    assert m.checkpoint_info["run"] == str(tmp_path / "run") and m.checkpoint_info["ema"] is True
    assert m.checkpoint_info["path"].endswith("step-0000004")
    assert _run("sample", "--model", tmp_path / "run", "--backend", "reference", "--steps", 4, "--no-progress",
                "--num", 1, "--out", tmp_path / "x.npz") == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'run'} is a training run: loading its latest checkpoint" in out and "step-0000004" in out
    assert "(EMA weights)" in out
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert _run("sample", "--model", tmp_path / "empty", "--out", tmp_path / "y.npz") == 2
    assert "training run folder without a complete checkpoint yet" in capsys.readouterr().err


def test_a_resume_with_other_settings_is_refused_and_names_them(model_dir, tmp_path, capsys):
    """An interrupted folder run continued with --steps/--eta/--seed changed."""
    out = tmp_path / "run"
    c = ["--model", model_dir, "--backend", "reference", "--no-progress", "--batch-size", 2, "--out", out]
    assert _run("sample", *c, "--num", 6, "--steps", 4) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({"complete": False, "settings": manifest["settings"]}))
    for i in (3, 4, 5):
        (out / f"{i:06d}.png").unlink()  # interrupted after 3 images
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _run("sample", *c, "--num", 6, "--steps", 5, "--eta", 1, "--seed", 5) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an unfinished run made with other settings" in err
    for part in ("steps: 4 in the folder, 5 now", "eta: 0.0 in the folder, 1.0 now", "seed: 0 in the folder, 5 now"):
        assert part in err, (part, err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    assert _run("sample", *c, "--num", 7, "--steps", 4) == 2
    assert "num: 6 in the folder, 7 now" in capsys.readouterr().err
    # --overwrite starts over: every image is the new settings', none of the old run's is kept
    assert _run("sample", *c, "--num", 4, "--steps", 5, "--eta", 1, "--seed", 5, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(4)] + ["manifest.json"]
    assert _run("sample", *c[:-1], tmp_path / "clean", "--num", 4, "--steps", 5, "--eta", 1, "--seed", 5) == 0
    for i in range(4):
        assert (out / f"{i:06d}.png").read_bytes() == (tmp_path / "clean" / f"{i:06d}.png").read_bytes()
    done = json.loads((out / "manifest.json").read_text())
    assert done["complete"] and done["settings"]["plan"]["steps"] == 5 and done["settings"]["seed"] == 5


def test_folder_images_without_a_manifest_are_not_adopted(model_dir, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "000000.png").write_bytes(b"made by something else")
    assert _run("sample", *_common(model_dir), "--num", 2, "--out", out) == 2
    assert "holds 1 image(s) but no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["x.npz", "x.png", "x.jpg", "folder"])
def test_an_output_in_a_missing_folder_is_refused_before_any_work(model_dir, tmp_path, monkeypatch, capsys, name):
    """Like mkdir without -p: a missing parent is one line naming it, before the model loads; nothing is
    created (the old behaviour created every missing folder, /nonexistent_dir at the root included)."""
    monkeypatch.setattr(dd.Engine, "__init__", lambda *a, **k: pytest.fail("built an Engine"))
    out = tmp_path / "new" / "deeper" / name
    assert _run("sample", *_common(model_dir), "--num", 2, "--out", out) == 2
    err = capsys.readouterr().err
    assert err == (f"ddim-fast sample: error: the folder {tmp_path / 'new' / 'deeper'} does not exist; create it "
                   "first (ddim-fast creates only the output folder itself)\n")
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_itself_is_created(model_dir, tmp_path):
    assert _run("sample", *_common(model_dir), "--num", 2, "--out", tmp_path / "run") == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["000000.png", "000001.png", "manifest.json"]


def test_encode_and_decode_refuse_missing_folders(model_dir, tmp_path, capsys):
    assert _run("sample", *_common(model_dir), "--num", 2, "--out", tmp_path / "x.npz") == 0
    assert _run("encode", *_common(model_dir), "--input", tmp_path / "x.npz", "--out", tmp_path / "a" / "z.npz") == 2
    assert f"the folder {tmp_path / 'a'} does not exist; create it first" in capsys.readouterr().err
    assert _run("encode", *_common(model_dir), "--input", tmp_path / "x.npz", "--out", tmp_path / "z.npz") == 0
    assert _run("decode", *_common(model_dir), "--input", tmp_path / "z.npz", "--out", tmp_path / "b" / "d.png") == 2
    assert f"the folder {tmp_path / 'b'} does not exist; create it first" in capsys.readouterr().err
    assert _run("decode", *_common(model_dir), "--input", tmp_path / "z.npz", "--out", tmp_path / "dec") == 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["000000.png", "000001.png", "manifest.json"]


def test_an_unwritable_output_fails_before_any_sampling(model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    calls = []
    monkeypatch.setattr(dd.Engine, "sample", lambda *a, **k: calls.append(1))
    assert _run("sample", *_common(model_dir), "--num", 2, "--out", tmp_path / "file" / "x.npz") == 2
    err = capsys.readouterr().err
    assert calls == [] and str(tmp_path / "file") in err and ".tmp" not in err


@pytest.mark.parametrize("suffix, magic", [(".jpg", b"\xff\xd8\xff"), (".jpeg", b"\xff\xd8\xff"),
                                           (".webp", b"RIFF"), (".bmp", b"BM"), (".png", b"\x89PNG")])
def test_a_grid_is_written_in_the_format_its_suffix_names(model_dir, tmp_path, suffix, magic):
    out = tmp_path / f"g{suffix}"
    assert _run("sample", *_common(model_dir), "--num", 4, "--out", out) == 0
    assert out.read_bytes().startswith(magic)
    assert _run("sample", *_common(model_dir), "--num", 4, "--out", tmp_path / "ref.png") == 0
    ref = np.asarray(Image.open(tmp_path / "ref.png"), dtype=np.float32)
    got = np.asarray(Image.open(out), dtype=np.float32)
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 3  # JPEG is lossy; the rest are exact
    if suffix in (".png", ".webp", ".bmp"):
        assert np.array_equal(got, ref)


def test_grid_separators_are_grey_and_scale_enlarges(model_dir, tmp_path):
    from ddim_fast.images import image_grid

    black = -torch.ones(4, 1, 3, 3)
    g = np.asarray(image_grid(black, nrow=2))
    assert g.shape == (9, 9) and g[0].tolist() == [128] * 9 and g[1, 1] == 0  # separators visible on black
    g2 = np.asarray(image_grid(black, nrow=2, scale=3))
    assert g2.shape == (27, 27) and np.array_equal(g2[::3, ::3], g)
    assert _run("sample", *_common(model_dir), "--num", 4, "--scale", 2, "--out", tmp_path / "s.png") == 0
    assert Image.open(tmp_path / "s.png").size == (2 * (2 * 17 + 1), 2 * (2 * 17 + 1))


def test_decode_keeps_the_names_encode_stored_and_encode_says_what_it_changed(model_dir, tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(src / "cat.png")
    Image.fromarray(rng.integers(0, 255, (24, 40), dtype=np.uint8)).save(src / "dog.png")  # grey, 40x24
    capsys.readouterr()
    assert _run("encode", *_common(model_dir), "--input", src, "--out", tmp_path / "z.npz") == 0
    out = capsys.readouterr().out
    assert "1 image(s) adapted to the model's 3x16x16 input" in out
    assert "dog.png: converted from L to RGB, centre-cropped from 40x24 to 24x24, resized from 24x24 to 16x16" in out
    assert "cat.png" not in out
    assert _run("decode", *_common(model_dir), "--input", tmp_path / "z.npz", "--out", tmp_path / "dec") == 0
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["cat.png", "dog.png", "manifest.json"]
    assert json.loads((tmp_path / "dec" / "manifest.json").read_text())["names"] == ["cat", "dog"]


def test_ctrl_c_in_sample_says_how_to_resume(model_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dd.Engine, "sample", interrupted)
    assert _run("sample", *_common(model_dir), "--num", 2, "--out", tmp_path / "dir") == 130
    err = capsys.readouterr().err
    assert err.startswith("ddim-fast sample: interrupted; ") and "rerun the same command to continue" in err
    assert _run("sample", *_common(model_dir), "--num", 2, "--out", tmp_path / "g.png") == 130
    assert "sample into a folder (--out DIR)" in capsys.readouterr().err


@pytest.mark.parametrize("options, header", [
    ([], "4 steps ddim eta=0, uniform spacing"),
    (["--sampler", "unipc", "--spacing", "trailing"], "4 steps unipc (order 2), trailing spacing"),
    (["--sampler", "plms", "--order", "2"], "4 steps plms (order 2, heun start, 5 network calls), uniform spacing"),
    (["--variance", "large", "--clip-x0", "1"], "4 steps ddim eta=1 [variance large], uniform spacing, x0 clipped to "
                                                "[-1, 1]"),
])
def test_the_header_names_the_sampler(model_dir, tmp_path, capsys, options, header):
    """The line before sampling says which sampler runs with which settings (plan.describe()); it used to print
    the variance in the sampler's place ("[ddim]" for --sampler unipc)."""
    assert _run("sample", *_common(model_dir), "--num", 1, *options, "--out", tmp_path / "x.npz") == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"model {model_dir} (") and f"M params), {header}, backend reference" in line, line
    assert _run("sample", *_common(model_dir), "--num", 1, *options, "--out", tmp_path / "run") == 0
    assert f"model {model_dir}, {header}, backend reference" in capsys.readouterr().out


def test_sample_with_a_multistep_sampler(model_dir, tmp_path, capsys):
    """--sampler: the npz equals the API's plan with the same options; a bad order is one line."""
    c = _common(model_dir)
    assert _run("sample", *c, "--num", 3, "--sampler", "unipc", "--order", 3, "--spacing", "trailing",
                "--out", tmp_path / "u.npz") == 0
    got = np.load(tmp_path / "u.npz")
    meta = json.loads(str(got["meta"]))["plan"]
    assert (meta["sampler"], meta["order"], meta["lower_order_final"]) == ("unipc", 3, True)
    m = dd.load_model(model_dir)
    plan = dd.SamplingPlan.build(m.schedule, 4, spacing="trailing", sampler="unipc", order=3)
    want = dd.Engine(m, plan, backend="reference").sample(3, seed=0)
    np.testing.assert_allclose(got["images"], want.numpy(), atol=1e-5)
    assert _run("sample", *c, "--num", 2, "--sampler", "dpmpp_2m", "--order", 3, "--out", tmp_path / "x.npz") == 2
    assert "takes order 1..2" in capsys.readouterr().err
