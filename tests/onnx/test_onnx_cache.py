"""The ONNX cache and the table-input sampler graphs (a deployment format: `ddim-fast export --whole-sampler
--graph table`): one torch export per (model, dtype), one sampler file per plan structure whatever its steps,
spacing or eta, a size-limited cache, the export timings behind the backend rule's estimate, and an unwritable
cache that falls back with one warning. (The backend rule: tests/backends/test_backend_rule.py.)"""

import copy
import json
import os
import warnings

import pytest
import torch

import ddim_fast as dd
from ddim_fast import onnx as dox
from ddim_fast.onnx import cache as oc
from ddim_fast.onnx import export as ex
from ddim_fast.onnx.graph import structure, table_feeds
from ddim_fast.onnx.runtime import OrtRunner
from ddim_fast.onnx.session import host_noise
from tests.helpers import assert_close_to_reference

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)


pytestmark = pytest.mark.usefixtures("onnx_cache_env")


def _truth(model, x_T, plan, seed):
    return dd.sample(copy.deepcopy(model).double().eval(), x_T.double(), plan, seed=seed)


def _run_table(model, plan, unroll, seed=3, batch=3):
    """The cached table-input graph of `plan` run on samples of `seed`, checked against the reference;
    returns (the file, the result)."""
    path = dox.export_cached(model, plan, table_inputs=True, unroll=unroll)
    shape = (3, 16, 16)
    x_T = dd.rng.initial_noise(seed, (batch, *shape))
    feeds = {"x_T" if plan.direction == "sample" else "x0": x_T, **table_feeds(plan)}
    if plan.needs_noise:
        feeds["noise"] = host_noise(plan, seed, x_T.shape)
    got = OrtRunner(path)(**feeds)
    if plan.direction == "sample":
        low, truth = dd.sample(model, x_T, plan, seed=seed), _truth(model, x_T, plan, seed)
    else:
        low, truth = dd.invert(model, x_T, plan), dd.invert(copy.deepcopy(model).double(), x_T.double(), plan)
    assert_close_to_reference(got, low, truth, torch.float32, f"{plan!r} unroll={unroll}")
    return path, got


# -- one graph for every plan of a structure ------------------------------------------------------------
def test_one_table_graph_serves_every_plan_of_a_structure(onnx_tiny):
    """Unrolled: one file per structure and S, whatever the spacing or eta."""
    plans = [dd.SamplingPlan.build(SCHED, 4), dd.SamplingPlan.build(SCHED, 4, spacing="quad"),
             dd.SamplingPlan.build(SCHED, 4, spacing="trailing", final_alpha=1.0)]
    before = dict(dox.stats)
    assert len({_run_table(onnx_tiny, plan, True)[0] for plan in plans}) == 1
    assert dox.stats["sampler_builds"] - before["sampler_builds"] <= 1  # none if an earlier test built it
    # noise is structure: eta > 0 takes another file, which then serves every eta > 0 at this S
    noisy = [dd.SamplingPlan.build(SCHED, 4, eta=0.5), dd.SamplingPlan.build(SCHED, 4, eta=1.0, spacing="quad")]
    paths = {_run_table(onnx_tiny, plan, True)[0] for plan in noisy}
    assert len(paths) == 1 and paths.isdisjoint({_run_table(onnx_tiny, plans[0], True)[0]})
    a, b = (_run_table(onnx_tiny, noisy[0], True, seed=s)[1] for s in (3, 4))
    assert (a - b).abs().max() > 1e-2  # the seed drives the fed noise
    before = dict(dox.stats)  # a new S builds a graph around the cached network: no torch export
    _run_table(onnx_tiny, dd.SamplingPlan.build(SCHED, 7, spacing="quad"), True)
    assert dox.stats["torch_exports"] == before["torch_exports"]


def test_one_table_loop_serves_every_number_of_steps(onnx_tiny):
    paths = {_run_table(onnx_tiny, plan, False)[0]
             for plan in (dd.SamplingPlan.build(SCHED, 3), dd.SamplingPlan.build(SCHED, 6, spacing="quad"))}
    assert len(paths) == 1


@pytest.mark.parametrize("unroll", [True, False])
def test_table_graph_equals_the_baked_graph(onnx_tiny, unroll):
    """The same operations on the same float32 numbers: fed or baked, the table gives the same result."""
    plan = dd.SamplingPlan.build(SCHED, 5, eta=0.3, clip_x0=1.0)
    _, table = _run_table(onnx_tiny, plan, unroll, seed=11, batch=4)
    x_T = dd.rng.initial_noise(11, (4, 3, 16, 16))
    baked = OrtRunner(dox.export_cached(onnx_tiny, plan, unroll=unroll))(x_T=x_T, noise=host_noise(plan, 11, x_T.shape))
    assert (table - baked).abs().max().item() <= 1e-6


