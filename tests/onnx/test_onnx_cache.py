"""The ONNX cache and the table-input sampler graph: one torch export per (model,
dtype), one sampler graph per plan structure whatever its steps, spacing or eta, a size-limited cache,
an unwritable cache that falls back with one warning, and the CLI's `auto` on a CPU that never makes a
command slower than the reference backend (but for its one timed network call)."""

import argparse
import copy
import json
import os
import time
import warnings

import pytest
import torch

import ddim_fast as dd
from ddim_fast import onnx as dox
from ddim_fast.cli import common
from ddim_fast.onnx import cache as oc
from ddim_fast.onnx import export as ex
from ddim_fast.onnx.graph import structure, table_feeds
from ddim_fast.onnx.runtime import OrtRunner
from tests.helpers import assert_close_to_reference

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)


pytestmark = pytest.mark.usefixtures("onnx_cache_env")


def _truth(model, x_T, plan, seed):
    return dd.sample(copy.deepcopy(model).double().eval(), x_T.double(), plan, seed=seed).clamp(-1, 1)


def _check(eng, ref_eng, model, plan, seed=3, batch=3):
    got, want = eng.sample(batch, seed=seed), ref_eng.sample(batch, seed=seed)
    x_T = dd.rng.initial_noise(seed, (batch, *eng.shape))
    assert_close_to_reference(got, want, _truth(model, x_T, plan, seed), torch.float32)
    return got


# -- one graph for every plan of a structure ------------------------------------------------------------
def test_one_table_graph_serves_every_plan_of_a_structure(onnx_tiny):
    """Unrolled (the CPU default up to UNROLL_MAX_STEPS): one graph per structure and S."""
    plans = [dd.SamplingPlan.build(SCHED, 4), dd.SamplingPlan.build(SCHED, 4, spacing="quad"),
             dd.SamplingPlan.build(SCHED, 4, spacing="trailing", final_alpha=1.0)]
    before = dict(dox.stats)
    for plan in plans:
        eng = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
        assert eng._backend.table_inputs  # the CPU default
        _check(eng, dd.Engine(onnx_tiny, plan, backend="reference", device="cpu"), onnx_tiny, plan)
    # at most one sampler graph for the three plans (none if an earlier test built this one)
    assert dox.stats["sampler_builds"] - before["sampler_builds"] <= 1
    # noise is structure: eta > 0 takes another graph, which then serves every eta > 0 at this S
    noisy = [dd.SamplingPlan.build(SCHED, 4, eta=0.5), dd.SamplingPlan.build(SCHED, 4, eta=1.0, spacing="quad")]
    before = dict(dox.stats)
    for plan in noisy:
        eng = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
        got = _check(eng, dd.Engine(onnx_tiny, plan, backend="reference", device="cpu"), onnx_tiny, plan)
        assert (eng.sample(3, seed=4) - got).abs().max() > 1e-2  # the seed drives the fed noise
    assert dox.stats["sampler_builds"] - before["sampler_builds"] <= 1
    # a new S builds a graph around the cached network: no torch export
    before = dict(dox.stats)
    plan = dd.SamplingPlan.build(SCHED, 7, spacing="quad")
    _check(dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu"),
           dd.Engine(onnx_tiny, plan, backend="reference", device="cpu"), onnx_tiny, plan)
    assert dox.stats["torch_exports"] == before["torch_exports"]


def test_one_table_loop_serves_every_number_of_steps(onnx_tiny):
    before = dict(dox.stats)
    for plan in (dd.SamplingPlan.build(SCHED, 3), dd.SamplingPlan.build(SCHED, 6, spacing="quad")):
        eng = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu", onnx_options={"unroll": False})
        _check(eng, dd.Engine(onnx_tiny, plan, backend="reference", device="cpu"), onnx_tiny, plan)
    assert dox.stats["sampler_builds"] - before["sampler_builds"] <= 1


@pytest.mark.parametrize("unroll", [True, False])
def test_table_graph_equals_the_baked_graph(onnx_tiny, unroll):
    """The same operations on the same float32 numbers: fed or baked, the table gives the same result."""
    plan = dd.SamplingPlan.build(SCHED, 5, eta=0.3, clip_x0=1.0)
    table = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu", onnx_options={"unroll": unroll})
    baked = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu",
                      onnx_options={"unroll": unroll, "table_inputs": False})
    assert table._backend.table_inputs and not baked._backend.table_inputs
    a, b = table.sample(4, seed=11), baked.sample(4, seed=11)
    assert (a - b).abs().max().item() <= 1e-6


