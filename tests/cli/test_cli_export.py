"""`ddim-fast export` (cli/export.py): the whole sampler with its options, refusals before any work."""

import argparse

import pytest

from ddim_fast import onnx as dox
from ddim_fast.cli.export import Export

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


pytestmark = pytest.mark.usefixtures("onnx_cache_env")


def test_cli_export(onnx_tiny, tmp_path, capsys):
    from ddim_fast.checkpoint import save_model

    save_model(tmp_path / "ckpt", onnx_tiny)
    parser = argparse.ArgumentParser()
    Export.add_arguments(parser)
    out = tmp_path / "cli.onnx"
    argv = ["--model", str(tmp_path / "ckpt"), "--out", str(out), "--whole-sampler", "--steps", "3",
            "--eta", "0.5", "--graph", "loop"]
    assert Export.run(parser.parse_args(argv)) == 0
    meta = dox.onnx_metadata(out)
    assert meta["plan"]["steps"] == 3 and meta["plan"]["eta"] == 0.5 and meta["graph"] == "loop"
    assert "noise" in meta["inputs"] and "wrote" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--overwrite"):
        Export.run(parser.parse_args(argv))
    with pytest.raises(ValueError, match="--whole-sampler"):
        Export.run(parser.parse_args(["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "e.onnx"),
                                        "--steps", "3"]))


def test_cli_export_table_graph(onnx_tiny, tmp_path, capsys):
    from ddim_fast.checkpoint import save_model

    save_model(tmp_path / "ckpt", onnx_tiny)
    parser = argparse.ArgumentParser()
    Export.add_arguments(parser)
    out = tmp_path / "table.onnx"
    assert Export.run(parser.parse_args(["--model", str(tmp_path / "ckpt"), "--out", str(out), "--whole-sampler",
                                         "--steps", "3", "--graph", "table"])) == 0
    meta = dox.onnx_metadata(out)
    assert meta["graph"] == "loop" and meta["table_inputs"] and {"coef", "timesteps"} <= set(meta["inputs"])
    assert "any steps" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--whole-sampler"):
        Export.run(parser.parse_args(["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "e.onnx"),
                                      "--graph", "table"]))


def test_cli_export_multistep_sampler(onnx_tiny, tmp_path):
    """export --whole-sampler --sampler NAME: the metadata names the sampler and its options."""
    from ddim_fast.checkpoint import save_model

    save_model(tmp_path / "ckpt", onnx_tiny)
    parser = argparse.ArgumentParser()
    Export.add_arguments(parser)
    out = tmp_path / "ms.onnx"
    argv = ["--model", str(tmp_path / "ckpt"), "--out", str(out), "--whole-sampler", "--steps", "3",
            "--sampler", "plms", "--plms-start", "euler", "--graph", "loop"]
    assert Export.run(parser.parse_args(argv)) == 0
    plan = dox.onnx_metadata(out)["plan"]
    assert (plan["sampler"], plan["plms_start"], plan["order"], plan["steps"]) == ("plms", "euler", 4, 3)
    with pytest.raises(ValueError, match="--sampler only applies to --whole-sampler"):
        Export.run(parser.parse_args(["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "e.onnx"),
                                        "--sampler", "unipc"]))
