"""Tier 4: the ONNX export and the ONNX Runtime backend against the reference (CPU EP), plus the
GPU tier (CUDA EP, IO binding), which is skipped without CUDA.

Every parity check uses docs/DESIGN.md's tolerance rule (tests/helpers.py, assert_close_to_reference): error
against a float64 reference <= 2 x the error of the torch reference in the same precision + atol.
The expensive step, torch.onnx tracing the tiny UNet, happens once for the module (a shared cache
folder); GaussianEps exports are cheap.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch

import ddim_fast as dd
from ddim_fast import onnx as dox
from ddim_fast.models.analytic import GaussianEps
from ddim_fast.onnx import export, graph
from ddim_fast.onnx.network import Network, quiet_exporter
from ddim_fast.onnx.validate import check_loop_tables, head
from ddim_fast.plan import COL
from tests.helpers import assert_close_to_reference

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)
GSHAPE = (3, 8, 8)  # GaussianEps is size-agnostic; small keeps the float64 runs cheap


pytestmark = pytest.mark.usefixtures("onnx_cache_env")


@pytest.fixture(scope="module")
def gauss():
    return GaussianEps(SCHED, mu=0.3, std=0.5)


def _float64(model):
    return copy.deepcopy(model).double().eval()


# -- the eps-model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_eps_model_matches_the_reference(onnx_tiny, onnx_tiny_eps, batch):
    runner = dox.OrtRunner(onnx_tiny_eps)
    assert runner.inputs == ["x", "t"]
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    got = runner(x=x, t=t)
    assert got.shape == x.shape and got.dtype == torch.float32
    with torch.no_grad():
        ref64 = _float64(onnx_tiny)(x.double(), t)
        ref32 = onnx_tiny(x, t)
    assert ref64.abs().max() > 0.1
    assert_close_to_reference(got, ref32, ref64, torch.float32)


def test_eps_model_metadata_round_trip(onnx_tiny, onnx_tiny_eps):
    meta = dox.onnx_metadata(onnx_tiny_eps)
    assert meta["kind"] == "eps_model"
    assert dd.UNetConfig.from_dict(meta["model_config"]) == onnx_tiny.config
    assert torch.equal(dd.NoiseSchedule.from_dict(meta["schedule"]).betas, SCHED.betas)
    assert meta["prediction"] == "eps" and meta["dtype"] == "fp32" and meta["version"] == dd.__version__
    assert meta["shape"] == [3, 16, 16]
    assert "plan" not in meta


def test_conditional_unet_export(tmp_path):
    """export_onnx of a class-conditional UNet takes the labels as a third input (the network
    graph carries the model's conditioning inputs); fed the null label it is the unconditional branch.
    A graph that takes the labels as a third input (what a
    guided export builds on) exports through torch.onnx too and runs in ONNX Runtime."""
    torch.manual_seed(1)
    m = dd.UNet(dd.UNetConfig(**{**dd.UNetConfig.tiny().to_dict(), "num_classes": 4})).eval()
    m.schedule = SCHED
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([5, 500, 950]), torch.tensor([0, 3, 4])
    runner = dox.OrtRunner(dd.export_onnx(m, tmp_path / "null.onnx"))
    assert runner.inputs == ["x", "t", "class_labels"]
    assert dox.onnx_metadata(tmp_path / "null.onnx")["model_config"]["num_classes"] == 4
    with torch.no_grad():
        null32, null64 = m(x, t), _float64(m)(x.double(), t)
        cond32 = m(x, t, class_labels=y)
        cond64 = _float64(m)(x.double(), t, class_labels=y)
    assert_close_to_reference(runner(x=x, t=t, class_labels=torch.full((3,), 4)), null32, null64, torch.float32)
    assert_close_to_reference(runner(x=x, t=t, class_labels=y), cond32, cond64, torch.float32)

    class WithLabels(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, class_labels):
            return self.net(x, t, class_labels=class_labels)

    batch = torch.export.Dim("batch", min=1, max=1024)
    with quiet_exporter(), torch.no_grad():
        prog = torch.onnx.export(WithLabels(m), (x[:2], t[:2], y[:2]), None, dynamo=True,
                                 input_names=["x", "t", "class_labels"], output_names=["prediction"],
                                 dynamic_shapes={"x": {0: batch}, "t": {0: batch}, "class_labels": {0: batch}})
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"x": x.numpy(), "t": t.numpy(), "class_labels": y.numpy()})[0])
    assert_close_to_reference(got, cond32, cond64, torch.float32)
    assert (got - null32)[:2].abs().max() > 1e-3  # labels 0 and 3 are not the null label 4


# -- the whole sampler --------------------------------------------------------------------------------
PLANS = {
    "ddim": dict(steps=6),
    "eta": dict(steps=6, eta=0.7),
    "sigma_hat": dict(steps=6, variance="large"),
    "clip": dict(steps=6, clip_x0=0.6),
    "threshold": dict(steps=6, threshold=0.9, threshold_max=1.3),
    "v_quad": dict(steps=5, spacing="quad", prediction="v", eta=0.3),
    "x0_clip": dict(steps=5, prediction="x0", clip_x0=(-0.5, 0.9)),
}


def _reference(model, plan, x, noise):
    """(float64 reference, float32 reference) of a plan from x with explicit noise."""
    m64 = _float64(model)
    if plan.direction == "invert":
        return dd.invert(m64, x.double(), plan), dd.invert(model, x, plan)
    n64 = noise.double() if noise is not None else None
    return dd.sample(m64, x.double(), plan, noise=n64), dd.sample(model, x, plan, noise=noise)


@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "loop"])
@pytest.mark.parametrize("name", list(PLANS) + ["invert", "invert_target"])
def test_whole_sampler_matches_the_reference(name, unroll, tmp_path):
    if name.startswith("invert"):
        plan = dd.SamplingPlan.build(SCHED, 6).inverse("target" if name == "invert_target" else "current")
        pred = "eps"
    else:
        plan = dd.SamplingPlan.build(SCHED, **PLANS[name])
        pred = plan.prediction
    model = GaussianEps(SCHED, mu=0.3, std=0.5, prediction=pred)
    path = dd.export_onnx(model, tmp_path / "s.onnx", plan=plan, shape=GSHAPE, unroll=unroll)
    meta = dox.onnx_metadata(path)
    assert meta["plan"] == plan.describe()
    assert meta["graph"] == ("unrolled" if unroll else "loop")
    runner = dox.OrtRunner(path)
    g = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(3, *GSHAPE, generator=g)
    noise = torch.randn(plan.steps, *x.shape, generator=g) if plan.needs_noise else None
    x_in = "x_T" if plan.direction == "sample" else "x0"
    assert sorted(runner.inputs) == sorted([x_in] + (["noise"] if noise is not None else []))
    feeds = {x_in: x} if noise is None else {x_in: x, "noise": noise}
    got = runner(**feeds)
    ref64, ref32 = _reference(model, plan, x, noise)
    assert_close_to_reference(got, ref32, ref64, torch.float32)
    if plan.threshold is not None or plan.clip_x0 is not None:  # the clip must really act here
        free = dd.SamplingPlan.build(SCHED, **{k: v for k, v in PLANS[name].items()
                                               if k not in ("clip_x0", "threshold", "threshold_max")})
        unclipped = dd.sample(_float64(model), x.double(), free, noise=None if noise is None else noise.double())
        assert (unclipped - ref64).abs().max() > 1e-3


@pytest.mark.parametrize("opset", [18, 23])
def test_opset_is_honoured(tmp_path, opset):
    plan = dd.SamplingPlan.build(SCHED, 3, threshold=0.9)
    path = dd.export_onnx(GaussianEps(SCHED), tmp_path / "o.onnx", plan=plan, shape=GSHAPE, opset=opset)
    assert dox.onnx_metadata(path)["opset"] == opset
    assert {o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")} == {opset}


def test_fp16_network_keeps_a_float32_state(tmp_path):
    model = GaussianEps(SCHED)
    plan = dd.SamplingPlan.build(SCHED, 5, eta=0.5)
    path = dd.export_onnx(model, tmp_path / "h.onnx", plan=plan, dtype=torch.float16, shape=GSHAPE)
    proto = onnx.load(str(path))
    assert {o.type.tensor_type.elem_type for o in proto.graph.output} == {onnx.TensorProto.FLOAT}
    casts = [a.i for n in proto.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert onnx.TensorProto.FLOAT16 in casts  # the network runs in fp16 inside the graph
    assert dox.onnx_metadata(path)["dtype"] == "fp16"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, *GSHAPE, generator=g)
    noise = torch.randn(plan.steps, *x.shape, generator=g)
    got = dox.OrtRunner(path)(x_T=x, noise=noise)
    half = Network(copy.deepcopy(model).half(), torch.float16)
    ref16 = dd.sample(half, x, plan, noise=noise)
    ref64 = dd.sample(_float64(model), x.double(), plan, noise=noise.double())
    assert (ref16.double() - ref64).abs().max() > 1e-5  # fp16 really is in the graph's reference
    assert_close_to_reference(got, ref16, ref64, torch.float16)


def test_fingerprint_sees_plain_attributes():
    assert dox.model_fingerprint(GaussianEps(SCHED, mu=0.3)) != dox.model_fingerprint(GaussianEps(SCHED, mu=0.4))
    assert dox.model_fingerprint(GaussianEps(SCHED)) == dox.model_fingerprint(GaussianEps(SCHED))


# -- validation and clear errors ---------------------------------------------------------------------
def test_export_validation_fails_loudly_and_writes_nothing(tmp_path, monkeypatch):
    plan = dd.SamplingPlan.build(SCHED, 5, threshold=0.8)
    monkeypatch.setattr(graph, "threshold_ops", lambda b, x0, *a: x0)  # a graph that forgets to threshold
    out = tmp_path / "bad.onnx"
    with pytest.raises(dox.ExportValidationError, match="does not match the reference"):
        dd.export_onnx(GaussianEps(SCHED), out, plan=plan, shape=GSHAPE)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_validate_export_rejects_another_model(tmp_path):
    path = dd.export_onnx(GaussianEps(SCHED, mu=0.3), tmp_path / "a.onnx", shape=GSHAPE)
    with pytest.raises(dox.ExportValidationError):
        dox.validate_export(path, GaussianEps(SCHED, mu=0.35), None, shape=GSHAPE)


def test_a_graph_over_protobufs_2_gib_limit_is_refused_with_the_way_out(monkeypatch):
    import onnx
    from google.protobuf.message import EncodeError

    small = onnx.ModelProto(producer_name="ddim-fast")
    assert export._serialized(small) == small.SerializeToString()

    class Oversized:  # what protobuf does with a message over its limit, without allocating 2 GiB
        def __init__(self, tensor_bytes):
            body = onnx.helper.make_graph([], "body", [], [], [onnx.numpy_helper.from_array(
                np.zeros(tensor_bytes // 8, np.float32), "w")])  # half the tensors in a Loop's body
            loop = onnx.helper.make_node("Loop", ["n", "c"], ["y"], body=body)
            self.graph = onnx.helper.make_graph([loop], "g", [], [], [onnx.numpy_helper.from_array(
                np.zeros(tensor_bytes // 8, np.float32), "v")])

        def SerializeToString(self):
            raise EncodeError("Failed to serialize proto")

    monkeypatch.setattr(export, "PROTOBUF_LIMIT", 4000)
    with pytest.raises(ValueError, match=r"over protobuf's 2 GiB limit.*eps-model.*unroll=False"):
        export._serialized(Oversized(4000))
    with pytest.raises(EncodeError):  # a failure with small tensors is protobuf's own: passed on as it is
        export._serialized(Oversized(400))


def test_bad_export_arguments(onnx_tiny, tmp_path):
    with pytest.raises(ValueError, match="float16"):
        dd.export_onnx(onnx_tiny, tmp_path / "b.onnx", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="opset"):
        dd.export_onnx(onnx_tiny, tmp_path / "b.onnx", opset=9)
    with pytest.raises(ValueError, match="prediction='eps'"):
        dd.export_onnx(onnx_tiny, tmp_path / "b.onnx", plan=dd.SamplingPlan.build(SCHED, 3, prediction="v"))
    with pytest.raises(ValueError, match="shape"):
        dd.export_onnx(GaussianEps(SCHED), tmp_path / "b.onnx")
    with pytest.raises(ValueError, match="bfloat16"):
        dd.Engine(onnx_tiny, dd.SamplingPlan.build(SCHED, 3), backend="onnxruntime", device="cpu", dtype=torch.bfloat16)


def test_long_loop_exports_validate_the_body_and_the_tables(gauss, tmp_path, monkeypatch):
    """A Loop longer than VALIDATE_LOOP_STEPS is validated on its first steps plus an exact check of
    its tables; the exported graph still runs every step and matches the reference."""
    monkeypatch.setattr(export, "VALIDATE_LOOP_STEPS", 3)
    plan = dd.SamplingPlan.build(SCHED, 12, eta=0.5)
    path = dd.export_onnx(gauss, tmp_path / "loop.onnx", plan=plan, shape=GSHAPE, unroll=False)
    x = dd.rng.initial_noise(0, (2, *GSHAPE))
    noise = torch.stack([dd.rng.step_noise(1, i, x.shape) for i in range(plan.steps)])
    got = dox.OrtRunner(path)(x_T=x, noise=noise)
    truth = dd.sample(_float64(gauss), x.double(), plan, noise=noise.double())
    assert_close_to_reference(got, dd.sample(gauss, x, plan, noise=noise), truth, torch.float32, "long loop")
    proto = onnx.load(str(path))
    check_loop_tables(proto, plan)  # the written tables are the plan's
    table = next(t for t in proto.graph.initializer if t.name.startswith("ddim/coef_table_"))
    arr = onnx.numpy_helper.to_array(table).copy()
    arr[7, 2] += 1e-3  # one coefficient of one late step, beyond the validated head
    table.CopyFrom(onnx.numpy_helper.from_array(arr, table.name))
    with pytest.raises(dox.ExportValidationError, match="tables differ"):
        check_loop_tables(proto, plan)


def test_a_validation_head_keeps_the_noise_input_of_its_plan():
    """head(plan, k): the first k steps; when those draw no noise but the plan does, sigma (and only sigma)
    is nudged so the validated graph takes the same noise input. The plan's own table is untouched."""
    plan = dd.SamplingPlan.build(SCHED, 6, eta=0.5)
    coef = plan.coef.clone()
    coef[:2, COL["sigma"]] = 0.0  # the first two steps draw nothing
    plan = dataclasses.replace(plan, coef=coef)
    first = head(plan, 2)
    assert plan.needs_noise and first.needs_noise and first.steps == 2
    assert torch.equal(plan.coef, coef)
    assert torch.equal(first.column("sigma"), torch.full((2,), 1e-3, dtype=torch.float64))
    others = [j for j in range(6) if j != COL["sigma"]]
    assert torch.equal(first.coef[:, others], coef[:2, others])
    assert torch.equal(head(plan, 4).coef, coef[:4])  # noise in the head already: the table as it is


# -- a table-input graph fed without ddim_fast ------------------------------------------------------------
def _docs_block(heading):
    """The first ```python block under `heading` in docs/onnx.md."""
    from tests.helpers import ROOT

    text = (ROOT / "docs" / "onnx.md").read_text()
    section = text[text.index(f"## {heading}\n"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]


def test_the_table_graph_runs_without_ddim_fast(gauss, tmp_path):
    """export_onnx(table_inputs=True) writes <name>.table.npz beside the graph and names every column's formula
    in the metadata; docs/onnx.md's recipe, run in a process that cannot import ddim_fast or torch (numpy and
    onnxruntime only), feeds the graph from the .npz and from the documented DDIM formulas, and both runs meet
    the tolerance rule against dd.sample."""
    import json
    import subprocess
    import sys

    exported = dd.SamplingPlan.build(SCHED, 10, eta=0.3)
    path = dd.export_onnx(gauss, tmp_path / "ddim-any.onnx", plan=exported, shape=GSHAPE, unroll=False,
                          table_inputs=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddim-any.onnx", "ddim-any.table.npz"]
    table = np.load(tmp_path / "ddim-any.table.npz", allow_pickle=False)
    assert table["coef"].dtype == np.float32 and table["coef"].shape == (10, 6)
    assert np.array_equal(table["coef"], exported.coef.float().numpy())
    assert table["timesteps"].dtype == np.int64 and table["timesteps"].tolist() == exported.timesteps.tolist()
    assert table["columns"].tolist() == ["cx", "ce", "d0", "dx", "de", "sigma"]
    assert json.loads(str(table["plan"])) == exported.describe()
    meta = dox.onnx_metadata(path)
    columns = dict(c.split(": ", 1) for c in meta["columns"])
    assert list(columns) == ["cx", "ce", "d0", "dx", "de", "sigma"]  # in the table's order
    assert columns["d0"].startswith("weight of clip(x0) in x': sqrt(a') (DDIM)")
    assert "eta sqrt((1-a')/(1-a)) sqrt(1 - a/a') (DDIM)" in columns["sigma"]
    assert meta["update"].startswith("x' = d0 * clip(x0) + dx * x + de * m")

    script = ("import sys\nsys.modules.update(ddim_fast=None, torch=None)  # neither may be imported\n"
              + _docs_block("Feeding the table graph without ddim_fast")
              + "\nnp.savez('result.npz', x_T=x_T, timesteps=timesteps, x0=x0, noise=noise, x0_exported=x0_exported,"
                " noise_exported=noise_exported)\n"
                "assert not [m for m, v in sys.modules.items() if m.split('.')[0] in ('ddim_fast', 'torch') and v]\n")
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "result.npz")
    x_T = torch.from_numpy(got["x_T"])
    for x0, plan, noise in ((got["x0_exported"], exported, got["noise_exported"]),
                            (got["x0"], dd.SamplingPlan.build(SCHED, 25, eta=0.5), got["noise"])):
        assert got["timesteps"].tolist() == dd.SamplingPlan.build(SCHED, 25).timesteps.tolist()
        z = torch.from_numpy(noise)
        reference = dd.sample(gauss, x_T, plan, noise=z)
        truth = dd.sample(_float64(gauss), x_T.double(), plan, noise=z.double())
        assert_close_to_reference(torch.from_numpy(x0), reference, truth, torch.float32, f"{plan.steps} steps")
