"""The `ddim-fast` command as a new user meets it: missing extras, --help, --version,
Ctrl-C, progress notes, Triton as an optional extra."""

import subprocess
import sys

import pytest

from ddim_fast import cli
from ddim_fast import train as T
from ddim_fast.checks import MissingExtra, is_int, require
from tests.helpers import ROOT

TRAIN = ["train", "--config", "tiny", "--steps", "2", "--batch-size", "4", "--save-every", "1", "--grid-size", "0",
         "--no-progress"]


def _one_line(err):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- optional extras: one line naming the extra, before any work --------------------------------------------
def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"needs scikit-learn, which is not installed: pip install 'ddim-fast\["):
        require("sklearn", "train", "the digits dataset")
    require("numpy", "core", "numpy")  # present: nothing happens


def test_train_digits_without_scikit_learn(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    # the sub-module the trainer looks for too: once an earlier test in this process loaded the digits,
    # find_spec("sklearn.datasets") answers from sys.modules without looking at the parent
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main([*TRAIN, "--dataset", "digits", "--out", str(tmp_path / "run")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "pip install 'ddim-fast[train]'" in err and not (tmp_path / "run").exists()


def test_bench_quick_without_matplotlib_stops_before_measuring(monkeypatch, capsys):
    import benchmarks.speedup_vs_ddpm as bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("measured before checking matplotlib"))
    assert cli.main(["bench", "speedup_vs_ddpm", "--quick"]) == 2
    assert "pip install 'ddim-fast[bench]'" in _one_line(capsys.readouterr().err)


def test_export_without_onnx(tmp_path, monkeypatch, capsys):
    from ddim_fast import checkpoint

    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    assert cli.main(["export", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "pip install 'ddim-fast[onnx]'" in _one_line(capsys.readouterr().err)


# -- --help, --version ---------------------------------------------------------------------------------------
def test_help_shows_defaults_and_version(capsys):
    assert cli.main(["sample", "--help"]) == 0
    out = capsys.readouterr().out
    for shown in ("sampling steps S (default: 20)", "(default: digits)", "(default: 64)", "(default: auto)"):
        assert shown in " ".join(out.split()), shown
    assert "(default: True)" not in out and "(default: False)" not in out  # flags show no default
    assert cli.main(["train", "--help"]) == 0
    assert "(default: 0.0002)" in capsys.readouterr().out  # --lr has no help text of its own
    assert cli.main(["--version"]) == 0
    from ddim_fast import __version__

    assert capsys.readouterr().out.strip() == f"ddim-fast {__version__}"


# -- train: what it is doing, and Ctrl-C ----------------------------------------------------------------------
def test_train_says_it_draws_the_grid_and_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = [*TRAIN[:-3], "--grid-size", "4", "--no-progress", "--dataset", "synthetic:8", "--out", str(out)]
    real = T.Trainer.train_step

    def stop_at_step_2(self):
        if self.step == 1:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(T.Trainer, "train_step", stop_at_step_2)
    assert cli.main(args) == 130
    cap = capsys.readouterr()
    assert "step 1: drawing the checkpoint's sample grid (4 images, DDIM-20, EMA weights)" in cap.out
    err = _one_line(cap.err)
    assert err.startswith("ddim-fast train: interrupted; the last checkpoint is ")
    assert "step-0000001; continue from it with the same command plus --resume" in err
    assert cli.main([*args, "--resume"]) == 130  # interrupted again at once: still says where it is
    assert "with the same command\n" in capsys.readouterr().err
    monkeypatch.setattr(T.Trainer, "train_step", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main([*args[:-1], str(tmp_path / "fresh")]) == 130
    assert "no checkpoint was saved yet" in capsys.readouterr().err


# -- numpy integers -------------------------------------------------------------------------------------------
def test_is_int():
    import numpy as np

    assert is_int(3) and is_int(np.int64(3)) and is_int(np.uint8(3))
    assert not is_int(True) and not is_int(np.bool_(True)) and not is_int(3.0) and not is_int("3")


# -- Triton is an extra -----------------------------------------------------------------------------------------
NO_TRITON = "import sys; sys.modules['triton'] = None\n"  # what a venv without triton looks like to imports


@pytest.mark.parametrize("code, message", [
    ("import ddim_fast.kernels.ddim_step", "pip install 'ddim-fast[gpu]'"),
    ("from ddim_fast.models.ops import get_ops; get_ops('triton')", "pip install 'ddim-fast[gpu]'"),
    ("import torch, ddim_fast as dd\n"
     "from ddim_fast.models.analytic import GaussianEps\n"
     "s = dd.NoiseSchedule.linear(100)\n"
     "dd.Engine(GaussianEps(s), dd.SamplingPlan.build(s, 4), backend='triton', device='cpu', shape=(1, 4, 4))",
     "pip install 'ddim-fast[gpu]'"),
])
def test_without_triton_one_clear_line(code, message):
    run = subprocess.run([sys.executable, "-c", NO_TRITON + code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert run.returncode != 0 and message in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]


def test_without_triton_the_cpu_paths_run():
    code = NO_TRITON + (
        "import torch, ddim_fast as dd\n"
        "m = dd.load_model('digits')\n"
        "eng = dd.Engine(m, dd.SamplingPlan.build(m.schedule, 4), backend='reference', device='cpu')\n"
        "x = eng.sample(2, seed=0)\n"
        "assert x.shape == (2, 1, 16, 16) and 'triton' not in sys.modules or sys.modules['triton'] is None\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", "import sys\n" + code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_pyproject_makes_triton_an_extra():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in meta["dependencies"])
    for extra in ("gpu", "dev"):
        assert any(d.startswith("triton") for d in meta["optional-dependencies"][extra]), extra




def test_numpy_integers_are_accepted_where_ints_are():
    import json

    import numpy as np
    import torch

    import ddim_fast as dd
    from ddim_fast.models.analytic import GaussianEps

    cfg = dd.UNetConfig(in_channels=np.int64(1), out_channels=np.int32(1), resolution=np.int64(8), ch=np.int64(16),
                        ch_mult=[np.int64(1), np.int64(2)], num_res_blocks=np.int64(1),
                        attn_resolutions=[np.int64(4)], num_groups=np.int64(8), dropout=0.0)
    json.dumps(cfg.to_dict())
    assert cfg == dd.UNetConfig(in_channels=1, out_channels=1, resolution=8, ch=16, ch_mult=(1, 2),
                                num_res_blocks=1, attn_resolutions=(4,), num_groups=8, dropout=0.0)
    sched = dd.NoiseSchedule.linear(np.int64(100), 1e-3, 0.05)
    assert dd.timesteps(np.int64(100), np.int64(10)).tolist() == list(range(90, -1, -10))
    plan = dd.SamplingPlan.build(sched, np.int64(5), eta=0.5)
    eng = dd.Engine(GaussianEps(sched), plan, backend="reference", device="cpu", shape=(1, 4, 4),
                    max_graphs=np.int64(2))
    a = eng.sample(np.int64(3), seed=np.int64(7), first_index=np.int32(2))
    b = eng.sample(3, seed=7, first_index=2)
    assert torch.equal(a, b)
    assert dd.rng.check_seed(np.uint32(5)) == 5 and type(dd.rng.check_seed(np.uint32(5))) is int
    assert dd.slerp(torch.ones(2), -torch.ones(2) + 2.1, np.float32(0.5)).shape == (2,)
    for bad in (True, np.bool_(True), 2.0):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            eng.sample(bad)
