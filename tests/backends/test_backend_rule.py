"""The backend rule (engine.choose_backend), one for the library and the command line: `auto` on a CPU before
the model's ONNX export is cached weighs a Workload's time on the reference backend (one timed network call)
against exporting first plus ONNX Runtime's share of that time; the reason it gives names the numbers.
The estimates are monkeypatched, so every branch is decided here, not by this machine's speed."""

import argparse

import pytest
import torch

import ddim_fast as dd
from ddim_fast import engine
from ddim_fast.cli import common
from ddim_fast.onnx import cache as oc
from ddim_fast.onnx import export as ex

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)


class Net(torch.nn.Module):
    """A small conv model (its export takes a second)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.schedule = SCHED

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (t.float() / 1000).view(-1, 1, 1, 1)


SHAPE = (1, 8, 8)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIM_FAST_CACHE", str(tmp_path))
    return tmp_path


def _engine(model, **kw):
    return dd.Engine(model, dd.SamplingPlan.build(SCHED, 10), device="cpu", shape=SHAPE, **kw)


def test_a_short_job_runs_on_the_reference_backend_and_says_why(empty_cache, monkeypatch):
    monkeypatch.setattr(oc, "export_estimate_s", lambda params=None: 1e4)
    monkeypatch.setattr(engine, "probe_per_sample_s", lambda model, batch, dtype, shape: (0.002, min(batch, 4)))
    eng = _engine(Net(), workload=dd.Workload(images=6, batch=4))
    assert eng.backend == "reference"
    # 2 ms per sample-call x 6 images x 10 steps = 0.12 s, against 10000 s of export
    assert eng.backend_reason.startswith("auto: CPU device -> reference, eager PyTorch; without onnxruntime: this job "
                                         "(6 images x 10 network calls; 2.00 ms per sample-call on the reference "
                                         "backend, timed at batch 4) takes ~0.1 s on the reference backend, against "
                                         "~10000 s to export")
    assert f"({engine.ORT_TIME_FRACTION:g} x) on ONNX Runtime: the reference backend is faster" in eng.backend_reason
    assert not ex.network_cached(Net(), shape=SHAPE)  # nothing was exported


def test_a_long_job_exports_first(empty_cache, monkeypatch):
    monkeypatch.setattr(oc, "export_estimate_s", lambda params=None: 5.0)
    monkeypatch.setattr(engine, "ORT_TIME_FRACTION", 0.5)
    monkeypatch.setattr(engine, "probe_per_sample_s", lambda model, batch, dtype, shape: (0.01, batch))
    eng = _engine(Net(), workload=dd.Workload(images=1000, batch=100, guided=False))  # 100 s on the reference
    assert eng.backend == "onnxruntime"
    assert ("takes ~100.0 s on the reference backend, against ~5 s to export the model to ONNX first and ~50.0 s "
            "(0.5 x) on ONNX Runtime") in eng.backend_reason
    assert "exporting first is faster" in eng.backend_reason
    assert ex.network_cached(Net(), shape=SHAPE)


def test_guidance_doubles_the_network_batch(empty_cache, monkeypatch):
    seen = []
    monkeypatch.setattr(oc, "export_estimate_s", lambda params=None: 1e4)
    monkeypatch.setattr(engine, "probe_per_sample_s", lambda model, batch, dtype, shape: seen.append(batch) or (1, 1))
    eng = _engine(Net(), workload=dd.Workload(images=3, batch=2, guided=True))
    assert seen == [4] and "3 images x 10 network calls, guided" in eng.backend_reason
    assert "takes ~60.0 s on the reference backend" in eng.backend_reason  # 1 s x 2 x 3 images x 10 steps


def test_a_cached_export_and_the_library_default_take_onnxruntime(empty_cache, monkeypatch):
    monkeypatch.setattr(oc, "export_estimate_s", lambda params=None: 7.0)
    eng = _engine(Net(seed=1))  # no workload: the library exports (once, then cached)
    assert eng.backend == "onnxruntime"
    assert eng.backend_reason == ("auto: CPU device -> onnxruntime, ONNX Runtime (fastest measured on CPU); "
                                  "exporting the model to ONNX first (about 7 s here, once; cached for later Engines "
                                  "and commands)")
    monkeypatch.setattr(oc, "export_estimate_s", lambda params=None: 1e6)
    monkeypatch.setattr(engine, "probe_per_sample_s", lambda *a: pytest.fail("no probe once the export is cached"))
    eng = _engine(Net(seed=1), workload=dd.Workload(images=1))
    assert eng.backend == "onnxruntime" and eng.backend_reason.endswith("; the model's ONNX export is cached")


def test_bfloat16_and_explicit_backends(monkeypatch):
    eng = _engine(Net(), dtype=torch.bfloat16)
    assert eng.backend == "reference" and "without onnxruntime: it runs fp32 and fp16 networks, not bf16" in \
        eng.backend_reason
    monkeypatch.setattr(engine, "probe_per_sample_s", lambda *a: pytest.fail("an explicit backend is not weighed"))
    assert _engine(Net(), backend="reference", workload=dd.Workload(images=9)).backend_reason == "requested: reference"


def test_the_probe_times_a_real_call_within_its_budget(monkeypatch):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    per_sample, batch = engine.probe_per_sample_s(model, 16, torch.float32, SHAPE)
    assert per_sample > 0 and batch == 16  # a call of this model at batch 16 fits PROBE_BUDGET_S
    monkeypatch.setattr(engine, "PROBE_BUDGET_S", 0.0)
    assert engine.probe_per_sample_s(model, 16, torch.float32, SHAPE)[1] == 1  # over budget: batch 1 only
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_workloads():
    for kw, match in (({"images": 0}, "images must be a positive int"), ({"images": 2, "batch": 0}, "batch"),
                      ({"images": 2, "guided": "yes"}, "guided must be True or False")):
        with pytest.raises(ValueError, match=match):
            dd.Workload(**kw)
    with pytest.raises(ValueError, match=r"workload must be a dd.Workload"):
        _engine(Net(), workload=64)


def test_the_command_line_passes_its_job_and_keeps_the_reason(onnx_tiny, empty_cache, monkeypatch):
    """cli/common.engine: the Workload of the command (images, --batch-size, --guidance); the Engine's reason
    is the one printed."""
    seen = {}

    def probe(model, batch, dtype, shape):
        seen["batch"] = batch
        return 0.001, batch

    monkeypatch.setattr(engine, "probe_per_sample_s", probe)
    monkeypatch.setattr(oc, "export_estimate_s", lambda params=None: 1e4)
    args = argparse.Namespace(backend="auto", device="cpu", dtype="fp32", batch_size=4, progress=False,
                              guidance=None, steps=10)
    eng, _ = common.engine(args, model=onnx_tiny, plan=dd.SamplingPlan.build(SCHED, 10), images=10)
    assert eng.backend == "reference" and seen["batch"] == 4
    assert "this job (10 images x 10 network calls;" in eng.backend_reason