def test_inversion_through_the_table_graph(onnx_tiny):
    plan = dd.SamplingPlan.build(SCHED, 4)
    eng = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu")
    x0 = dd.rng.initial_noise(5, (2, *eng.shape)).clamp(-1, 1)
    got = eng.invert(x0)
    want = dd.Engine(onnx_tiny, plan, backend="reference", device="cpu").invert(x0)
    truth = dd.invert(copy.deepcopy(onnx_tiny).double().eval(), x0.double(), plan.inverse())
    assert_close_to_reference(got, want, truth, torch.float32)


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
        dd.Engine(onnx_tiny, dd.SamplingPlan.build(SCHED, 3), backend="onnxruntime", device="cpu",
                  onnx_options={"table_inputs": "yes"})


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
    assert json.loads((tmp_path / "onnx" / "timings.json").read_text())["torch_export_s"] > 0
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
    assert eng._backend.paths["sample"].parent == fallback
    _check(eng, dd.Engine(onnx_tiny, plan, backend="reference", device="cpu"), onnx_tiny, plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning in this process; the export is found again
        hits = dox.stats["cache_hits"]
        dd.Engine(onnx_tiny, dd.SamplingPlan.build(SCHED, 6), backend="onnxruntime", device="cpu")
        assert dox.stats["cache_hits"] > hits
    assert ex.export_estimate_s() == ex.DEFAULT_EXPORT_S  # nothing recorded where nothing can be written


# -- the CLI's auto on a CPU -------------------------------------------------------------------------------
def _args(**kw):
    return argparse.Namespace(**{"backend": "auto", "device": "cpu", "dtype": "fp32", "batch_size": 4,
                                 "progress": False, **kw})


def test_cli_auto_takes_the_reference_backend_when_exporting_would_cost_more(onnx_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DDIM_FAST_CACHE", str(tmp_path))  # nothing cached
    plan = dd.SamplingPlan.build(SCHED, 3)
    monkeypatch.setattr(ex, "export_estimate_s", lambda: 1e6)
    eng, _ = common.engine(_args(), model=onnx_tiny, plan=plan, images=2)
    assert eng.backend == "reference" and "shorter than the one-off ONNX export" in eng.backend_reason
    assert not ex.network_cached(onnx_tiny)  # nothing was exported
    monkeypatch.setattr(ex, "export_estimate_s", lambda: 0.0)  # an export that costs nothing pays off
    eng, _ = common.engine(_args(), model=onnx_tiny, plan=plan, images=2)
    assert eng.backend == "onnxruntime" and "more than exporting" in eng.backend_reason
    assert ex.network_cached(onnx_tiny)
    monkeypatch.setattr(ex, "export_estimate_s", lambda: 1e6)  # cached now: no estimate is needed
    eng, _ = common.engine(_args(), model=onnx_tiny, plan=dd.SamplingPlan.build(SCHED, 5), images=1)
    assert eng.backend == "onnxruntime"


def test_cli_probe_times_one_network_call(onnx_tiny):
    t0 = time.perf_counter()
    s = common._probe_s(onnx_tiny, 2, torch.float32)
    assert 0 < s <= time.perf_counter() - t0


@pytest.mark.parametrize("unroll", [None, False])
def test_table_graphs_run_multistep_plans(onnx_tiny, unroll):
    """The history samplers through table-input graphs: the wider table, the pushes (built into an
    unrolled graph, so part of its key), and a Loop that serves any S."""
    opts = {"unroll": unroll}
    for plan in (dd.SamplingPlan.build(SCHED, 5, sampler="dpmpp_2m", spacing="trailing"),
                 dd.SamplingPlan.build(SCHED, 5, sampler="unipc", spacing="quad"),
                 dd.SamplingPlan.build(SCHED, 4, sampler="plms")):
        eng = dd.Engine(onnx_tiny, plan, backend="onnxruntime", device="cpu", onnx_options=opts)
        _check(eng, dd.Engine(onnx_tiny, plan, backend="reference", device="cpu"), onnx_tiny, plan)
    a, b = dd.SamplingPlan.build(SCHED, 5, sampler="dpmpp_2m"), dd.SamplingPlan.build(SCHED, 7, sampler="dpmpp_2m")
    assert structure(a) == structure(b) and structure(a) != structure(dd.SamplingPlan.build(SCHED, 5))
