"""Atomic writes (files.py): the destination is replaced whole or not at all, errors name the user's path."""

import json

import pytest
import torch

from ddim_fast import files


def test_atomic_helpers(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    files.atomic_write_json(target, {"x": [1, 2.5, "y"]})
    assert json.loads(target.read_text()) == {"x": [1, 2.5, "y"]}
    with pytest.raises(ValueError, match="not JSON-able"):
        files.atomic_write_json(target, {"x": object()})
    with pytest.raises(ValueError, match="not JSON-able"):
        files.atomic_write_json(target, {"x": float("nan")})
    assert json.loads(target.read_text()) == {"x": [1, 2.5, "y"]}

    files.atomic_write_bytes(tmp_path / "b.bin", b"old")
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        files.atomic_write_bytes(tmp_path / "b.bin", b"new")
    monkeypatch.undo()
    assert (tmp_path / "b.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]

    from safetensors.torch import load_file
    t = {"w": torch.arange(6.0).reshape(2, 3).t()}  # non-contiguous on purpose
    files.atomic_save_safetensors(tmp_path / "w.safetensors", t, {"note": "hi"})
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], t["w"])


def test_atomic_writes_name_the_users_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        files.atomic_write_bytes(tmp_path / "missing" / "x.npz", b"1")
    assert e.value.filename == str(tmp_path / "missing" / "x.npz")
