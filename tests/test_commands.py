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
    (out / "manifest.json").unlink()
    (out / "000003.png").unlink()  # as if killed mid-batch
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
        (["sample", "--out", "x.txt"], "use a .png grid"),
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


# -- issue 17 ---------------------------------------------------------------------------------------------
def _fake_run(root, steps=(2, 4)):
    """A training run folder as `ddim-fast train` leaves it: checkpoints/step-N (weights, EMA, trainer.json)
    and `latest`. Each checkpoint's weights differ, so the test sees which one was loaded."""
    emas = {}
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
