"""fvlab.pareto: directions, dominance after one fixed rounding (float32, 6 significant digits), fronts and
crowding, hypervolume: one rule for the report's tables and plots, the rung pruner and the sweep's front."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fvlab.pareto import (crowding_distance, direction_name, dominates, hypervolume, losses, maximizes,
                          non_dominated_fronts, pareto_indices, pareto_optimal, rank_order)

pytestmark = pytest.mark.filterwarnings("ignore")

# The demo's ct1 and ct4: both 351/360 correct, stored through float32 as two different floats.
CT1, CT4 = 0.97499998, 0.97500000


def test_float32_equal_accuracy_and_slower_is_dominated() -> None:
    # (throughput, accuracy), both maximised: ct4 is as accurate and slower.
    assert pareto_optimal([(1183.0, CT1), (691.0, CT4)], ("maximize", "maximize")) == [True, False]
    assert dominates((1183.0, CT1), (691.0, CT4), ("maximize", "maximize"))
    # Differences that survive the rounding still count.
    assert pareto_optimal([(1183.0, 0.9749), (691.0, 0.9750)], ("maximize", "maximize")) == [True, True]


def test_ties_are_all_optimal_and_none_or_nan_never() -> None:
    points = [(1.0, 2.0), (1.0, 2.0 * (1 + 1e-8)), None, (float("nan"), 5.0), (0.5, 1.0)]
    assert pareto_optimal(points, ("maximize", "maximize")) == [True, True, False, False, False]


def test_three_objectives_with_min_and_max_directions() -> None:
    from optuna.study import StudyDirection

    # (accuracy max, gflops min, latency min)
    directions = ("maximize", "minimize", StudyDirection.MINIMIZE)
    points = [(0.90, 0.5, 3.0),   # optimal
              (0.90, 0.5, 3.5),   # dominated by 0: slower
              (0.95, 0.9, 4.0),   # optimal: most accurate
              (0.85, 0.3, 5.0),   # optimal: fewest GFLOPs
              (0.85, 0.3 * (1 + 1e-7), 5.0 * (1 + 1e-7))]  # a float32 copy of 3: tie, also optimal
    assert pareto_optimal(points, directions) == [True, False, True, True, True]
    assert pareto_optimal([(1.0,), (2.0,)], ("minimize",)) == [True, False]
    with pytest.raises(ValueError, match="direction"):
        pareto_optimal([(1.0,)], ("up",))


def test_report_does_not_mark_the_demos_ct4(tmp_path: Path) -> None:
    from test_report import run, write_run

    from fvlab.cli import main

    exp = tmp_path / "ablate"
    for variant, acc, speed in (("no_carrier", 0.9611, 1350.0), ("ct1", CT1, 1183.0), ("ct4", CT4, 691.0)):
        metrics = {**run(variant, 0, acc), "model/throughput": speed}
        write_run(exp / variant, metrics, {"ct_size": 1 if variant == "ct1" else 4})
    assert main(["report", str(exp)]) == 0
    md = (exp / "report" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant")).split("|")
    column = [c.strip() for c in header].index("Pareto")
    marks = {line.split("|")[1].strip(): line.split("|")[column].strip()
             for line in md.splitlines() if line.startswith("| ") and not line.startswith("| variant")}
    assert marks == {"no_carrier": "yes", "ct1": "yes", "ct4": ""}


# Offsets {0, 0.8e-6, 1.5e-6} rotated over three maximised objectives: with a pairwise relative
# tolerance of 1e-6 each point beats the next in a cycle (A > B > C > A).
CYCLE = [(1.0, 1 + 0.8e-6, 1 + 1.5e-6), (1 + 1.5e-6, 1.0, 1 + 0.8e-6), (1 + 0.8e-6, 1 + 1.5e-6, 1.0)]
MAX3 = ("maximize", "maximize", "maximize")


def test_dominance_is_transitive_on_near_ties() -> None:
    from optuna.trial import TrialState, create_trial

    from fvlab.sweep.attrs import RUNG_ATTR
    from fvlab.sweep.rungs import decide

    flags = pareto_optimal(CYCLE, MAX3)
    assert any(flags) and flags == [True, True, True]  # one rounding: all three tie
    assert pareto_indices(CYCLE, MAX3) == [0, 1, 2]
    order, fronts = rank_order(losses(CYCLE, MAX3))
    assert sorted(order) == [0, 1, 2] and fronts == [0, 0, 0]
    trials = [create_trial(state=TrialState.RUNNING, user_attrs={f"{RUNG_ATTR}1": list(p)}) for p in CYCLE]
    for number, trial in enumerate(trials):
        trial.number = number
    decisions = [decide(trials, n, 1, list(MAX3), 3) for n in range(3)]
    assert sorted(d.rank for d in decisions) == [1, 2, 3] and {d.front for d in decisions} == {1}


def test_directions_have_one_parser() -> None:
    from optuna.study import StudyDirection

    assert [direction_name(d) for d in ("maximize", StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE)] == \
        ["maximize", "maximize", "minimize"]
    assert maximizes("maximize") and not maximizes(StudyDirection.MINIMIZE)
    for bad in ("Maximize", "max", None, StudyDirection.NOT_SET):
        with pytest.raises(ValueError, match="use 'maximize' or 'minimize'"):
            direction_name(bad)


MAX2 = ["maximize", "maximize"]


# ---- fronts, crowding, hypervolume ------------------------------------------------------------


def test_non_dominated_sort_and_crowding_by_hand() -> None:
    # (accuracy, throughput), both maximised: A, B, C trade off; D is dominated by A; E by all.
    points = [(0.9, 100), (0.8, 200), (0.7, 300), (0.6, 100), (0.5, 50)]
    assert non_dominated_fronts(losses(points, MAX2)) == [[0, 1, 2], [3], [4]]
    # The second minimised instead (say latency): A and E lead, A dominates B and D, B dominates C.
    assert non_dominated_fronts(losses(points, ["maximize", "minimize"])) == [[0, 4], [1, 3], [2]]
    # Extremes are infinitely far; B adds a full normalised gap on each objective.
    assert crowding_distance(losses(points[:3], MAX2)).tolist() == [np.inf, 2.0, np.inf]
    # Four minimised points: interior gaps (x: 2/3, 2/3; y: 2.5/3, 2/3).
    four = np.array([[1.0, 4.0], [2.0, 3.0], [3.0, 1.5], [4.0, 1.0]])
    assert np.allclose(crowding_distance(four), [np.inf, 2 / 3 + 2.5 / 3, 4 / 3, np.inf])
    order, fronts = rank_order(four)
    assert order == [0, 3, 1, 2] and fronts == [0, 0, 0, 0]  # equal distances: the earlier point first
    # A NaN (diverged) is the worst value; identical points share a front.
    assert non_dominated_fronts(losses([(float("nan"), 100), (0.5, 100), (0.5, 100)], MAX2)) == [[1, 2], [0]]
    assert pareto_indices([(1, 1), (2, 2), (2, 2)], MAX2) == [1, 2]


def test_hypervolume_by_hand() -> None:
    # Two rectangles from (0, 0): 0.9 x 100 plus the part of 0.8 x 200 above it.
    assert hypervolume([(0.9, 100), (0.8, 200)], (0.0, 0.0), MAX2) == pytest.approx(170.0)
    # Dominated points and points beyond the reference add nothing.
    assert hypervolume([(0.9, 100), (0.8, 200), (0.5, 50), (-1.0, 900)], (0.0, 0.0), MAX2) == pytest.approx(170.0)
    # Minimised latency against a reference of 10 ms: 0.9 x (10 - 4) + 0.5 x (4 - 2).
    assert hypervolume([(0.9, 4.0), (0.5, 2.0)], (0.0, 10.0), ["maximize", "minimize"]) == pytest.approx(6.4)
    assert hypervolume([], (0.0, 0.0), MAX2) == 0.0
    # 3-D: two half-cubes of the unit cube overlapping in a quarter.
    three = ["minimize"] * 3
    assert hypervolume([(0.5, 0, 0), (0, 0.5, 0)], (1, 1, 1), three) == pytest.approx(0.75)
    assert hypervolume([(0.5, 0.5, 0.5)], (1, 1, 1), three) == pytest.approx(0.125)


def _inclusion_exclusion(points: np.ndarray, ref: np.ndarray) -> float:
    """The exact volume dominated by ``points`` (minimised, inside ``ref``): a sum over every subset."""
    total = 0.0
    for mask in range(1, 2 ** len(points)):
        subset = points[[i for i in range(len(points)) if mask >> i & 1]]
        total += (-1) ** (len(subset) + 1) * float(np.prod(ref - subset.max(axis=0)))
    return total


def test_hypervolume_matches_inclusion_exclusion_on_random_fronts() -> None:
    rng = np.random.default_rng(0)
    for dims in (2, 3, 4):
        points = rng.random((10, dims))
        ref = np.full(dims, 1.1)
        assert hypervolume(points, ref, ["minimize"] * dims) == pytest.approx(_inclusion_exclusion(points, ref))
