"""The sampler written in ONNX (onnx/graph.py): dynamic thresholding as TopK order statistics equals
the reference's, and no exported sampler carries an initializer no node reads."""

import pytest
import torch

import ddim_fast as dd
from ddim_fast.onnx import graph as onnx_graph
from ddim_fast.sampling import dynamic_threshold

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)


pytestmark = pytest.mark.usefixtures("onnx_cache_env")


@pytest.mark.parametrize("numel,p", [(192, 0.9), (192, 0.995), (192, 1.0), (7, 0.5), (101, 0.37), (1, 0.8)])
def test_threshold_graph_equals_dynamic_threshold(numel, p):
    from onnx import TensorProto, helper

    b = onnx_graph.Builder()
    shape = ["B", numel, 1, 1]
    out = onnx_graph.threshold_ops(b, "x0", p, 1.7, numel)
    graph = helper.make_graph(b.nodes, "thr", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x0 = 1.4 * torch.randn(4, numel, 1, 1, generator=torch.Generator().manual_seed(numel))
    got = torch.from_numpy(sess.run(None, {"x0": x0.numpy()})[0])
    want = dynamic_threshold(x0, p, 1.7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# -- no unused initializers (plain onnxruntime warns about each, on every load) ----------------------------
def _read_names(graph):
    """Every value name a node of `graph` (or of its subgraphs: Loop bodies) reads, plus its outputs."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(i for i in node.input if i)
        for a in node.attribute:
            for sub in ([a.g] if a.type == a.GRAPH else []) + list(a.graphs):
                names |= _read_names(sub)
    return names


def _unused_initializers(graph):
    read = _read_names(graph)
    out = [i.name for i in graph.initializer if i.name not in read]
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == a.GRAPH else []) + list(a.graphs):
                out += _unused_initializers(sub)
    return out


@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "loop"])
@pytest.mark.parametrize("kw", [dict(), dict(eta=0.5), dict(variance="large"), dict(clip_x0=1.0),
                                dict(threshold=0.9, threshold_max=1.5), dict(eta=1.0, clip_x0=0.8)],
                         ids=["ddim", "eta", "sigma_hat", "clip", "threshold", "ddpm_clip"])
def test_sampler_exports_carry_no_unused_initializers(onnx_tiny, kw, unroll, tmp_path, capfd):
    plan = dd.SamplingPlan.build(SCHED, 4, **kw)
    path = dd.export_onnx(onnx_tiny, tmp_path / "s.onnx", plan=plan, unroll=unroll, validate=False)
    proto = onnx.load(str(path))
    assert len(proto.graph.initializer) > 100  # the network's weights are in there
    assert _unused_initializers(proto.graph) == []
    capfd.readouterr()
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # default options and logging
    assert "Removing initializer" not in capfd.readouterr().err
    inv = dd.export_onnx(onnx_tiny, tmp_path / "i.onnx", plan=dd.SamplingPlan.build(SCHED, 4).inverse(), unroll=unroll,
                         validate=False)
    assert _unused_initializers(onnx.load(str(inv)).graph) == []
