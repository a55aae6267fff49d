"""benchmarks/first_result.py: the harness runs end to end (--quick: a tiny UNet, each measurement in a fresh
process with an empty cache) and writes its JSON. The numbers of a quick run mean nothing; speed is never
asserted."""

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_quick_run_writes_json(tmp_path):
    from benchmarks import first_result as fr

    record = fr.main(["--quick", "--sizes", "1", "--out", str(tmp_path / "r.json")])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["quick"] and data["machine"]["cores"] >= 1 and len(data["load_average"]["before"]) == 3
    (cold,) = data["summary"]["cold"]
    assert cold["backend"] == "onnxruntime" and cold["steps"] == 3
    assert cold["export_s"] > 0 and cold["check_s"] > 0 and cold["first_result_s"] >= cold["engine_s"] > 0
    assert [w["change"] for w in data["summary"]["warm"]] == [
        "new steps (plan=)", "new spacing (plan=)", "new eta (plan=)", "new sampler (plan=)",
        "new Engine(model, plan)"]
    assert all(0 < w["before_sampling_s"] <= w["call_s"] for w in data["summary"]["warm"])
    (cli,) = data["summary"]["cli"]
    assert cli["n"] == 1 and {r["backend"] for r in data["cli_runs"]} == {"auto", "reference", "onnxruntime"}
    assert {r["ran_on"] for r in data["cli_runs"] if r["backend"] != "auto"} == {"reference", "onnxruntime"}
    assert cli["auto_ran_on"][0] in ("reference", "onnxruntime") and cli["auto_over_best"] > 0
    (ratio,) = data["summary"]["ratio"]
    assert ratio["batch"] == 2 and ratio["fraction"] > 0
    assert record["summary"] == data["summary"]
