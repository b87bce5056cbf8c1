"""Pareto fronts, fvlab's one module for them: directions, dominance, non-dominated sorting,
crowding distance and hypervolume; the fit summary, the report, the rung pruner, the sweep's
front and the benchmarks all use it.

Directions are written as sweep files write them (``"maximize"`` or ``"minimize"``) or given as
Optuna's ``StudyDirection``; :func:`direction_name` is the one parser of both.

Dominance: values are rounded once, to float32 and then to 6 significant digits, and the
rounded values are compared exactly. Metrics pass through float32 on their way to metrics.json
and Optuna (351/360 is stored as 0.97499998 by one run and 0.97500000 by another): both round to
0.975, so a slower model with the "same" accuracy does not stay on the front. Rounding to float32
first makes a value and its float32 copy round alike. Because every value has one rounded image,
"no worse on every objective and better on one" is a strict partial order (transitive, never a
cycle), so a front is never empty; a pairwise tolerance would not be transitive.

Sorting, crowding and hypervolume: plain NumPy on small arrays (a study has tens to hundreds of
trials), because Optuna's hypervolume and non-dominated sorting are not public API. They work on
losses (every objective turned into one to minimise, see :func:`losses`), where a NaN (a diverged
accuracy, a failed measurement) is the worst value. Crowding distance and hypervolume use the
values as given, unrounded.

Bottom layer: imports no other fvlab module and no torch.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["DIRECTIONS", "direction_name", "maximizes", "SIGNIFICANT_DIGITS", "rounded", "dominance", "dominates",
           "pareto_optimal", "losses", "non_dominated_fronts", "crowding_distance", "rank_order",
           "epsilon_net_order", "pareto_indices", "hypervolume"]

DIRECTIONS = ("maximize", "minimize")
SIGNIFICANT_DIGITS = 6
_FLOAT32_MAX = float(np.finfo(np.float32).max)


# ---- directions ---------------------------------------------------------------------------------


def direction_name(direction: Any) -> str:
    """``"maximize"`` or ``"minimize"``, from that text or an Optuna ``StudyDirection``; ValueError otherwise."""
    # An enum (StudyDirection) by its name; text only exactly as a sweep file must write it.
    name = direction.name.lower() if hasattr(direction, "name") else direction
    if name not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: use 'maximize' or 'minimize'")
    return name


def maximizes(direction: Any) -> bool:
    """Whether ``direction`` (see :func:`direction_name`) maximises its objective."""
    return direction_name(direction) == "maximize"


def _signs(directions: Sequence[Any]) -> np.ndarray:
    return np.array([-1.0 if maximizes(d) else 1.0 for d in directions])


# ---- dominance ----------------------------------------------------------------------------------


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
    loss = rounded(points).reshape(-1, len(directions)) * _signs(directions)  # rounding is symmetric in the sign
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
    _signs(directions)  # a misspelt direction fails even with one point
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


# ---- sorting and crowding (on losses) -----------------------------------------------------------


def losses(values: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[Any]) -> np.ndarray:
    """Values (rows = points) as losses to minimise; NaN becomes +inf (the worst)."""
    array = np.asarray(values, dtype=float).reshape(-1, len(directions)) * _signs(directions)
    return np.where(np.isnan(array), np.inf, array)


def non_dominated_fronts(loss: np.ndarray) -> list[list[int]]:
    """Indices of the points, front by front (front 0 = the Pareto front), each front in index order."""
    loss = np.asarray(loss, dtype=float)
    n = len(loss)
    if n == 0:
        return []
    beats = dominance(loss, ["minimize"] * loss.shape[1])  # beats[i, j]: i dominates j
    dominated_by = beats.sum(axis=0)  # how many points dominate j
    placed = np.zeros(n, dtype=bool)
    fronts = []
    current = np.flatnonzero(dominated_by == 0)
    while len(current):
        fronts.append(current.tolist())
        placed[current] = True
        dominated_by = dominated_by - beats[current].sum(axis=0)
        current = np.flatnonzero((dominated_by == 0) & ~placed)
    return fronts


def crowding_distance(loss: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of the points of one front (inf at the extremes of each objective).

    Each objective adds the normalised gap between a point's two neighbours along it; an
    objective on which the front has no finite spread adds nothing.
    """
    n, m = loss.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        column = loss[:, k]
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        distance[order[0]] = distance[order[-1]] = np.inf
        if not np.isfinite(span) or span <= 0:
            continue
        gaps = (column[order[2:]] - column[order[:-2]]) / span
        distance[order[1:-1]] += np.nan_to_num(gaps, nan=0.0, posinf=np.inf)
    return distance


