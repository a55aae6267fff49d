"""benchmarks/quality_per_step.py: the harness runs end to end (--quick) and writes its table, JSON and plot.
The numbers of a quick run mean nothing; speed is never asserted."""

import json

import pytest

pytest.importorskip("matplotlib")


def test_quick_run_writes_json_and_png(tmp_path):
    from benchmarks import quality_per_step as q

    rows = q.main(["--quick", "--backend", "reference", "--out", str(tmp_path / "q")])
    data = json.loads((tmp_path / "q.json").read_text())
    assert [(r["sampler"], r["steps"], r["seed"]) for r in data["rows"]] == [("ddim", 5, 0), ("unipc", 5, 0),
                                                                            ("unipc", 5, 1)]
    assert all(r["fd"] > 0 and r["s_per_sample"] > 0 and r["n"] == 16 for r in rows)
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
