"""benchmarks/search_cost.py's bookkeeping: repetitions, replayed rung decisions, the random control, intervals."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from fvlab.pareto import epsilon_net_order, rank_order
from fvlab.sweep.space import load_sweep

from helpers import ROOT

_spec = importlib.util.spec_from_file_location("search_cost", ROOT / "benchmarks" / "search_cost.py")
sc = importlib.util.module_from_spec(_spec)
sys.modules["search_cost"] = sc  # dataclasses look their module up while the class is built
_spec.loader.exec_module(sc)
R = sc.TrialRecord


def _records() -> list:
    """Seven trials (accuracy, throughput), rungs at epochs 1 and 3 of 9; trial 4 duplicates trial 2."""
    return [R(0, (0.90, 100), {1: (0.50, 100), 3: (0.80, 100)}, 9, reference=True),
            R(1, (0.95, 50), {1: (0.60, 50), 3: (0.90, 50)}, 9),
            R(2, (0.50, 50), {1: (0.20, 50), 3: (0.40, 50)}, 9),
            R(3, (0.99, 300), {1: (0.70, 300), 3: (0.95, 300)}, 9),
            R(4, (0.50, 50), {1: (0.20, 50), 3: (0.40, 50)}, 0, duplicate_of=2),
            R(5, (0.60, 40), {1: (0.10, 40), 3: (0.30, 40)}, 9),
            R(6, (0.97, 150), {1: (0.65, 150), 3: (0.92, 150)}, 9)]


def test_intervals_by_hand() -> None:
    # [1, 2, 3]: mean 2, sd 1, t(0.975, 2 df) = 4.302653, half-width 4.302653 / sqrt(3).
    mean, lo, hi = sc.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and (lo, hi) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    # Paired: differences [1, 2, 2], mean 5/3, sd sqrt(1/3), half-width 4.302653 * sqrt(1/3) / sqrt(3).
    mean, lo, hi = sc.paired_interval([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    assert mean == pytest.approx(5 / 3) and hi - mean == pytest.approx(4.302653 / 3, abs=1e-6)
    assert math.isnan(sc.t_interval([0.5])[1])
    with pytest.raises(ValueError, match="equal lengths"):
        sc.paired_interval([1.0], [1.0, 2.0])


def test_identical_samples_give_the_point_without_a_warning(recwarn: pytest.WarningsRecorder) -> None:
    # A rule that keeps the whole front in every repetition scores hv 1.0 each time: no spread.
    assert sc.t_interval([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert sc.paired_interval([1.0, 1.0], [0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert math.isnan(sc.paired_interval([1.0], [0.5])[2])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_the_grid_sweep_files_load_as_fvlab_reads_them(tmp_path: Path) -> None:
    sweep = load_sweep(sc.write_sweep(tmp_path, "standalone_s1", 1))
    assert sweep.overrides["seed_everything"] == 1 and sweep.sampler == "grid" and sweep.n_trials == 40
    assert sweep.pruner_options == {"min_epochs": 1, "reduction_factor": 3, "promotion": "first_front"}
    small = load_sweep(sc.write_sweep(tmp_path, "oneshot", 0, dims=[8, 16], depths=2,
                                      supernet={"epochs": 1, "sandwich": 1, "distill": True, "bn_batches": 2}))
    assert small.n_trials == 8 and small.supernet["epochs"] == 1 and small.pruner is None


def test_replayed_rungs_decide_like_one_worker() -> None:
    records = _records()
    outcome = sc.replay(records, [1, 3], "nsga2")
    # Rung 1: trials 0-1 pass while it fills; trial 2 is third of 3 (keep 1); 3 dominates all (keep 1 of 4,
    # it is first); 5 is last of 5 (keep 1); 6 is second of 6, behind 3 only (keep 2). Rung 3 holds 0, 1,
    # 3, 6: 0 and 1 pass while it fills, 3 is first of 3, 6 second of 4 (3 dominates it) where one goes
    # on. The duplicate shares trial 2's fate.
    assert outcome == {0: None, 1: None, 2: 1, 3: None, 4: 1, 5: 1, 6: 3}
    assert sc.stopped_per_rung(records, outcome) == {1: 2, 3: 1}
    assert sc.arm_epochs(records, outcome) == 9 + 9 + 1 + 9 + 1 + 3  # the duplicate trains nothing
    # No pruner stops the reference (trial 0), so a plan that names it is ignored.
    assert sc.replay(records, [1, 3], plan={0: 1})[0] is None


def test_the_random_control_stops_as_many_per_rung() -> None:
    records = _records()
    stopped = sc.stopped_per_rung(records, sc.replay(records, [1, 3], "nsga2"))
    rungs_epochs = sc.arm_epochs(records, sc.replay(records, [1, 3], "nsga2"))
    chosen = set()
    for seed in range(20):
        plan = sc.random_plan(records, stopped, random.Random(seed))
        assert 0 not in plan and 4 not in plan  # never the reference, never a duplicate (it trains nothing)
        outcome = sc.replay(records, [1, 3], plan=plan)
        assert sc.stopped_per_rung(records, outcome) == stopped
        assert sc.arm_epochs(records, outcome) == rungs_epochs
        chosen.add(tuple(sorted(plan.items())))
    assert len(chosen) > 1  # the choice is random


def test_promotion_rules_by_hand() -> None:
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from fvlab.sweep.rungs import decide

    # One front of six losses (both minimised). Crowding: the extremes 0 and 5, then 4 (gap 1.1).
    # Epsilon-net: 0 (best first objective), 5 (farthest), then 3, whose nearest taken point is
    # sqrt(0.3^2 + 0.6^2) = 0.67 away, more than 1 or 4 (0.51).
    loss = np.array([[0.0, 1.0], [0.1, 0.5], [0.2, 0.45], [0.3, 0.4], [0.5, 0.1], [1.0, 0.0]])
    assert rank_order(loss)[0][:3] == [0, 5, 4]
    assert epsilon_net_order(loss) == ([0, 5, 3, 4, 1, 2], [0] * 6)

    def trial(number: int):
        frozen = create_trial(state=TrialState.COMPLETE, values=list(loss[number]), params={"n": float(number)},
                              distributions={"n": FloatDistribution(0, 10)}, user_attrs={"rung_1": list(loss[number])})
        frozen.number = number
        return frozen

    trials = [trial(n) for n in range(6)]
    mins = ["minimize", "minimize"]

    def kept(promotion: str) -> list[int]:
        return [n for n in range(6) if decide(trials, n, 1, mins, 2, promotion).go_on]

    assert kept("nsga2") == [0, 4, 5] and kept("epsilon_net") == [0, 3, 5]  # 6 // 2 = 3 go on
    # first_front: the front (all six) is larger than 6 // 2, so all of it goes on.
    assert kept("first_front") == list(range(6)) and decide(trials, 2, 1, mins, 2, "first_front").keep == 6
    with pytest.raises(ValueError, match="promotion"):
        decide(trials, 0, 1, mins, 2, "hypervolume")


def test_an_arms_front_is_chosen_on_its_run_and_scored_on_the_held_out_target() -> None:
    # Three trials (accuracy of this run, speed); the held-out target reverses trials 1 and 2.
    records = [R(0, (0.5, 3.0), reference=True), R(1, (0.9, 1.0)), R(2, (0.8, 2.0))]
    targets = np.array([0.5, 0.7, 0.9])
    # Every trial kept: the run's front is all three; scored on the target, trial 1 (0.7, 1) is
    # dominated by trial 2 (0.9, 2), so the arm's front holds the true front: share 1.
    assert sc.front_share(records, {0: None, 1: None, 2: None}, targets) == pytest.approx(1.0)
    # Trial 2 stopped: the kept front is trials 0 and 1. Reference point (0.5, 1): the true front
    # (0 and 2) covers (0.9 - 0.5) x (2 - 1) = 0.4; trials 0 and 1 cover nothing beyond it: 0.
    assert sc.front_share(records, {0: None, 1: None, 2: 1}, targets) == pytest.approx(0.0)


def test_a_repetition_scores_every_rule_against_its_own_random_control() -> None:
    rng = np.random.default_rng(0)
    base = _records()
    archs = [f"a{i}" for i in range(len(base))]
    seeds = [{a: R(i, (min(1.0, r.values[0] + rng.normal(0, 0.01)), r.values[1]), r.rungs, r.epochs,
                   reference=i == 0) for i, (a, r) in enumerate(zip(archs, base)) if r.duplicate_of is None}
             for _ in range(3)]
    archs = [a for a in archs if a in seeds[0]]
    acc = np.array([[s[a].values[0] for s in seeds] for a in archs])
    from fvlab.sweep.rank_quality import held_out_targets

    grid = sc.Grid(archs, seeds, held_out_targets(acc))
    scores = sc.repetition_scores(grid, list(range(len(archs))), ["nsga2", "first_front"], [1, 3], 5,
                                  random.Random(0))
    for rule in ("nsga2", "first_front"):
        assert 0 < scores[rule]["epochs"] <= 1 and 0 <= scores[rule]["hv"] <= 1 + 1e-9
        assert 0 <= scores[rule]["random_hv"] <= 1 + 1e-9
    # first_front keeps every rung's front, so it stops no more than nsga2.
    assert scores["first_front"]["epochs"] >= scores["nsga2"]["epochs"]
