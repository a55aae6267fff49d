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


def test_quick_ladder_writes_json_and_png(tmp_path):
    """The tuned plans' ladder, end to end at toy size: references, then per S the untuned, the
    searched-timesteps and the tuned plan, each on two seed sets, scored against the teacher from the same noise."""
    from benchmarks import quality_per_step as q

    rows = q.main(["--ladder", "--quick", "--backend", "reference", "--out", str(tmp_path / "l")])
    data = json.loads((tmp_path / "l.json").read_text())
    assert [(r["plan"], r["steps"], r["seed"]) for r in data["rows"]] == [
        (p, s, seed) for p, s in [("ddim-4", 4), ("unipc-4", 4), ("untuned", 3), ("timesteps", 3), ("tuned", 3)]
        for seed in (0, 1)]
    assert data["teacher"] == {"sampler": "unipc", "steps": 12, "spacing": "trailing"}
    for r in rows:
        assert r["fd"] > 0 and r["mse_teacher"] > 0 and r["s_per_sample"] > 0 and r["n"] == 8
        assert (r["tuning_s"] is None) == (r["plan"] in ("ddim-4", "unipc-4", "untuned"))
    tuned = [r for r in rows if r["plan"] == "tuned"]
    assert tuned[0]["timesteps"][0] == 999 and tuned[0]["held_out_mse"]["untuned"] > 0
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
