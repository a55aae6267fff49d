"""benchmarks/paper_tables.py: its sampler rows (the official ddpm_noisy is the clamped sigma-hat) and
its trend checks on partial and merged results. The measurement itself is a benchmark, not a test."""

import json

import pytest

import ddim_fast as dd
from benchmarks import paper_tables as pt

STEPS = (10, 1000)


def test_the_sigma_hat_rows():
    sched = dd.NoiseSchedule.linear()

    class M:
        schedule, prediction = sched, "eps"

    clipped, plain = pt._plan(M, 10, "sigma-hat-clip"), pt._plan(M, 10, "sigma-hat")
    assert clipped.variance == plain.variance == "large"
    assert clipped.clip_x0 == (-1.0, 1.0) and plain.clip_x0 is None
    assert set(pt.PAPER_T1) == set(pt.ETAS) - {"sigma-hat"}  # the paper's column is the clamped sampler


def _cells(values):
    return {(eta, S): v for eta, row in values.items() for S, v in zip(STEPS, row)}


def test_trends_skip_what_was_not_measured_and_rank_each_sigma_hat_row():
    full = _cells({"0.0": (10, 9), "0.2": (12, 8), "0.5": (13, 7), "1.0": (14, 8.5),
                   "sigma-hat-clip": (40, 7.5), "sigma-hat": (20, 9.5)})
    notes = {claim: holds for claim, holds, _ in pt.trends(full, STEPS, {10: 0.02, 1000: 0.001})}
    assert notes["DDIM (eta=0) is best at S=10"] and notes["sigma-hat-clip is worst at S=10"]
    assert notes["sigma-hat-clip is competitive at S=1000 (within the best two)"]
    assert notes["sigma-hat is worst at S=10"] and not notes["sigma-hat is competitive at S=1000 (within the best two)"]
    assert notes["reconstruction error falls with S"]
    only_one_row = pt.trends(_cells({"sigma-hat-clip": (40, 7.5)}), STEPS, {})
    assert only_one_row == []  # nothing to compare it with: no claim is made


def test_merge_fills_the_rows_not_measured(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"table1": {"0.0|10": 10, "0.0|1000": 9, "sigma-hat|10": 20, "sigma-hat|1000": 9.5,
                                          "0.0|20": 99}, "table2": {"10": 0.02}}))
    now = _cells({"sigma-hat-clip": (40, 7.5), "sigma-hat": (21, 9.6)})
    cells, recon = pt._merged(old, STEPS, now, {})
    assert cells[("0.0", 10)] == 10 and cells[("sigma-hat", 10)] == 21  # measured now wins
    assert ("0.0", 20) not in cells and recon == {10: 0.02}
    with pytest.raises(ValueError, match="unknown --rows"):
        pt.main(["--rows", "sigma-hat-cilp"])
