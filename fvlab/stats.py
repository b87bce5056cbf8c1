"""Seed and paired statistics shared by the report and the sweep: the bottom layer, torch-free.

Pure functions over numbers (numpy, scipy, the standard library), so ``fvlab.report`` and
``fvlab.sweep`` both import them and neither imports the other:

- ``mean_std``: mean and sample standard deviation (ddof=1); one sample has no spread;
- ``paired_difference``: the difference of a variant to a reference, paired by seed (same seed,
  same initialisation and data order), with scipy's paired-t interval and p-value
  (``scipy.stats.ttest_rel``). Differences equal up to rounding have neither (``equal``): their
  zero spread is an artefact of few, coarse samples, not evidence, where scipy would give NaN or
  a p-value of 1e-14;
- ``holm``: Holm's step-down over a table's comparisons, so the chance of any false mark in the
  table stays at 1 - confidence; a comparison joins the family with at least ``MIN_MARKED_PAIRS``
  pairs and a p-value (``PairedDifference.can_mark``); ``marks_rule`` is the legend's sentence
  stating that rule, kept beside it so that the two cannot drift apart;
- ``paired_bootstrap``: scipy's percentile bootstrap over paired observations, seeded, with
  resamples where the statistic is undefined (NaN) left out.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["CONFIDENCE", "SIGNIFICANT_MARK", "MIN_MARKED_PAIRS", "EQUAL_TOLERANCE", "PairedDifference",
           "paired_difference", "holm", "family_size", "marks_rule", "mean_std", "BootstrapInterval",
           "paired_bootstrap"]

CONFIDENCE = 0.95
SIGNIFICANT_MARK = "*"  # Holm's step-down over the table's comparisons rejects at 1 - CONFIDENCE
# Two pairs give a t-test with one degree of freedom: on a few hundred images, where accuracies
# move in steps of 1/n, equal differences come up often and a single coincidence decides.
MIN_MARKED_PAIRS = 3
# Differences whose spread is below this (relative to their size) are equal up to rounding.
EQUAL_TOLERANCE = 1e-9


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof=1); (None, None) without values, std None for one value."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class PairedDifference:
    """Mean of the per-seed differences ``variant - reference`` and its paired-t interval."""

    reference: str
    seeds: list[Any]
    mean: float | None
    low: float | None = None
    high: float | None = None
    confidence: float = CONFIDENCE
    p_value: float | None = None  # two-sided paired-t; None with fewer than two pairs or no spread
    equal: bool = False  # every paired difference the same up to rounding: no interval, no p-value

    @property
    def n(self) -> int:
        """Number of seeds present, complete, in both variants."""
        return len(self.seeds)

    @property
    def can_mark(self) -> bool:
        """Whether this comparison belongs to its table's Holm family: a p-value from enough pairs."""
        return self.p_value is not None and self.n >= MIN_MARKED_PAIRS

    @property
    def excludes_zero(self) -> bool:
        """True when the (unadjusted) interval lies wholly above or below zero."""
        return self.low is not None and (self.low > 0 or self.high < 0)


def _all_equal(diffs: Sequence[float]) -> bool:
    """Whether the differences are one value up to rounding (``EQUAL_TOLERANCE``, relative)."""
    return max(diffs) - min(diffs) <= EQUAL_TOLERANCE * max(1.0, max(abs(d) for d in diffs))


def paired_difference(values: Mapping[Any, float], reference_values: Mapping[Any, float],
                      reference: str = "", confidence: float = CONFIDENCE) -> PairedDifference:
    """Difference to the reference over the seeds both have, with a paired-t interval and p-value (n >= 2)."""
    from scipy import stats

    seeds = [s for s in values if s in reference_values
             and values[s] is not None and reference_values[s] is not None]
    ours = [float(values[s]) for s in seeds]
    theirs = [float(reference_values[s]) for s in seeds]
    diffs = [a - b for a, b in zip(ours, theirs)]
    if not diffs:
        return PairedDifference(reference, [], None, confidence=confidence)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(reference, seeds, mean, confidence=confidence)
    if _all_equal(diffs):
        # scipy gives NaN for an exactly zero spread, and for 251/270 - 250/270 beside
        # 247/270 - 246/270 (equal but for the last bit) t = 7e13 and p = 1e-14: neither is evidence.
        return PairedDifference(reference, seeds, mean, confidence=confidence, equal=True)
    test = stats.ttest_rel(ours, theirs)
    interval = test.confidence_interval(confidence_level=confidence)
    p_value = float(test.pvalue)
    return PairedDifference(reference, seeds, mean, float(interval.low), float(interval.high), confidence,
                            p_value if math.isfinite(p_value) else None)


