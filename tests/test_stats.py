"""fvlab.stats: scipy's paired-t, bootstrap and the rules fvlab keeps around them, against hand values."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fvlab.stats import (MIN_MARKED_PAIRS, family_size, holm, mean_std, paired_bootstrap,
                         paired_difference)

# Student-t quantiles from a printed table (not computed the way the code does).
T975_DF3, T95_DF2 = 3.18244631, 2.91998558
ZEROS = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}


def test_paired_t_interval_and_p_value_by_hand() -> None:
    # Differences 1 2 3 6: mean 3, sd sqrt(14/3), df 3.
    d = paired_difference({0: 1.0, 1: 2.0, 2: 3.0, 3: 6.0}, ZEROS, "ref")
    half = T975_DF3 * math.sqrt(14 / 3) / 2
    assert (d.mean, d.low, d.high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-7)
    # t(3) two-sided: p = 1 - (2/pi)(theta + sin theta cos theta), theta = atan(t / sqrt 3).
    theta = math.atan(3 / (math.sqrt(14 / 3) / 2) / math.sqrt(3))
    assert d.p_value == pytest.approx(1 - 2 / math.pi * (theta + math.sin(theta) * math.cos(theta)), rel=1e-9)
    assert not d.excludes_zero and d.can_mark and not d.equal


def test_the_confidence_level_reaches_the_interval() -> None:
    d = paired_difference({0: 0.90, 1: 0.95, 2: 0.91}, {0: 0.80, 1: 0.84, 2: 0.82}, confidence=0.90)
    half = T95_DF2 * 0.01 / math.sqrt(3)
    assert (d.low, d.high) == pytest.approx((0.1 - half, 0.1 + half), abs=1e-8) and d.confidence == 0.90


@pytest.mark.parametrize("values, reference", [
    ({0: 1.5, 1: 2.5, 2: 3.5}, {0: 0.5, 1: 1.5, 2: 2.5}),  # scipy: zero spread, t and p NaN
    ({0: 0.7, 1: 0.4, 2: 0.1}, {0: 0.7, 1: 0.4, 2: 0.1}),  # no difference at all
    ({1: 251 / 270, 2: 247 / 270, 3: 200 / 270}, {1: 250 / 270, 2: 246 / 270, 3: 199 / 270}),  # scipy: p = 1e-14
])
def test_equal_differences_have_no_interval_and_no_p_value(values: dict, reference: dict) -> None:
    d = paired_difference(values, reference)
    assert d.equal and d.low is None and d.high is None and d.p_value is None
    assert not d.can_mark and d.n == 3 and d.mean == pytest.approx(values[2] - reference[2])


def test_too_few_pairs_are_n_a_and_never_marked() -> None:
    one = paired_difference({0: 0.9, 5: 0.8}, {0: 0.8, 9: 0.1})
    assert one.seeds == [0] and one.mean == pytest.approx(0.1) and one.low is None and one.p_value is None
    assert paired_difference({}, {0: 0.5}).mean is None
    two = paired_difference({0: 0.9, 1: 0.95}, {0: 0.8, 1: 0.84})
    three = paired_difference({0: 0.9, 1: 0.95, 2: 0.91}, {0: 0.8, 1: 0.84, 2: 0.82})
    # Two pairs have an interval and a p-value but stay out of Holm's family.
    assert two.low is not None and two.p_value is not None and not two.can_mark
    assert MIN_MARKED_PAIRS == 3 and three.can_mark and family_size([None, one, two, three]) == 1
    family = [d.p_value if d.can_mark else None for d in (one, two, three)]
    assert family == [None, None, three.p_value] and holm(family) == [False, False, True]


def test_mean_std_uses_the_sample_std() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))
    assert mean_std([0.25]) == (0.25, None) and mean_std([]) == (None, None)


def test_paired_bootstrap_is_the_percentile_interval_of_seeded_index_draws() -> None:
    x, y = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0]), np.array([2.0, 7.0, 1.0, 8.0, 2.0, 8.0])
    result = paired_bootstrap((x, y), lambda a, b, axis=-1: (a - b).mean(axis=axis), 300, seed=4)
    # The same pairs drawn by hand: one row of indices per resample from the seeded generator.
    rows = np.random.default_rng(4).integers(0, len(x), (300, len(x)))
    draws = (x[rows] - y[rows]).mean(axis=1)
    assert (float(result.low), float(result.high)) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])))
    assert (result.kept, result.dropped) == (300, 0)
    again = paired_bootstrap((x, y), lambda a, b, axis=-1: (a - b).mean(axis=axis), 300, seed=4, batch=7)
    assert (again.low, again.high) == (result.low, result.high)  # batches do not change the draws


def test_paired_bootstrap_leaves_out_undefined_resamples_for_every_output() -> None:
    x = np.array([0.0, 1.0, 2.0])

    def two(a: np.ndarray, axis: int = -1) -> np.ndarray:
        """The mean, and a second output undefined where the resample repeats one value."""
        spread = np.where(np.ptp(a, axis=axis) > 0, 1.0, np.nan)
        return np.stack([a.mean(axis=axis), spread])

    result = paired_bootstrap((x,), two, 400, seed=0)
    rows = np.random.default_rng(0).integers(0, 3, (400, 3))
    kept = np.ptp(x[rows], axis=1) > 0
    assert (result.kept, result.dropped) == (int(kept.sum()), int((~kept).sum())) and 0 < result.dropped
    assert result.low[0] == pytest.approx(np.percentile(x[rows][kept].mean(axis=1), 2.5))
    assert (result.low[1], result.high[1]) == (1.0, 1.0)
    never = paired_bootstrap((x,), lambda a, axis=-1: np.full(a.shape[:-1], np.nan), 50, seed=0)
    assert math.isnan(never.low) and math.isnan(never.high) and (never.kept, never.dropped) == (0, 50)


def test_paired_bootstrap_without_a_resample_has_no_interval() -> None:
    for result in (paired_bootstrap(([1.0],), lambda a: a.mean(), 100, seed=0),
                   paired_bootstrap(([1.0, 2.0],), lambda a: a.mean(), 0, seed=0)):
        assert math.isnan(result.low) and math.isnan(result.high) and result.kept == 0


def test_stats_is_a_bottom_layer() -> None:
    # Importing the statistics must not load torch (the report reads runs without it) ...
    check = "import sys, fvlab.stats; assert 'torch' not in sys.modules and 'fvlab.report' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True)
    # ... and the sweep takes them from fvlab.stats, never from the report above it.
    sweep = Path(__file__).resolve().parents[1] / "fvlab" / "sweep"
    for path in sweep.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("fvlab.report"), path.name
