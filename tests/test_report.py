"""Seed statistics (mean ± std, paired intervals), summary.md/.csv, and `fvlab report`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fvlab.report import aggregate, paired_difference, write_summary

pytestmark = pytest.mark.filterwarnings("ignore")

# Student-t quantiles t(0.975, df), from a printed table (not computed the way the code does).
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463}
MODEL = {"model/params_m": 2.5, "model/gflops": 0.1, "model/throughput": 700.0, "model/latency_ms": 4.4,
         "precision": "32-true"}


def run(variant: str, seed: int, acc: float | None = None, status: str = "complete", **extra) -> dict:
    result = {"experiment": "ablate", "variant": variant, "seed": seed, "status": status, **extra}
    if acc is not None:
        result.update({"val/acc1_best": acc, "val/acc1": acc - 0.01, "val/loss": 1.0 - acc, **MODEL})
    return result


def seeded_results() -> list[dict]:
    """Four seeds; c lost seed 3 to a NaN; d never ran seed 2 and seed 3 is still to run."""
    return [
        *(run("ref", s, a) for s, a in enumerate([0.80, 0.84, 0.82, 0.86])),
        *(run("b", s, a) for s, a in enumerate([0.86, 0.85, 0.90, 0.87])),
        *(run("c", s, a) for s, a in enumerate([0.90, 0.95, 0.91])),
        run("c", 3, status="failed", error="FloatingPointError: loss is nan"),
        run("d", 0, 0.70), run("d", 1, 0.75), run("d", 3, status="not run"),
    ]


def test_mean_sample_std_and_paired_intervals_match_hand_computation() -> None:
    variants = {v.variant: v for v in aggregate(seeded_results(), reference="ref")}
    ref, b, c, d = variants["ref"], variants["b"], variants["c"], variants["d"]
    assert ref.is_reference and ref.difference is None
    # ref: mean 0.83; deviations -.03 .01 -.01 .03 -> sum of squares .002 / 3
    assert ref.mean["val/acc1_best"] == pytest.approx(0.83)
    assert ref.std["val/acc1_best"] == pytest.approx(math.sqrt(0.002 / 3))
    assert ref.mean["val/loss"] == pytest.approx(0.17)
    # c: seeds 0-2 only (seed 3 failed): mean .92, deviations -.02 .03 -.01 -> .0014 / 2
    assert c.n == 3 and c.mean["val/acc1_best"] == pytest.approx(0.92)
    assert c.std["val/acc1_best"] == pytest.approx(math.sqrt(0.0007))
    assert [r["seed"] for r in c.failed] == [3]
    # b - ref per seed: .06 .01 .08 .01 -> mean .04, sd sqrt(.0038/3), t(3) -> not significant
    sd = math.sqrt(0.0038 / 3)
    half = T975[3] * sd / 2
    assert b.difference.n == 4 and b.difference.mean == pytest.approx(0.04)
    assert (b.difference.low, b.difference.high) == pytest.approx((0.04 - half, 0.04 + half), abs=1e-6)
    assert not b.difference.excludes_zero
    # c - ref over the seeds both completed (0, 1, 2): .10 .11 .09 -> sd .01, t(2)
    half = T975[2] * 0.01 / math.sqrt(3)
    assert c.difference.seeds == [0, 1, 2]
    assert (c.difference.low, c.difference.high) == pytest.approx((0.10 - half, 0.10 + half), abs=1e-6)
    assert c.difference.excludes_zero
    # d - ref: -.10 -.09 -> mean -.095, sd sqrt(.00005), t(1)
    half = T975[1] * math.sqrt(0.00005) / math.sqrt(2)
    assert (d.difference.low, d.difference.high) == pytest.approx((-0.095 - half, -0.095 + half), abs=1e-6)
    assert d.difference.excludes_zero and d.n == 2 and d.missing_seeds == [2, 3]
    assert d.seeds_cell() == "2/4 (2 missing)" and c.seeds_cell() == "3/4 (1 failed)"
    assert d.model["model/throughput"] == 700.0 and d.precision == "32-true"


def test_paired_difference_pairs_by_seed_not_by_position() -> None:
    diff = paired_difference({1: 0.9, 2: 0.8, 5: 0.7}, {2: 0.7, 1: 0.6, 9: 0.1}, "ref")
    assert diff.seeds == [1, 2] and diff.mean == pytest.approx(0.2)
    # .9-.6 = .3 and .8-.7 = .1: sd sqrt(.02)
    assert diff.low == pytest.approx(0.2 - T975[1] * math.sqrt(0.02) / math.sqrt(2), abs=1e-6)


def test_write_summary_table_notes_and_csv(tmp_path: Path) -> None:
    text = write_summary(tmp_path, seeded_results(), title="ablate", reference="ref",
                         variant_order=["ref", "b", "c", "d"])
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:5]] == ["variant", "seeds", "val/acc1_best",
                                                             "Δ vs ref [95% CI]"]
    c_row = next(line for line in lines if line.startswith("| c "))
    low, high = 0.10 - T975[2] * 0.01 / math.sqrt(3), 0.10 + T975[2] * 0.01 / math.sqrt(3)
    assert "0.9200 ± 0.0265" in c_row and f"+0.1000 [{low:+.4f}, {high:+.4f}] *" in c_row
    b_row = next(line for line in lines if line.startswith("| b "))
    assert "+0.0400 [" in b_row and "] *" not in b_row
    assert "reference" in next(line for line in lines if line.startswith("| ref "))
    assert any(line.startswith("± is the sample standard deviation") and "* marks an interval that "
               "excludes zero" in line for line in lines)
    assert "failed: c seed 3: FloatingPointError: loss is nan (left out of the statistics)" in lines
    assert "missing: d seed 2 (not run yet)" in lines and "missing: d seed 3 (not run yet)" in lines
    assert (tmp_path / "summary.md").read_text().startswith("# ablate\n\n| variant")
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    runs = [r for r in rows if r["kind"] == "run"]
    means = {r["variant"]: r for r in rows if r["kind"] == "mean"}
    assert len(runs) == 15 and list(means) == ["ref", "b", "c", "d"]
    assert float(means["c"]["val/acc1_best"]) == pytest.approx(0.92)
    assert float(means["c"]["val/acc1_best_std"]) == pytest.approx(math.sqrt(0.0007))
    assert means["c"]["n_complete"] == "3" and means["c"]["n_failed"] == "1"
    assert means["d"]["n_missing"] == "2" and means["c"]["delta_excludes_zero"] == "True"
    assert float(means["b"]["delta_ci_low"]) == pytest.approx(0.04 - T975[3] * math.sqrt(0.0038 / 3) / 2)


def test_one_seed_has_no_interval_and_still_prints(tmp_path: Path) -> None:
    text = write_summary(tmp_path, [run("no_carrier", 0, 0.95), run("ct1", 0, 0.97)])
    ct1 = next(line for line in text.splitlines() if line.startswith("| ct1 "))
    assert "+0.0200 [n/a]" in ct1 and "0.9700 " in ct1 and "±" not in ct1
    assert "n/a: fewer than two seeds completed in both ct1 and the reference" in text