def rank_order(loss: np.ndarray) -> tuple[list[int], list[int]]:
    """(indices best first, front number of each point): by front, then by crowding distance
    (larger first, so the front's spread is kept), then by index (earlier first)."""
    order: list[int] = []
    front_of = [0] * len(loss)
    for number, front in enumerate(non_dominated_fronts(loss)):
        crowding = crowding_distance(loss[front])
        # sorted() is stable and the front is in index order: equal distances keep the earlier point first.
        order.extend(i for _, i in sorted(zip(-crowding, front), key=lambda pair: pair[0]))
        for i in front:
            front_of[i] = number
    return order, front_of


def _scaled(loss: np.ndarray) -> np.ndarray:
    """Losses scaled to [0, 1] per objective over all points (a NaN, an inf loss, at the worst edge)."""
    finite = np.isfinite(loss)
    columns = range(loss.shape[1])
    low = np.array([loss[finite[:, k], k].min() if finite[:, k].any() else 0.0 for k in columns])
    high = np.array([loss[finite[:, k], k].max() if finite[:, k].any() else 0.0 for k in columns])
    span = np.where(high > low, high - low, 1.0)
    return np.where(finite, (np.where(finite, loss, 0.0) - low) / span, 1.0)


def epsilon_net_order(loss: np.ndarray) -> tuple[list[int], list[int]]:
    """(indices best first, front number of each point): by front, within a front as an epsilon-net
    (the point best on the first objective, then each time the point farthest from those already
    taken), then by index."""
    loss = np.asarray(loss, dtype=float)
    if len(loss) == 0:
        return [], []
    # Distances on scaled losses, so images/s do not outweigh accuracy.
    scaled = _scaled(loss)
    order: list[int] = []
    front_of = [0] * len(loss)
    for number, front in enumerate(non_dominated_fronts(loss)):
        for i in front:
            front_of[i] = number
        left = list(front)
        first = min(left, key=lambda i: (loss[i, 0], i))
        taken = [first]
        left.remove(first)
        nearest = {i: float(np.linalg.norm(scaled[i] - scaled[first])) for i in left}
        while left:
            pick = max(left, key=lambda i: (nearest[i], -i))  # ties: the earlier point
            taken.append(pick)
            left.remove(pick)
            for i in left:
                nearest[i] = min(nearest[i], float(np.linalg.norm(scaled[i] - scaled[pick])))
        order.extend(taken)
    return order, front_of


def pareto_indices(values: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[Any]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all on the front)."""
    loss = losses(values, directions)
    return non_dominated_fronts(loss)[0] if len(loss) else []


# ---- hypervolume --------------------------------------------------------------------------------


def _hypervolume(loss: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume of losses that all lie strictly below the reference (slicing the last axis)."""
    if len(loss) == 0:
        return 0.0
    if loss.shape[1] == 1:
        return float(reference[0] - loss[:, 0].min())
    if loss.shape[1] == 2:
        volume, best_y = 0.0, reference[1]
        for x, y in loss[np.lexsort((loss[:, 1], loss[:, 0]))]:
            if y < best_y:  # a point above the staircase adds nothing
                volume += (reference[0] - x) * (best_y - y)
                best_y = y
        return float(volume)
    loss = loss[np.argsort(loss[:, -1], kind="stable")]
    volume = 0.0
    for i in range(len(loss)):
        upper = loss[i + 1, -1] if i + 1 < len(loss) else reference[-1]
        if upper > loss[i, -1]:
            # Between two consecutive heights, the region dominated is the (d-1)-volume of the
            # points at or below the lower height.
            volume += (upper - loss[i, -1]) * _hypervolume(loss[: i + 1, :-1], reference[:-1])
    return float(volume)


def hypervolume(values: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float],
                directions: Sequence[Any]) -> float:
    """Volume of the objective space that the points dominate and that dominates ``reference``.

    ``reference`` is a point as bad as or worse than every point of interest (e.g. the worst value
    of each objective over everything compared); points that do not dominate it add nothing.
    """
    ref = losses([reference], directions)[0]
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"reference point {list(reference)} must be finite")
    loss = losses(values, directions)
    loss = loss[np.all(loss < ref, axis=1)]
    if len(loss):
        loss = loss[non_dominated_fronts(loss)[0]]
    return _hypervolume(loss, ref)
