"""benchmarks/guidance_digits.py (the guidance-scale table): its --quick mode runs the whole harness
(20 samples, 4 steps, every scale) in seconds and writes the JSON the README table comes from. The
measurement itself (500 samples per scale, DDIM-20) is a benchmark, not a test."""

import json

from benchmarks import guidance_digits as gd


def test_quick_mode_writes_one_row_per_scale(tmp_path, capsys):
    out = tmp_path / "g.json"
    result = gd.main(["--quick", "--backend", "reference", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["n"] == 20 and saved["steps"] == 4 and saved["model"] == "digits-cond"
    assert saved["backend"] == "reference" and saved["date"] and saved["machine"]
    rows = {r["guidance"]: r for r in saved["rows"]}
    assert sorted(rows) == list(gd.SCALES)
    for r in rows.values():
        assert 0.0 <= r["agreement"] <= 1.0 and len(r["agreement_per_class"]) == 10
        assert r["fd_digits"] > 0 and r["seconds"] > 0
        # 2 samples per class: the overall agreement is the mean of the per-class ones
        assert abs(r["agreement"] - sum(r["agreement_per_class"]) / 10) < 1e-6  # float32 means
    # the labels reach the model: the conditional branch (w = 1) agrees far more often than the
    # unconditional one (w = 0), which ignores the requested class
    assert rows[1.0]["agreement"] >= rows[0.0]["agreement"] + 0.4
    printed = capsys.readouterr().out
    assert "| guidance w |" in printed and str(out) in printed
