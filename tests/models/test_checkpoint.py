"""The ddim-fast checkpoint folder: bit-exact round trips, EMA choice, atomic and refused writes,
format detection, bundled names and the wrong-architecture error."""

import json
import os

import pytest
import torch

import ddim_fast as dd
from ddim_fast import checkpoint as ck
from ddim_fast.models.unet import UNet, UNetConfig
from ddim_fast.schedule import NoiseSchedule


def make_model(seed=0, config=None):
    torch.manual_seed(seed)
    m = UNet(config or UNetConfig.tiny())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m.schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)
    return m.eval()


def ema_of(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
T = torch.tensor([10, 900])


def test_round_trip_is_bit_exact(tmp_path):
    m = make_model()
    m.prediction = "v"
    m.schedule = NoiseSchedule.cosine(1000)
    extra = {"training": {"steps": 12, "dataset": "digits"}}
    path = ck.save_model(tmp_path / "ckpt", m, extra=extra)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["format"] == "ddim-fast" and cfg["version"] == 1 and cfg["prediction"] == "v"
    assert cfg["model"] == m.config.to_dict() and cfg["training"] == extra["training"]
    assert cfg["schedule"]["kind"] == "cosine"

    back = dd.load_model(path)
    assert not back.training and back.config == m.config and back.prediction == "v"
    assert torch.equal(back.schedule.alphas_cumprod, m.schedule.alphas_cumprod)
    assert same_weights(back.state_dict(), m.state_dict())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in back.parameters())
    with torch.no_grad():
        assert torch.equal(back(X, T), m(X, T))
    assert back.checkpoint_info["training"] == extra["training"] and back.checkpoint_info["ema"] is False


def test_wrapped_models_are_saved_as_the_unet(tmp_path):
    m = make_model()
    wrapped = torch.nn.DataParallel(m)  # keys would carry 'module.'; the checkpoint must not
    path = ck.save_model(tmp_path / "ckpt", wrapped)
    assert same_weights(dd.load_model(path).state_dict(), m.state_dict())


def test_built_model_does_not_alias_the_given_tensors():
    m = make_model()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    built = ck.build_model(m.config, sd)
    sd["conv_in.weight"].add_(1.0)
    assert torch.equal(built.conv_in.weight, m.conv_in.weight)


def test_ema_is_preferred_and_selectable(tmp_path):
    m = make_model()
    ema = ema_of(m)
    path = ck.save_model(tmp_path / "ckpt", m, ema_state_dict=ema)
    assert (path / "ema.safetensors").is_file()
    assert same_weights(dd.load_model(path).state_dict(), ema)
    assert same_weights(dd.load_model(path, ema=True).state_dict(), ema)
    assert same_weights(dd.load_model(path, ema=False).state_dict(), m.state_dict())
    # Naming one of the weight files picks it.
    assert same_weights(dd.load_model(path / "model.safetensors").state_dict(), m.state_dict())
    assert same_weights(dd.load_model(path / "ema.safetensors").state_dict(), ema)


def test_ema_required_but_absent(tmp_path):
    path = ck.save_model(tmp_path / "ckpt", make_model())
    with pytest.raises(ValueError, match="has no EMA weights.*ema=False"):
        dd.load_model(path, ema=True)


