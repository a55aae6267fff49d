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
    printed = capsys.readouterr().out
    assert "any steps" in printed and f"wrote {tmp_path / 'table.table.npz'}: this plan's coef and timesteps" in printed
    import numpy as np  # the table of the exported plan, beside the graph, for a deployment without ddim-fast

    table = np.load(tmp_path / "table.table.npz", allow_pickle=False)
    assert table["coef"].shape == (3, 6) and table["timesteps"].tolist() == [666, 333, 0]
    assert table["columns"].tolist() == meta["structure"]["columns"]
    assert [c.split(":")[0] for c in meta["columns"]] == table["columns"].tolist()
    with pytest.raises(FileExistsError, match="table.onnx already exists"):  # both refused before any work
        Export.run(parser.parse_args(["--model", str(tmp_path / "ckpt"), "--out", str(out), "--whole-sampler",
                                      "--graph", "table"]))
    out.unlink()
    with pytest.raises(FileExistsError, match=r"table.table.npz \(the table written beside a table-input graph\) "
                                              "already exists; pass --overwrite"):
        Export.run(parser.parse_args(["--model", str(tmp_path / "ckpt"), "--out", str(out), "--whole-sampler",
                                      "--graph", "table"]))
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
