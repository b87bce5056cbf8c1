"""Rank quality measured like with like: a predictor against one more stand-alone training.

With K >= 3 stand-alone seeds per architecture, the target of seed s is the mean of the other
K-1 seeds (:func:`held_out_targets`). A predictor (the supernet's validation accuracy or loss, a
rung's accuracy) is scored by Kendall's tau-b against target s, averaged over s; stand-alone seed
s itself is scored the same way against the same target, so the two taus differ only in what
predicts. Their paired difference says whether the predictor ranks better (> 0) or worse (< 0)
than training every architecture once more.

Intervals are percentile bootstrap 95% intervals over architectures (``scipy.stats.bootstrap``
through :func:`fvlab.stats.paired_bootstrap`): one draw of architectures (with replacement) per
resample, shared by the three statistics, so the difference is paired.

Values are rounded once as :mod:`fvlab.pareto` compares them (float32, then 6 significant
digits) before they are ranked, so that one accuracy stored as two floats (351/360 as
0.97499998 and 0.975) is a tie, not an order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from fvlab import pareto
from fvlab.stats import paired_bootstrap
from fvlab.tables import interval_cell

__all__ = ["MIN_SEEDS", "held_out_targets", "kendall_tau_b", "RankQuality", "rank_quality",
           "per_seed_rank_quality", "front_of", "front_hypervolume"]

MIN_SEEDS = 3  # each held-out target then averages at least two trainings
_MAXIMIZE2 = ("maximize", "maximize")
# Bootstrap chunks hold at most this many pair signs per array, so 2000 resamples of a few
# hundred architectures stay within tens of MB.
_CHUNK_ELEMENTS = 1 << 20


def _standalone_matrix(standalone: ArrayLike) -> np.ndarray:
    """``standalone`` as a finite (archs, K) float array, or ValueError naming what is wrong."""
    values = np.asarray(standalone, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"standalone must be a 2-D array (archs, seeds), got shape {values.shape}")
    archs, seeds = values.shape
    if seeds < MIN_SEEDS:
        raise ValueError(f"standalone has {seeds} seed(s) per architecture; held-out targets need "
                         f"K >= {MIN_SEEDS} so that each averages at least {MIN_SEEDS - 1} other seeds")
    if archs < 2:
        raise ValueError(f"standalone has {archs} architecture(s); a ranking needs at least 2")
    if not np.isfinite(values).all():
        raise ValueError("standalone has non-finite values (a diverged or missing run): "
                         "drop that architecture or replace the value first")
    return values


def _predictor_matrix(values: ArrayLike, shape: tuple[int, int], name: str) -> np.ndarray:
    """A finite predictor as (archs, K): a vector is repeated for every seed."""
    array = np.asarray(values, dtype=float)
    if array.ndim == 1 and len(array) == shape[0]:
        array = np.repeat(array[:, None], shape[1], axis=1)
    if array.shape != shape:
        raise ValueError(f"{name} has shape {np.shape(values)}; standalone has {shape} (archs, seeds)")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite values: drop that architecture or replace the value first")
    return array


def held_out_targets(standalone: ArrayLike) -> np.ndarray:
    """(archs, K) array whose column s is each architecture's mean accuracy over the seeds other than s."""
    values = pareto.rounded(_standalone_matrix(standalone))
    seeds = values.shape[1]
    # Summing the other seeds in sorted order makes the mean depend on the values only, not on
    # which seed produced which, so equal multisets give bit-identical (tied) targets.
    means = [np.sort(np.delete(values, s, axis=1), axis=1).mean(axis=1) for s in range(seeds)]
    return pareto.rounded(np.stack(means, axis=1))


def _pair_signs(values: np.ndarray) -> np.ndarray:
    """Sign of ``values[..., i, :] - values[..., j, :]`` over all pairs i < j of the archs axis (-2)."""
    i, j = np.triu_indices(values.shape[-2], k=1)
    return np.sign(values[..., i, :] - values[..., j, :])


