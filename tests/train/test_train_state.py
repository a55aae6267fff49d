"""A training run's state on disk (train_state.py): the checkpoint layout, exporting the EMA weights,
pruning, a checkpoint write that dies mid-way, the `latest` pointer, and refused resumes."""

import json
from pathlib import Path

import pytest
import torch

import ddim_fast as dd
from ddim_fast import train as T
from ddim_fast import train_state
from tests.helpers import quiet, train_config


def test_checkpoint_layout_and_load_model(tmp_path):
    res = T.train(train_config(tmp_path, prediction="v", grid_size=4, steps=2, dropout=0.1), log=quiet)
    ck = tmp_path / "checkpoints" / "step-0000002"
    assert res.checkpoint == ck and (tmp_path / "latest").read_text().strip() == ck.name
    names = {p.name for p in ck.iterdir()}
    assert names == {"config.json", "model.safetensors", "ema.safetensors", "trainer.safetensors",
                     "trainer.json", "samples.png"}
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["prediction"] == "v" and cfg["schedule"]["kind"] == "linear" and cfg["training"]["step"] == 2
    assert cfg["model"]["dropout"] == 0.1
    model = dd.load_model(ck)
    assert model.prediction == "v" and model.checkpoint_info["ema"] is True
    raw = dd.load_model(ck, ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), raw.state_dict().values()))
    from PIL import Image

    with Image.open(ck / "samples.png") as im:  # 2x2 grid of 16 px images, 1 px apart
        assert im.size == (2 * 17 + 1, 2 * 17 + 1) and im.mode == "RGB"
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())
    # the sampling-only export (how the bundled model ships): EMA weights as model.safetensors
    exported = train_state.export_ema(tmp_path, tmp_path / "export", extra={"note": "test"})
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    small = dd.load_model(exported)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), model.state_dict().values()))
    info = small.checkpoint_info["training"]
    assert info["weights"] == "ema" and info["step"] == 2 and info["note"] == "test" and small.prediction == "v"


def test_keep_prunes_old_checkpoints(tmp_path):
    T.train(train_config(tmp_path, steps=6, save_every=1, keep=2), log=quiet)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000005", "step-0000006"]


def test_interrupted_checkpoint_never_replaces_the_last_good_one(tmp_path, monkeypatch):
    T.train(train_config(tmp_path, steps=2), log=quiet)
    good = tmp_path / "checkpoints" / "step-0000002"
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    real = train_state.atomic_save_safetensors

    def crash(path, tensors, metadata=None):
        if Path(path).name == train_state.TRAINER_FILE:  # the model files are written; die mid-checkpoint
            Path(path).write_bytes(b"half")
            raise OSError("disk full (simulated)")
        return real(path, tensors, metadata)

    monkeypatch.setattr(train_state, "atomic_save_safetensors", crash)
    with pytest.raises(OSError, match="simulated"):
        T.train(train_config(tmp_path, steps=4, resume=True), log=quiet)
    assert (tmp_path / "latest").read_text().strip() == "step-0000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002"]  # no debris
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert T.find_latest_checkpoint(tmp_path) == good
    monkeypatch.undo()
    debris = tmp_path / "checkpoints" / ".step-0000004.tmp-dead"  # what a SIGKILL mid-write leaves
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"half")
    res = T.train(train_config(tmp_path, steps=4, resume=True), log=quiet)
    assert res.resumed_from == 2 and res.step == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_latest_falls_back_to_the_newest_complete_folder(tmp_path):
    T.train(train_config(tmp_path, steps=4), log=quiet)
    (tmp_path / "latest").write_text("step-0000099\n")  # points at nothing
    assert T.find_latest_checkpoint(tmp_path).name == "step-0000004"
    (tmp_path / "checkpoints" / "step-0000006").mkdir()  # incomplete: no trainer.json
    assert T.find_latest_checkpoint(tmp_path).name == "step-0000004"


def test_resume_refuses_other_options_and_fresh_runs_refuse_old_folders(tmp_path):
    T.train(train_config(tmp_path, steps=2), log=quiet)
    with pytest.raises(FileExistsError, match="--resume"):
        T.train(train_config(tmp_path, steps=4), log=quiet)
    with pytest.raises(ValueError, match="lr: checkpoint 0.001 vs now 0.002"):
        T.train(train_config(tmp_path, steps=4, lr=2e-3, resume=True), log=quiet)
    msgs = []
    T.train(train_config(tmp_path / "new", steps=1, resume=True), log=msgs.append)
    assert any("no checkpoint" in m for m in msgs)