def test_bad_ema_is_refused_before_writing(tmp_path):
    m = make_model()
    ema = ema_of(m)
    ema.pop("conv_in.bias")
    with pytest.raises(ValueError, match=r"(?s)the EMA weights do not fit.*missing \(1\): conv_in.bias"):
        ck.save_model(tmp_path / "ckpt", m, ema_state_dict=ema)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_refused_unless_asked(tmp_path):
    path = ck.save_model(tmp_path / "ckpt", make_model(0))
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True \(CLI: --overwrite\)"):
        ck.save_model(path, make_model(1))
    assert same_weights(dd.load_model(path).state_dict(), make_model(0).state_dict())
    ck.save_model(path, make_model(1), overwrite=True)
    assert same_weights(dd.load_model(path).state_dict(), make_model(1).state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old folder left


def test_overwrite_never_replaces_unrelated_things(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not a ddim-fast checkpoint; refusing to replace it"):
        ck.save_model(folder, make_model(), overwrite=True)
    assert (folder / "holiday.jpg").read_bytes() == b"precious"
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    with pytest.raises(FileExistsError, match="not a checkpoint folder"):
        ck.save_model(file, make_model(), overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    ck.save_model(empty, make_model(), overwrite=True)  # an empty folder is fine to fill
    assert (empty / "model.safetensors").is_file()


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = ck.save_model(tmp_path / "ckpt", make_model(0))
    good = dd.load_model(path).state_dict()
    real = ck.atomic_save_safetensors
    calls = []

    def dies_on_ema(p, tensors, metadata=None):
        calls.append(p)
        if p.name == "ema.safetensors":
            raise KeyboardInterrupt  # e.g. Ctrl-C after config.json and model.safetensors are written
        return real(p, tensors, metadata)

    monkeypatch.setattr(ck, "atomic_save_safetensors", dies_on_ema)
    new = make_model(1)
    with pytest.raises(KeyboardInterrupt):
        ck.save_model(path, new, ema_state_dict=ema_of(new), overwrite=True)
    assert len(calls) == 2
    assert same_weights(dd.load_model(path).state_dict(), good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # An interrupted first save leaves nothing at the destination.
    with pytest.raises(KeyboardInterrupt):
        ck.save_model(tmp_path / "fresh", new, ema_state_dict=ema_of(new))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_final_move_restores_the_old_checkpoint(tmp_path, monkeypatch):
    path = ck.save_model(tmp_path / "ckpt", make_model(0))
    good = dd.load_model(path).state_dict()
    real = os.replace

    def fails_for_finished_folder(src, dst):
        if str(dst) == str(path) and ".tmp" in str(src):
            raise OSError("disk vanished")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", fails_for_finished_folder)
    with pytest.raises(OSError, match="disk vanished"):
        ck.save_model(path, make_model(1), overwrite=True)
    monkeypatch.undo()
    assert same_weights(dd.load_model(path).state_dict(), good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_model_checks_its_inputs(tmp_path):
    m = make_model()
    m.schedule = None
    with pytest.raises(ValueError, match=r"model.schedule is not set.*NoiseSchedule.linear"):
        ck.save_model(tmp_path / "a", m)
    m = make_model()
    with pytest.raises(ValueError, match=r"reserved key\(s\) \['model'\]"):
        ck.save_model(tmp_path / "a", m, extra={"model": 1})
    m.prediction = "noise"
    with pytest.raises(ValueError, match="model.prediction must be one of"):
        ck.save_model(tmp_path / "a", m)
    assert list(tmp_path.iterdir()) == []


def test_wrong_architecture_gives_the_helpful_error(tmp_path):
    path = ck.save_model(tmp_path / "ckpt", make_model())
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["ch_mult"] = [1, 2, 2]
    cfg["model"]["num_res_blocks"] = 2
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        dd.load_model(path)
    msg = str(e.value)
    assert "do not fit UNetConfig(" in msg
    assert "missing (" in msg and "down.0.block.1.conv1.weight" in msg
    assert "mis-shaped (" in msg and "vs model" in msg
    assert "unexpected (" not in msg  # the bigger config has every key the tiny weights have
    assert "up.1.block.1.conv1.weight (64, 96, 3, 3) vs model (64, 128, 3, 3)" in msg
    assert "num_res_blocks=1" in msg and "that is UNetConfig.tiny()" in msg


def test_load_model_names(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "ASSETS", tmp_path / "assets")
    with pytest.raises(FileNotFoundError, match="'digits' is neither a path nor a bundled model.*none are installed"):
        dd.load_model("digits")
    m = make_model()
    (tmp_path / "assets").mkdir()  # save_model creates the checkpoint folder, not the folders above it
    ck.save_model(tmp_path / "assets" / "mini", m)
    (tmp_path / "assets" / "classifier").mkdir()  # other assets (not ddim-fast models) are not listed
    (tmp_path / "assets" / "classifier" / "config.json").write_text('{"kind": "mlp"}')
    assert ck.bundled_names() == ["mini"]
    with pytest.raises(FileNotFoundError, match="bundled models: mini"):
        dd.load_model("classifier")
    assert same_weights(dd.load_model("mini").state_dict(), m.state_dict())
    with pytest.raises(FileNotFoundError, match="'digits' is neither a path nor a bundled model; bundled models: mini"):
        dd.load_model("digits")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        dd.load_model(tmp_path / "nope" / "ckpt.pth")


def test_format_detection_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a folder but not a model"):
        dd.load_model(tmp_path / "empty")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the format"):
        dd.load_model(tmp_path / "w.npz")


def test_newer_version_and_unknown_keys_are_refused(tmp_path):
    path = ck.save_model(tmp_path / "ckpt", make_model())
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "version": 2}))
    with pytest.raises(ValueError, match="version 2.*upgrade ddim-fast"):
        dd.load_model(path)
    cfg["model"]["attention_heads"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown UNetConfig key\(s\) \['attention_heads'\]"):
        dd.load_model(path)


def test_device_arguments(tmp_path):
    path = ck.save_model(tmp_path / "ckpt", make_model())
    assert next(dd.load_model(path, map_location="cpu").parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="disagree"):
        dd.load_model(path, device="cuda", map_location="cpu")
    with pytest.raises(ValueError, match="ema must be None"):
        dd.load_model(path, ema="yes")


def test_written_files_follow_the_umask(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the results get the usual modes."""
    import os
    import stat

    from ddim_fast.checkpoint import save_model
    from ddim_fast.files import atomic_write_bytes

    old = os.umask(0o022)
    try:
        f = atomic_write_bytes(tmp_path / "a.bin", b"x")
        m = UNet(UNetConfig.tiny())
        m.schedule = NoiseSchedule.linear(10)
        d = save_model(tmp_path / "ck", m)
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert stat.S_IMODE((d / "model.safetensors").stat().st_mode) == 0o644
