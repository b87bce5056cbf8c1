"""Pareto dominance: the one rule the fit summary, the report and the sweep mark fronts by.

Metrics pass through float32 on their way to metrics.json and Optuna (351/360 is stored as
0.97499998 by one run and 0.97500000 by another), so values within a relative tolerance count
as equal: otherwise a slower model with the "same" accuracy would stay on the front.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["REL_TOL", "dominates", "pareto_optimal"]

REL_TOL = 1e-6


def _maximize(direction: Any) -> bool:
    # "maximize"/"minimize" as written in sweep files, or Optuna's StudyDirection.
    name = str(getattr(direction, "name", direction)).lower()
    if name not in ("maximize", "minimize"):
        raise ValueError(f"direction {direction!r}: use 'maximize' or 'minimize'")
    return name == "maximize"


def _close(a: float, b: float, rel_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[Any], rel_tol: float = REL_TOL) -> bool:
    """True when ``a`` is at least as good as ``b`` on every objective and better on one (within ``rel_tol``)."""
    strictly_better = False
    for x, y, direction in zip(a, b, directions, strict=True):
        if _close(x, y, rel_tol):
            continue
        if (x > y) != _maximize(direction):
            return False
        strictly_better = True
    return strictly_better


def pareto_optimal(points: Sequence[Sequence[float] | None], directions: Sequence[Any],
                   rel_tol: float = REL_TOL) -> list[bool]:
    """Per point: not dominated by any other point (None, or a non-finite value, is never optimal)."""
    for direction in directions:
        _maximize(direction)  # a misspelt direction fails even with one point
    usable = [p if p is not None and all(math.isfinite(v) for v in p) else None for p in points]
    for p in usable:
        if p is not None and len(p) != len(directions):
            raise ValueError(f"point {tuple(p)} has {len(p)} values for {len(directions)} directions")
    return [p is not None and not any(q is not None and dominates(q, p, directions, rel_tol) for q in usable)
            for p in usable]
