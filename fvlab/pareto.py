"""Pareto dominance: the one rule the fit summary, the report and the sweep mark fronts by.

Values are rounded once, to float32 and then to 6 significant digits, and the rounded values
are compared exactly. Metrics pass through float32 on their way to metrics.json and Optuna
(351/360 is stored as 0.97499998 by one run and 0.97500000 by another): both round to 0.975, so
a slower model with the "same" accuracy does not stay on the front. Rounding to float32 first
makes a value and its float32 copy round alike. Because every value has one rounded image,
"no worse on every objective and better on one" is a strict partial order (transitive, never a
cycle), so a front is never empty; a pairwise tolerance would not be transitive.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["SIGNIFICANT_DIGITS", "rounded", "dominance", "dominates", "pareto_optimal"]

SIGNIFICANT_DIGITS = 6
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _maximize(direction: Any) -> bool:
    # "maximize"/"minimize" as written in sweep files, or Optuna's StudyDirection.
    name = str(getattr(direction, "name", direction)).lower()
    if name not in ("maximize", "minimize"):
        raise ValueError(f"direction {direction!r}: use 'maximize' or 'minimize'")
    return name == "maximize"


def _round(value: float) -> float:
    if not math.isfinite(value):
        return value
    if abs(value) <= _FLOAT32_MAX:  # beyond float32's range the value is rounded as it is
        value = float(np.float32(value))
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def rounded(values: Any) -> np.ndarray:
    """``values`` as a float array rounded the way dominance compares them (NaN and inf kept)."""
    array = np.asarray(values, dtype=float)
    return np.array([_round(v) for v in array.ravel().tolist()], dtype=float).reshape(array.shape)


def dominance(points: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[Any]) -> np.ndarray:
    """Boolean matrix ``D`` with ``D[i, j]`` when point ``i`` dominates point ``j`` (rows = points).

    A NaN compares as neither better nor worse, so a point with a NaN never dominates on
    that objective; callers that want NaN as the worst value replace it first.
    """
    signs = np.array([-1.0 if _maximize(d) else 1.0 for d in directions])
    loss = rounded(points).reshape(-1, len(directions)) * signs  # rounding is symmetric in the sign
    no_worse = (loss[:, None, :] <= loss[None, :, :]).all(axis=2)
    better = (loss[:, None, :] < loss[None, :, :]).any(axis=2)
    return no_worse & better


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[Any]) -> bool:
    """True when ``a`` is at least as good as ``b`` on every objective and better on one (after rounding)."""
    if not len(a) == len(b) == len(directions):
        raise ValueError(f"points {tuple(a)} and {tuple(b)} need one value per direction ({len(directions)})")
    return bool(dominance([list(a), list(b)], directions)[0, 1])


def pareto_optimal(points: Sequence[Sequence[float] | None], directions: Sequence[Any]) -> list[bool]:
    """Per point: not dominated by any other point (None, or a non-finite value, is never optimal)."""
    for direction in directions:
        _maximize(direction)  # a misspelt direction fails even with one point
    usable = [p if p is not None and all(math.isfinite(v) for v in p) else None for p in points]
    for p in usable:
        if p is not None and len(p) != len(directions):
            raise ValueError(f"point {tuple(p)} has {len(p)} values for {len(directions)} directions")
    kept = [i for i, p in enumerate(usable) if p is not None]
    flags = [False] * len(points)
    if kept:
        dominated = dominance([list(usable[i]) for i in kept], directions).any(axis=0)
        for i, beaten in zip(kept, dominated.tolist()):
            flags[i] = not beaten
    return flags
