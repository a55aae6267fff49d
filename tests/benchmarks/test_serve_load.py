"""benchmarks/serve_load.py (issue 24's load test): its --quick mode starts both servers (`ddim-fast serve` with
batching off and on, free local ports), runs every part for about a second each and writes the JSON and PNG the
benchmarks page comes from. The measurement itself (a 10-step plan, 15 s per rate) is a benchmark, not a test:
the goals are computed here but not asserted, since a 3-step plan on a shared CI machine decides nothing."""

import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from benchmarks import serve_load as sl  # noqa: E402


def test_quick_mode_measures_both_servers_and_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "serve.json"
    result = sl.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["quick"] is True and saved["steps"] == 3 and saved["model"] == "digits"
    assert saved["machine"]["cores"] >= 1 and saved["date"] and saved["backend"] in ("onnxruntime", "reference")
    assert saved["load_average"]["before"] >= 0 and saved["load_average"]["after"] >= 0
    assert saved["exit_codes"] == {"off": 0, "on": 0}  # SIGTERM: drained, exit 0
    c1 = saved["unbatched_capacity_rps"]
    assert c1 == saved["capacity"]["off"]["throughput_rps"] > 0 and saved["capacity"]["on"]["throughput_rps"] > 0
    for mode in ("off", "on"):
        assert 0 < saved["idle"][mode]["p50_ms"] <= saved["idle"][mode]["p99_ms"]
    runs = saved["runs"]
    assert [(r["mode"], r["multiple"]) for r in runs] == [("off", 1.0), ("off", 2.0), ("on", 1.0), ("on", 2.0)]
    for r in runs + [saved["overload"]]:
        assert r["offered_rps"] == pytest.approx(r["multiple"] * c1)
        assert r["ok"] + r["rejected_503"] + r["errors"] == r["sent"] > 0
        assert r["errors"] == 0, r["error_kinds"]
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        rows = {int(k): v for k, v in r["batch_rows"].items()}
        assert all(v > 0 for v in rows.values()) and max(rows) <= (1 if r["mode"] == "off" else saved["max_batch"])
        # every answered image ran in some batch (a batch may finish just after the run's last /metrics read)
        assert sum(k * v for k, v in rows.items()) >= r["ok"] - 2 * saved["max_batch"]
    over = saved["overload"]
    assert over["multiple"] == sl.OVERLOAD and len(over["rss_mb"]) >= 2 and min(over["rss_mb"]) > 0
    g = saved["goals"]
    assert set(g) == {"batching_capacity", "p99_at_2x", "overload"}
    assert g["batching_capacity"]["ratio"] == pytest.approx(saved["capacity"]["on"]["throughput_rps"] / c1)
    assert g["overload"]["answered"] == over["sent"]  # 200 or 503, nothing else, even at 10 x
    assert (tmp_path / "serve.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| batching | offered (x C1) |" in printed and str(out) in printed