def test_inversion_through_the_table_graph(onnx_tiny):
    _run_table(onnx_tiny, dd.SamplingPlan.build(SCHED, 4).inverse(), True, seed=5, batch=2)


def test_structure_keys_what_the_graph_depends_on():
    a = dd.SamplingPlan.build(SCHED, 10)
    assert structure(a) == structure(dd.SamplingPlan.build(SCHED, 7, spacing="quad"))
    assert structure(a) == structure(dd.SamplingPlan.build(SCHED, 12, spacing="trailing", final_alpha=1.0))
    assert structure(dd.SamplingPlan.build(SCHED, 3, eta=0.2)) == structure(dd.SamplingPlan.build(SCHED, 9, eta=1.0))
    for other in (dd.SamplingPlan.build(SCHED, 10, eta=0.5), dd.SamplingPlan.build(SCHED, 10, clip_x0=1.0),
                  dd.SamplingPlan.build(SCHED, 10, threshold=0.9), a.inverse(),
                  dd.SamplingPlan.build(SCHED, 10, variance="large")):  # sigma-hat draws noise even at eta = 0
        assert structure(other) != structure(a)


def test_exported_table_file_runs_any_plan(onnx_tiny, tmp_path):
    path = dd.export_onnx(onnx_tiny, tmp_path / "t.onnx", plan=dd.SamplingPlan.build(SCHED, 3), table_inputs=True,
                          unroll=False)
    meta = dox.onnx_metadata(path)
    assert meta["graph"] == "loop" and meta["table_inputs"]
    assert meta["structure"] == structure(dd.SamplingPlan.build(SCHED, 3))
    assert {"coef", "timesteps", "x_T"} <= set(meta["inputs"])
    runner = OrtRunner(path)
    for plan in (dd.SamplingPlan.build(SCHED, 7, spacing="quad"), dd.SamplingPlan.build(SCHED, 2)):
        x_T = dd.rng.initial_noise(1, (2, 3, 16, 16))
        got = runner(x_T=x_T, **table_feeds(plan))
        assert_close_to_reference(got, dd.sample(onnx_tiny, x_T, plan), dd.sample(copy.deepcopy(onnx_tiny).double(),
                                                                              x_T.double(), plan), torch.float32)


def test_table_inputs_refusals(onnx_tiny, tmp_path):
    with pytest.raises(ValueError, match="needs a plan"):
        dd.export_onnx(onnx_tiny, tmp_path / "a.onnx", table_inputs=True)
    with pytest.raises(ValueError, match="table_inputs must be"):
        dd.export_onnx(onnx_tiny, tmp_path / "a.onnx", plan=dd.SamplingPlan.build(SCHED, 3), table_inputs="yes")


