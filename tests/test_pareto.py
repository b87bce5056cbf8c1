"""Pareto dominance after one fixed rounding (float32, 6 significant digits): one rule for the report's tables and plots and the sweep's front."""

from __future__ import annotations

from pathlib import Path

import pytest

from fvlab.pareto import dominates, pareto_optimal

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


def test_sweep_front_leaves_out_a_float32_tie_that_is_slower() -> None:
    import optuna

    from fvlab.sweep.pareto import front_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"])
    for acc, speed in ((CT1, 1183.0), (CT4, 691.0), (0.9611, 1350.0), (0.90, 600.0)):
        study.add_trial(optuna.trial.create_trial(values=[acc, speed]))
    assert len(study.best_trials) == 3  # Optuna's exact comparison keeps trial 1
    assert [t.number for t in front_trials(study)] == [0, 2]
    # A trial violating a constraint never enters the front, however good.
    study.add_trial(optuna.trial.create_trial(values=[0.99, 5000.0], system_attrs={"constraints:max_gflops": 0.2}))
    assert [t.number for t in front_trials(study)] == [0, 2]


# Offsets {0, 0.8e-6, 1.5e-6} rotated over three maximised objectives: with a pairwise relative
# tolerance of 1e-6 each point beats the next in a cycle (A > B > C > A).
CYCLE = [(1.0, 1 + 0.8e-6, 1 + 1.5e-6), (1 + 1.5e-6, 1.0, 1 + 0.8e-6), (1 + 0.8e-6, 1 + 1.5e-6, 1.0)]
MAX3 = ("maximize", "maximize", "maximize")


def test_dominance_is_transitive_on_near_ties() -> None:
    from optuna.trial import TrialState, create_trial

    from fvlab.sweep.front import losses, pareto_indices, rank_order
    from fvlab.sweep.rungs import RUNG_ATTR, decide

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