def holm(p_values: Sequence[float | None], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down: which hypotheses are rejected at family-wise level ``alpha``, in input order.

    The m p-values are taken smallest first; the k-th (from 0) is rejected while it is at most
    alpha / (m - k), and the first that is not stops the rest. None is no comparison: never
    rejected and not counted in m. (scipy has no Holm; statsmodels is not a dependency.)
    """
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    rejected = [False] * len(p_values)
    for k, (p, i) in enumerate(present):
        if not p <= alpha / (len(present) - k):  # a NaN stops too
            break
        rejected[i] = True
    return rejected


def family_size(differences: Iterable[PairedDifference | None]) -> int:
    """How many comparisons of a table can carry a mark: Holm's family."""
    return sum(1 for d in differences if d is not None and d.can_mark)


def marks_rule(family: int, confidence: float = CONFIDENCE, where: str = "this table") -> str:
    """The legend's sentence on the mark: Holm's family (its size) and what may carry a mark."""
    rule = (f"A mark needs at least {MIN_MARKED_PAIRS} pairs; differences equal up to rounding have no "
            f"p-value and no interval (n/a), never p = 0.")
    if family == 0:
        return (f"No comparison of {where} can carry a {SIGNIFICANT_MARK} (marked where Holm's step-down over "
                f"the table's comparisons rejects at {1 - confidence:.2g}). {rule}")
    return (f"{SIGNIFICANT_MARK} marks a difference that Holm's step-down over the {family} comparison"
            f"{'' if family == 1 else 's'} of {where} that can carry a mark (paired-t p-values; every row, "
            f"every marked column) finds significant at {1 - confidence:.2g}, so the chance of any false "
            f"{SIGNIFICANT_MARK} in the table is at most {1 - confidence:.0%}; an interval can exclude zero "
            f"without it. {rule}")


@dataclass(frozen=True)
class BootstrapInterval:
    """Percentile bootstrap bounds (one per output of the statistic) and the resamples behind them."""

    low: np.ndarray
    high: np.ndarray
    kept: int  # resamples the bounds rest on: every output defined
    dropped: int  # resamples left out because some output was undefined (NaN)


def paired_bootstrap(data: Sequence[ArrayLike], statistic: Callable[..., Any], resamples: int, seed: int,
                     confidence: float = CONFIDENCE, batch: int | None = None) -> BootstrapInterval:
    """``scipy.stats.bootstrap`` (paired, percentile, seeded) leaving out resamples where any output is NaN.

    Observations are on axis 0 of every sample. A ``statistic`` with an ``axis`` argument gets a batch
    of resamples, observations on that axis (scipy's convention), and may return several outputs on a
    leading axis; one without is called once per resample. Without a resample (fewer than two
    observations, ``resamples`` < 1) the bounds are one NaN.
    """
    from scipy import stats

    samples = tuple(np.asarray(sample, dtype=float) for sample in data)
    if resamples < 1 or len(samples[0]) < 2:
        # scipy refuses both; with nothing to resample there is no interval.
        return BootstrapInterval(np.asarray(np.nan), np.asarray(np.nan), 0, max(resamples, 0))
    with warnings.catch_warnings():
        # An undefined resample makes scipy's interval NaN (and warns); it is redone below without it.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        if resamples == 1:
            # scipy also returns the draws' standard error (unused here): 0/0 with ddof=1 for one draw.
            warnings.filterwarnings("ignore", "Degrees of freedom <= 0", RuntimeWarning)
            warnings.filterwarnings("ignore", "invalid value encountered in divide", RuntimeWarning)
        result = stats.bootstrap(samples, statistic, n_resamples=resamples, batch=batch, paired=True, axis=0,
                                 confidence_level=confidence, method="percentile",
                                 rng=np.random.default_rng(seed))
    draws = np.asarray(result.bootstrap_distribution, dtype=float)
    kept = np.isfinite(draws.reshape(-1, resamples)).all(axis=0)
    if kept.all():
        low, high = result.confidence_interval
        return BootstrapInterval(np.asarray(low), np.asarray(high), resamples, 0)
    dropped = int((~kept).sum())
    if not kept.any():
        nothing = np.full(draws.shape[:-1], np.nan)
        return BootstrapInterval(nothing, nothing, 0, dropped)
    # scipy takes its percentiles over every draw, so one undefined statistic (Kendall's tau of an
    # all-tied resample) makes the whole interval NaN. The same percentiles of the defined draws,
    # left out for every output alike so that differences between outputs stay paired:
    alpha = (1 - confidence) / 2
    bounds = stats.quantile(draws[..., kept], np.asarray([alpha, 1 - alpha]), axis=-1)
    return BootstrapInterval(bounds[..., 0], bounds[..., 1], int(kept.sum()), dropped)