# -- the cache: size limit, least recently used first, unwritable ---------------------------------------
def _fake_entries(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        p = folder / f"f{i}.onnx"
        p.write_bytes(b"x" * size)
        os.utime(p, (1000 + i, 1000 + i))  # f0 the least recently used
        paths.append(p)
    return paths


def test_prune_cache_drops_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIM_FAST_CACHE", str(tmp_path))
    paths = _fake_entries(tmp_path / "onnx", [400_000] * 4)
    os.utime(paths[0], None)  # f0 used just now: f1 is the oldest
    monkeypatch.setenv("DDIM_FAST_CACHE_MAX_MB", str(1_000_000 / 2**20))  # room for two of the four
    gone = oc.prune_cache(keep=paths[1])  # f1 is protected (just written)
    assert {p.name for p in gone} == {"f2.onnx", "f3.onnx"}
    assert paths[0].exists() and paths[1].exists()
    monkeypatch.setenv("DDIM_FAST_CACHE_MAX_MB", "0")
    assert {p.name for p in oc.prune_cache(keep=paths[1])} == {"f0.onnx"} and paths[1].exists()


def test_cache_limit_setting(monkeypatch):
    monkeypatch.delenv("DDIM_FAST_CACHE_MAX_MB", raising=False)
    assert oc.cache_limit_bytes() == oc.CACHE_MAX_MB * 2**20
    monkeypatch.setenv("DDIM_FAST_CACHE_MAX_MB", "1.5")
    assert oc.cache_limit_bytes() == int(1.5 * 2**20)
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("DDIM_FAST_CACHE_MAX_MB", bad)
        with pytest.raises(ValueError, match="DDIM_FAST_CACHE_MAX_MB"):
            oc.cache_limit_bytes()


def test_export_keeps_the_cache_under_its_limit(onnx_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DDIM_FAST_CACHE", str(tmp_path))
    old = _fake_entries(tmp_path / "onnx", [3_000_000, 3_000_000])
    monkeypatch.setenv("DDIM_FAST_CACHE_MAX_MB", "4")  # the tiny UNet's network file is ~1 MB
    path = ex.export_cached(onnx_tiny)
    assert path.parent == tmp_path / "onnx" and path.is_file()
    assert not any(p.exists() for p in old)  # the two old entries made room, the new one stays
    record = json.loads((tmp_path / "onnx" / "timings.json").read_text())["exports"][-1]
    assert record["seconds"] > 0 and record["exporter"] == "torchscript"
    assert record["params"] == sum(p.numel() for p in onnx_tiny.parameters())
    assert ex.export_estimate_s() > 0 and ex.network_cached(onnx_tiny)


def test_unwritable_cache_falls_back_with_one_warning(onnx_tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DDIM_FAST_CACHE", str(blocker / "cache"))  # mkdir fails, even for root
    monkeypatch.setattr(oc, "_fallback", {})
    plan = dd.SamplingPlan.build(SCHED, 3)
    with pytest.warns(UserWarning, match="cannot be written.*DDIM_FAST_CACHE") as record:
        eng = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    assert len([w for w in record if "cannot be written" in str(w.message)]) == 1
    fallback = oc._fallback["dir"]
    assert eng._backend.paths[0].parent == fallback
    x_T = dd.rng.initial_noise(3, (2, 3, 16, 16))
    assert_close_to_reference(eng(x_T), dd.sample(onnx_tiny, x_T, plan).clamp(-1, 1),
                              _truth(onnx_tiny, x_T, plan, 3).clamp(-1, 1), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning in this process; the export is found again
        hits = dox.stats["cache_hits"]
        dox.export_cached(onnx_tiny, dd.SamplingPlan.build(SCHED, 6))
        assert dox.stats["cache_hits"] > hits
    # nothing recorded where nothing can be written: the estimate is the default model's
    assert ex.export_estimate_s(10**6) == oc.default_export_s(10**6)


def test_export_estimate_scales_with_parameters_and_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIM_FAST_CACHE", str(tmp_path))
    assert oc.export_estimate_s(36e6) > oc.export_estimate_s(1e6) == oc.default_export_s(1e6)
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "timings.json").write_text('{"torch_export_s": 12.5}')  # an older file: ignored
    assert oc.export_estimate_s(1e6) == oc.default_export_s(1e6)
    for seconds in (3.0, 2.0, 1.0):  # this machine is twice as fast as the default model (the median)
        oc.record_export_time(seconds * oc.default_export_s(5e6), 5_000_000)
    oc.record_export_time(100.0, 5_000_000, "dynamo")  # a fallback export is not the TorchScript estimate
    assert oc.export_estimate_s(36e6) == pytest.approx(2.0 * oc.default_export_s(36e6))
    for _ in range(oc.TIMINGS_KEPT + 3):
        oc.record_export_time(1.0, 1000)
    assert len(json.loads((tmp_path / "onnx" / "timings.json").read_text())["exports"]) == oc.TIMINGS_KEPT


@pytest.mark.parametrize("unroll", [True, False])
def test_table_graphs_run_multistep_plans(onnx_tiny, unroll):
    """The history samplers through table-input graphs: the wider table, the pushes (built into an
    unrolled graph, so part of its key), and a Loop that serves any S."""
    for plan in (dd.SamplingPlan.build(SCHED, 5, sampler="dpmpp_2m", spacing="trailing"),
                 dd.SamplingPlan.build(SCHED, 5, sampler="unipc", spacing="quad"),
                 dd.SamplingPlan.build(SCHED, 4, sampler="plms")):
        _run_table(onnx_tiny, plan, unroll)
    a, b = dd.SamplingPlan.build(SCHED, 5, sampler="dpmpp_2m"), dd.SamplingPlan.build(SCHED, 7, sampler="dpmpp_2m")
    assert structure(a) == structure(b) and structure(a) != structure(dd.SamplingPlan.build(SCHED, 5))