def _tau_b_from_signs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b from pair signs (pairs on axis -2); NaN where either side is all tied."""
    # (concordant - discordant) / sqrt(pairs untied in a * pairs untied in b): tau-b exactly,
    # since a pair tied on either side contributes 0 to the numerator.
    numerator = (a * b).sum(axis=-2)
    denominator = np.sqrt((a * a).sum(axis=-2) * (b * b).sum(axis=-2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def kendall_tau_b(x: ArrayLike, y: ArrayLike) -> np.ndarray | float:
    """Kendall's tau-b between ``x`` and ``y`` along their last axis (batched; NaN where undefined)."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    tau = _tau_b_from_signs(_pair_signs(x[..., None]), _pair_signs(y[..., None]))[..., 0]
    return float(tau) if tau.ndim == 0 else tau


def _seed_taus(predictor: np.ndarray, standalone: np.ndarray,
               target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per seed (last axis): tau(predictor, target) and tau(standalone, target), archs on axis -2."""
    target_signs = _pair_signs(target)
    return (_tau_b_from_signs(_pair_signs(predictor), target_signs),
            _tau_b_from_signs(_pair_signs(standalone), target_signs))


@dataclass(frozen=True)
class RankQuality:
    """A predictor's rank agreement with held-out stand-alone targets, next to one more seed's."""

    tau: float  # mean over s of tau(predictor, target s)
    tau_ci: tuple[float, float]
    one_seed_tau: float  # mean over s of tau(stand-alone seed s, target s)
    one_seed_tau_ci: tuple[float, float]
    diff: float  # tau - one_seed_tau: > 0 when the predictor ranks better than one more training
    diff_ci: tuple[float, float]
    archs: int
    seeds: int
    resamples: int  # resamples the intervals rest on (every tau defined)
    dropped: int = 0  # resamples left out because some tau was undefined (all tied)

    def line(self) -> str:
        """One line: ``tau=0.62 [0.48, 0.74] one_seed_tau=0.58 [0.44, 0.70] diff=+0.04 [-0.06, +0.13]``."""
        return (f"tau={interval_cell(self.tau, *self.tau_ci, _plain)} "
                f"one_seed_tau={interval_cell(self.one_seed_tau, *self.one_seed_tau_ci, _plain)} "
                f"diff={interval_cell(self.diff, *self.diff_ci, _signed)}")

    def __str__(self) -> str:
        return self.line()


def _plain(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _signed(value: float) -> str:
    # round() first so that a tiny negative difference prints as +0.00, not -0.00.
    return "n/a" if math.isnan(value) else f"{round(value, 2) + 0.0:+.2f}"


def _rank_quality(predictor: np.ndarray, standalone: np.ndarray, resamples: int, seed: int,
                  higher_is_better: bool) -> RankQuality:
    """The held-out frame for a predictor already shaped (archs, K) like ``standalone``."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    # Negating a loss keeps the rounding exact (it is symmetric in the sign), so loss and
    # accuracy give identical results.
    predictor = pareto.rounded(predictor if higher_is_better else -predictor)
    target = held_out_targets(standalone)
    standalone = pareto.rounded(standalone)
    archs, seeds = standalone.shape
    own, one = _seed_taus(predictor, standalone, target)
    tau, one_seed_tau = float(own.mean()), float(one.mean())

    def taus(predictor: np.ndarray, standalone: np.ndarray, target: np.ndarray, axis: int = -1) -> np.ndarray:
        """(tau, one_seed_tau, diff) of each resample; scipy hands over (seeds, resamples, archs on ``axis``)."""
        own, one = _seed_taus(*(np.moveaxis(a, (0, axis), (-1, -2)) for a in (predictor, standalone, target)))
        own, one = own.mean(axis=-1), one.mean(axis=-1)
        return np.stack([own, one, own - one])

    # A resample where any tau is undefined is left out of all three statistics (paired_bootstrap),
    # so the three intervals rest on the same draws and the difference stays paired.
    chunk = max(1, _CHUNK_ELEMENTS // (archs * (archs - 1) // 2 * seeds))
    interval = paired_bootstrap((predictor, standalone, target), taus, resamples, seed, batch=chunk)
    (tau_ci, one_ci, diff_ci) = ((float(lo), float(hi)) for lo, hi in zip(interval.low, interval.high))
    return RankQuality(tau=tau, tau_ci=tau_ci, one_seed_tau=one_seed_tau, one_seed_tau_ci=one_ci,
                       diff=tau - one_seed_tau, diff_ci=diff_ci, archs=archs, seeds=seeds,
                       resamples=interval.kept, dropped=interval.dropped)


def _quality_of(values: ArrayLike, standalone: ArrayLike, ndim: int, name: str, resamples: int,
                seed: int, higher_is_better: bool) -> RankQuality:
    """Check a predictor of ``ndim`` dimensions against the stand-alone matrix and score it."""
    matrix = _standalone_matrix(standalone)
    array = np.asarray(values, dtype=float)
    if array.ndim != ndim:
        shape = "one value per architecture" if ndim == 1 else "(archs, seeds)"
        raise ValueError(f"{name} must be {shape}, got shape {array.shape}")
    return _rank_quality(_predictor_matrix(array, matrix.shape, name), matrix, resamples, seed, higher_is_better)


def rank_quality(score: ArrayLike, standalone: ArrayLike, resamples: int = 2000,
                 seed: int = 0, higher_is_better: bool = True) -> RankQuality:
    """How well one score per architecture ranks the held-out stand-alone targets, next to one more seed."""
    return _quality_of(score, standalone, 1, "score", resamples, seed, higher_is_better)


def per_seed_rank_quality(per_seed_score: ArrayLike, standalone: ArrayLike, resamples: int = 2000,
                          seed: int = 0, higher_is_better: bool = True) -> RankQuality:
    """The same frame for a score taken from seed s's own run (e.g. its rung-1 accuracy), column s."""
    return _quality_of(per_seed_score, standalone, 2, "per_seed_score", resamples, seed, higher_is_better)


def front_of(score_acc: ArrayLike, speedup: ArrayLike) -> list[bool]:
    """Per architecture: on the Pareto front of (predicted accuracy, speedup), both maximised."""
    acc, speed = np.asarray(score_acc, dtype=float), np.asarray(speedup, dtype=float)
    if acc.shape != speed.shape or acc.ndim != 1:
        raise ValueError(f"score_acc {acc.shape} and speedup {speed.shape} need one value per architecture")
    return pareto.pareto_optimal(np.stack([acc, speed], axis=1).tolist(), _MAXIMIZE2)


def _selected_indices(selected: ArrayLike, archs: int) -> np.ndarray:
    """A boolean mask over the architectures or a list of their indices, as indices."""
    chosen = np.asarray(selected)
    if chosen.size == 0:
        return np.zeros(0, dtype=int)
    if chosen.dtype == bool:
        if chosen.shape != (archs,):
            raise ValueError(f"selected mask has shape {chosen.shape}; there are {archs} architectures")
        return np.flatnonzero(chosen)
    if not np.issubdtype(chosen.dtype, np.integer) or chosen.ndim != 1:
        raise ValueError("selected must be a boolean mask or a list of architecture indices")
    if chosen.min() < 0 or chosen.max() >= archs:
        raise ValueError(f"selected indices {chosen.tolist()} out of range for {archs} architectures")
    return chosen


def front_hypervolume(selected: ArrayLike, accuracy: ArrayLike, speedup: ArrayLike,
                      reference_point: tuple[float, float] | None = None) -> float:
    """2-D hypervolume (both maximised) of the selected architectures' (accuracy, speedup) points.

    ``accuracy`` is the held-out target's, not the predictor's, so fronts chosen by different
    predictors are scored alike. The default reference point is the worst accuracy and the
    worst speedup over all architectures, so hypervolumes over the same architectures (and
    their ratios) are comparable; a point at the worst of either adds nothing.
    """
    acc, speed = np.asarray(accuracy, dtype=float), np.asarray(speedup, dtype=float)
    if acc.shape != speed.shape or acc.ndim != 1 or len(acc) == 0:
        raise ValueError(f"accuracy {acc.shape} and speedup {speed.shape} need one value per architecture")
    if not (np.isfinite(acc).all() and np.isfinite(speed).all()):
        raise ValueError("accuracy and speedup must be finite to score a front")
    reference = (float(acc.min()), float(speed.min())) if reference_point is None else reference_point
    chosen = _selected_indices(selected, len(acc))
    return pareto.hypervolume(np.stack([acc[chosen], speed[chosen]], axis=1), reference, _MAXIMIZE2)
