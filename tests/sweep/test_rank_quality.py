"""Rank quality like with like: held-out targets, tau-b, the paired bootstrap, front hypervolume; synthetic known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kendalltau

from fvlab.sweep.rank_quality import (RankQuality, front_hypervolume, front_of, held_out_targets, kendall_tau_b,
                                      per_seed_rank_quality, rank_quality)

ARCHS, SEEDS = 40, 4


def synthetic(seed: int, archs: int = ARCHS, seeds: int = SEEDS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true quality, stand-alone accuracies = truth + noise per seed, one more seed drawn the same way)."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=archs)
    standalone = truth[:, None] + rng.normal(size=(archs, seeds))
    one_more = truth + rng.normal(size=archs)
    return truth, standalone, one_more


# ---- held-out targets and tau-b -----------------------------------------------------------------


def test_held_out_targets_by_hand() -> None:
    standalone = [[1.0, 2.0, 6.0],
                  [0.5, 0.5, 2.0]]
    assert held_out_targets(standalone).tolist() == [[4.0, 3.5, 1.5],
                                                     [1.25, 1.25, 0.5]]


def test_held_out_targets_of_the_same_values_in_another_seed_order_tie_exactly() -> None:
    # 0.1 + 0.2 + 0.3 depends on the order of summation; a target must not.
    targets = held_out_targets([[0.9, 0.1, 0.2, 0.3], [0.9, 0.3, 0.1, 0.2], [0.9, 0.2, 0.3, 0.1]])
    assert targets[0, 0] == targets[1, 0] == targets[2, 0]


@pytest.mark.parametrize("shape", [(5, 2), (5, 1)])
def test_fewer_than_three_seeds_is_refused(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="K >= 3"):
        held_out_targets(np.ones(shape))
    with pytest.raises(ValueError, match="K >= 3"):
        rank_quality(np.ones(shape[0]), np.ones(shape))


def test_bad_shapes_and_non_finite_values_are_refused() -> None:
    _, standalone, one_more = synthetic(0, archs=6)
    with pytest.raises(ValueError, match="2-D"):
        held_out_targets(one_more)
    with pytest.raises(ValueError, match="shape"):
        rank_quality(one_more[:-1], standalone)
    with pytest.raises(ValueError, match="non-finite"):
        rank_quality(np.where(np.arange(6) == 2, np.nan, one_more), standalone)
    with pytest.raises(ValueError, match="non-finite"):
        rank_quality(one_more, np.where(standalone > 0, standalone, np.inf))
    with pytest.raises(ValueError, match="per_seed_score"):
        per_seed_rank_quality(standalone[:, :-1], standalone)


def test_kendall_tau_b_by_hand_and_against_scipy() -> None:
    # Pairs of [1, 2, 3, 4] vs [1, 3, 2, 4]: 5 concordant, 1 discordant of 6.
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendalltau([1, 2, 3, 4], [1, 3, 2, 4]).statistic == pytest.approx(4 / 6)
    # With ties, tau-b: 4 concordant, 0 discordant, one pair tied in each: 4 / sqrt(5 * 5).
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert kendalltau([1, 1, 2, 3], [1, 2, 2, 3]).statistic == pytest.approx(0.8)
    assert np.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    # Batched, many ties, some rows all tied (NaN in both).
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, size=(200, 7)).astype(float)
    y = rng.integers(0, 3, size=(200, 7)).astype(float)
    x[:5] = 1.0
    ours = kendall_tau_b(x, y)
    theirs = np.array([kendalltau(a, b).statistic for a, b in zip(x, y)])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    assert np.isnan(ours[:5]).all()


# ---- rank quality: known answers ----------------------------------------------------------------


@pytest.mark.parametrize("dataset", [0, 1, 2, 3])
def test_one_more_stand_alone_seed_ranks_like_a_seed(dataset: int) -> None:
    _, standalone, one_more = synthetic(dataset)
    result = rank_quality(one_more, standalone, resamples=500)
    assert result.diff_ci[0] < 0 < result.diff_ci[1]
    assert abs(result.diff) < 0.15


def test_one_more_seed_differs_by_zero_on_average() -> None:
    diffs = [rank_quality(one_more, standalone, resamples=1).diff
             for _, standalone, one_more in map(synthetic, range(10, 40))]
    # 30 datasets: the standard error of the mean difference is about 0.015.
    assert abs(np.mean(diffs)) < 0.05


def test_a_perfect_predictor_beats_one_more_seed() -> None:
    truth, standalone, _ = synthetic(0)
    result = rank_quality(truth, standalone, resamples=500)
    assert result.diff_ci[0] > 0
    assert result.tau_ci[0] > result.one_seed_tau


def test_a_reversed_predictor_has_negative_tau() -> None:
    truth, standalone, _ = synthetic(0)
    result = rank_quality(-truth, standalone, resamples=500)
    assert result.tau < 0 and result.tau_ci[1] < 0 and result.diff_ci[1] < 0
    assert result.tau == pytest.approx(-rank_quality(truth, standalone, resamples=1).tau)


def test_a_loss_ranks_like_the_negated_accuracy() -> None:
    _, standalone, one_more = synthetic(1)
    accuracy = rank_quality(one_more, standalone, resamples=500, seed=5)
    assert rank_quality(-one_more, standalone, resamples=500, seed=5, higher_is_better=False) == accuracy


def test_point_estimates_match_scipy_per_seed() -> None:
    _, standalone, one_more = synthetic(2, archs=12)
    target = held_out_targets(standalone)
    result = rank_quality(one_more, standalone, resamples=1)
    seeds = range(SEEDS)
    assert result.tau == pytest.approx(np.mean([kendalltau(one_more, target[:, s]).statistic for s in seeds]))
    assert result.one_seed_tau == pytest.approx(
        np.mean([kendalltau(standalone[:, s], target[:, s]).statistic for s in seeds]))
    assert result.diff == result.tau - result.one_seed_tau
    assert (result.archs, result.seeds) == (12, SEEDS)


def test_the_bootstrap_is_reproducible_and_the_intervals_hold_the_estimates() -> None:
    _, standalone, one_more = synthetic(3)
    first = rank_quality(one_more, standalone, resamples=500, seed=11)
    assert rank_quality(one_more, standalone, resamples=500, seed=11) == first
    assert rank_quality(one_more, standalone, resamples=500, seed=12) != first
    for value, (low, high) in [(first.tau, first.tau_ci), (first.one_seed_tau, first.one_seed_tau_ci),
                               (first.diff, first.diff_ci)]:
        assert low < value < high
    assert (first.resamples, first.dropped) == (500, 0)


def test_resamples_with_an_undefined_tau_are_dropped_for_all_three() -> None:
    # Two architectures: a resample that draws one of them twice is all tied (about half of them).
    result = rank_quality([0.0, 1.0], [[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]], resamples=400)
    assert result.resamples + result.dropped == 400 and 150 < result.dropped < 250
    assert result.tau_ci == result.one_seed_tau_ci == (1.0, 1.0) and result.diff_ci == (0.0, 0.0)


def test_equal_accuracies_stored_as_two_floats_are_a_tie() -> None:
    # 351/360 through float32 in one run and exactly in another: a tie, as fvlab.pareto rounds.
    standalone = [[0.5, 0.6, 0.7], [0.8, 0.8, 0.8], [0.9, 0.9, 0.9]]
    rounded = rank_quality([0.1, 0.97499998, 0.975], standalone, resamples=1)
    exact = rank_quality([0.1, 0.975, 0.975], standalone, resamples=1)
    assert rounded.tau == exact.tau < 1.0


def test_per_seed_score_equal_to_the_seeds_is_one_more_seed_exactly() -> None:
    _, standalone, _ = synthetic(4)
    result = per_seed_rank_quality(standalone, standalone, resamples=500)
    assert result.tau == result.one_seed_tau and result.diff == 0.0
    assert result.tau_ci == result.one_seed_tau_ci and result.diff_ci == (0.0, 0.0)


def test_per_seed_score_is_scored_against_its_own_held_out_target() -> None:
    truth, standalone, _ = synthetic(5)
    # A per-seed score that is the truth in every column is the perfect predictor.
    per_seed = per_seed_rank_quality(np.repeat(truth[:, None], SEEDS, axis=1), standalone, resamples=500)
    assert per_seed == rank_quality(truth, standalone, resamples=500)
    # Column s scored against target s: a column scored against the wrong seed would differ.
    rolled = per_seed_rank_quality(np.roll(standalone, 1, axis=1), standalone, resamples=1)
    assert rolled.tau != rolled.one_seed_tau


def test_line() -> None:
    result = RankQuality(tau=0.62, tau_ci=(0.48, 0.74), one_seed_tau=0.58, one_seed_tau_ci=(0.44, 0.70),
                         diff=0.04, diff_ci=(-0.06, 0.13), archs=40, seeds=3, resamples=2000)
    assert result.line() == "tau=0.62 [0.48, 0.74] one_seed_tau=0.58 [0.44, 0.70] diff=+0.04 [-0.06, +0.13]"
    blank = RankQuality(tau=float("nan"), tau_ci=(float("nan"),) * 2, one_seed_tau=0.5, one_seed_tau_ci=(0.4, 0.6),
                        diff=-0.001, diff_ci=(float("nan"),) * 2, archs=2, seeds=3, resamples=0)
    assert str(blank) == "tau=n/a [n/a, n/a] one_seed_tau=0.50 [0.40, 0.60] diff=+0.00 [n/a, n/a]"


# ---- fronts and hypervolume ---------------------------------------------------------------------


def test_front_hypervolume_by_hand() -> None:
    accuracy, speedup = [0.9, 0.8, 0.7], [1.0, 2.0, 3.0]
    # Reference (0.7, 1.0), the worst of each: only (0.8, 2.0) encloses area, (0.8-0.7) x (2.0-1.0).
    assert front_hypervolume([True, True, True], accuracy, speedup) == pytest.approx(0.1)
    assert front_hypervolume([0, 1, 2], accuracy, speedup) == pytest.approx(0.1)
    # Reference (0.6, 0.5): the staircase 0.3*0.5 + 0.2*1.0 + 0.1*1.0.
    assert front_hypervolume([True] * 3, accuracy, speedup, (0.6, 0.5)) == pytest.approx(0.45)
    assert front_hypervolume([1, 2], accuracy, speedup, (0.6, 0.5)) == pytest.approx(0.2 * 1.5 + 0.1 * 1.0)
    assert front_hypervolume([], accuracy, speedup) == 0.0
    with pytest.raises(ValueError, match="mask"):
        front_hypervolume([True, False], accuracy, speedup)
    with pytest.raises(ValueError, match="out of range"):
        front_hypervolume([3], accuracy, speedup)


def test_front_of_selects_on_the_predictor_and_is_scored_on_the_target() -> None:
    predicted, speedup = [0.9, 0.95, 0.7, 0.6], [1.2, 1.5, 3.0, 1.0]
    assert front_of(predicted, speedup) == [False, True, True, False]
    target = [0.9, 0.8, 0.7, 0.6]
    true_front = front_of(target, speedup)
    assert true_front == [True, True, True, False]
    # The predictor's front misses the most accurate architecture: less held-out hypervolume.
    assert front_hypervolume(front_of(predicted, speedup), target, speedup) < front_hypervolume(
        true_front, target, speedup)
