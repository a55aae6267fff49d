"""Tier 4: onnx/session.py's NetworkSession, the one ONNX object of the CPU path (gets or exports the network,
checks it, opens the session, builds the feeds, runs, repairs), and the exporters behind it: TorchScript
first, dynamo when TorchScript raises or its graph fails the check against the float64 reference."""

import copy
import logging

import pytest
import torch

import ddim_fast as dd
from ddim_fast import onnx as dox
from ddim_fast.models.analytic import GaussianEps
from ddim_fast.onnx import export as ex
from ddim_fast.onnx import session as se
from ddim_fast.onnx.network import exporters_for
from ddim_fast.onnx.runtime import DamagedOnnxFile, OrtRunner, read_proto
from ddim_fast.precision import tolerance_ok
from tests.helpers import class_unet

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
GSHAPE = (2, 3, 5)


pytestmark = pytest.mark.usefixtures("onnx_cache_env")


def _network_error(net, model, x, t, **cond):
    """(max |ORT - float64|, max |float32 torch - float64|) of one network call."""
    with torch.no_grad():
        truth = copy.deepcopy(model).double().eval()(x.double(), t, **cond)
        low = model.eval()(x, t, **cond)
    return (net(x, t, **cond).double() - truth).abs().max().item(), (low.double() - truth).abs().max().item()


def test_network_session_is_the_network(onnx_tiny):
    net = se.NetworkSession(onnx_tiny)
    assert net.exporter == "torchscript" and dox.onnx_metadata(net.path)["kind"] == "eps_model"
    g = torch.Generator().manual_seed(3)
    for batch in (1, 2, 5):  # fresh inputs, batches the graph was not traced at (3)
        x = torch.randn(batch, 3, 16, 16, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        err, ref_err = _network_error(net, onnx_tiny, x, t)
        assert tolerance_ok(err, ref_err, torch.float32), (batch, err, ref_err)
        assert net(x, t).dtype == torch.float32 and net(x, t).shape == x.shape
    with pytest.raises(ValueError, match="takes no conditioning, not class_labels"):
        net(x, t, class_labels=torch.zeros(batch, dtype=torch.long))


def test_a_conditional_network_takes_its_null_label(cond_tiny):
    net = se.NetworkSession(cond_tiny)
    assert net.names == ["class_labels"]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 999])
    y = torch.tensor([0, 2, 1], dtype=torch.int32)  # any integer dtype: fed as int64
    err, ref_err = _network_error(net, cond_tiny, x, t, class_labels=y.long())
    assert tolerance_ok(err, ref_err, torch.float32)
    null = torch.full((3,), cond_tiny.config.num_classes)
    torch.testing.assert_close(net(x, t), net(x, t, class_labels=null), rtol=0, atol=0)


@pytest.fixture(scope="module")
def cond_tiny():
    return class_unet(3, seed=1)


def test_sessions_are_kept_per_file_device_and_threads(onnx_tiny):
    first = se.NetworkSession(onnx_tiny)
    before = dict(dox.stats)
    again = se.NetworkSession(copy.deepcopy(onnx_tiny))
    assert again.runner is first.runner and dox.stats == before
    other = se.NetworkSession(onnx_tiny, threads=1)  # another session of the same cached file
    assert other.runner is not first.runner and other.path == first.path
    assert dox.stats["sessions"] == before["sessions"] + 1 and dox.stats["torch_exports"] == before["torch_exports"]
    se.clear_sessions()
    se.NetworkSession(onnx_tiny)
    assert dox.stats["sessions"] == before["sessions"] + 2 and dox.stats["torch_exports"] == before["torch_exports"]


def test_a_damaged_cache_entry_is_exported_again(onnx_tiny):
    path = se.NetworkSession(onnx_tiny).path
    good = se.NetworkSession(onnx_tiny)(torch.ones(1, 3, 16, 16), torch.tensor([3]))
    path.write_bytes(path.read_bytes()[:1000])  # truncated on disk
    with pytest.raises(DamagedOnnxFile) as e:
        read_proto(path)
    assert e.value.path == path and "re-export it" in str(e.value)
    with pytest.raises(DamagedOnnxFile):
        OrtRunner(path)
    se.clear_sessions()
    exports = dox.stats["torch_exports"]
    with pytest.warns(UserWarning, match="re-exporting the damaged cache entry"):
        net = se.NetworkSession(onnx_tiny)
    assert dox.stats["torch_exports"] == exports + 1 and read_proto(net.path)
    torch.testing.assert_close(net(torch.ones(1, 3, 16, 16), torch.tensor([3])), good, rtol=0, atol=0)


def test_other_session_errors_are_not_taken_for_damage(onnx_tiny, monkeypatch):
    se.clear_sessions()

    def broken(*a, **k):
        raise ValueError("something else went wrong")

    monkeypatch.setattr(se, "OrtRunner", broken)
    with pytest.raises(ValueError, match="something else went wrong"):
        se.NetworkSession(onnx_tiny)


# -- the exporters ----------------------------------------------------------------------------------------
def test_exporters_for_an_opset():
    assert exporters_for(None) == ("torchscript", "dynamo") and exporters_for(20) == ("torchscript", "dynamo")
    assert exporters_for(21) == ("dynamo",)  # TorchScript writes opsets up to 20


@pytest.mark.parametrize("failure", ["raises", "fails the check"])
def test_dynamo_takes_over_from_torchscript(failure, monkeypatch, caplog):
    """The fallback, with the same check: TorchScript raising, or TorchScript's graph wrong (here: the graph of
    another model). The file's metadata and the log say that dynamo made it."""
    real = ex.torch_export

    def torchscript_fails(model, dtype, opset, shape, cond=None, exporter="torchscript", copy=None):
        if exporter == "torchscript":
            if failure == "raises":
                raise ValueError("torch.onnx (torchscript) could not export it (simulated)")
            return real(GaussianEps(SCHED, mu=0.9), dtype, opset, shape, cond, exporter)  # a wrong graph
        return real(model, dtype, opset, shape, cond, exporter, copy)

    monkeypatch.setattr(ex, "torch_export", torchscript_fails)
    model = GaussianEps(SCHED, mu=0.1 if failure == "raises" else 0.2)  # its own cache entry
    exports = dox.stats["torch_exports"]
    with caplog.at_level(logging.INFO, logger="ddim_fast"):
        net = se.NetworkSession(model, shape=GSHAPE)
    assert net.exporter == "dynamo"
    assert dox.stats["torch_exports"] == exports + (1 if failure == "raises" else 2)
    log = caplog.text
    assert "TorchScript exporter failed" in log if failure == "raises" else "failed the check" in log
    assert "exported the network with the dynamo (torch.export) exporter" in log
    x = torch.randn(4, *GSHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 200, 600, 999])
    err, ref_err = _network_error(net, model, x, t)
    assert tolerance_ok(err, ref_err, torch.float32)


def test_when_both_exporters_fail_the_error_names_both(monkeypatch):
    def wrong(model, dtype, opset, shape, cond=None, exporter="torchscript", copy=None):
        raise ValueError(f"torch.onnx ({exporter}) could not export it (simulated)")

    monkeypatch.setattr(ex, "torch_export", wrong)
    with pytest.raises(ValueError, match=r"neither torch.onnx exporter .*TorchScript: .*dynamo \(torch.export\): "):
        se.NetworkSession(GaussianEps(SCHED, mu=0.05), shape=GSHAPE)
