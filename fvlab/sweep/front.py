"""Pareto fronts with directions: non-dominated sorting, crowding distance and hypervolume.

Plain NumPy on small arrays (a study has tens to hundreds of trials), so the rung decisions,
the Pareto table and the benchmarks can use it: Optuna's hypervolume and non-dominated sorting
are not public API.
Values are given as the objectives report them, with a direction per objective
(``"maximize"`` or ``"minimize"``); internally everything is turned into losses to minimise.
A NaN (a diverged accuracy, a failed measurement) is the worst possible value.
Dominance is fvlab's one rule (:mod:`fvlab.pareto`): values rounded once (float32, then 6
significant digits) and compared exactly, so it is transitive and the first front is never empty.
Crowding distance and hypervolume use the values as given.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fvlab import pareto

__all__ = ["losses", "dominates", "non_dominated_fronts", "crowding_distance", "rank_order",
           "epsilon_net_order", "PROMOTIONS", "promotion_order", "pareto_indices", "hypervolume"]

# How a rung ranks its trials (``pruner: {name: rungs, promotion: ...}``), see promotion_order.
PROMOTIONS = ("nsga2", "epsilon_net", "first_front")


def _signs(directions: Sequence[str]) -> np.ndarray:
    bad = [d for d in directions if d not in ("maximize", "minimize")]
    if bad:
        raise ValueError(f"direction {bad[0]!r} must be maximize or minimize")
    return np.array([-1.0 if d == "maximize" else 1.0 for d in directions])


def losses(values: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Values (rows = points) as losses to minimise; NaN becomes +inf (the worst)."""
    array = np.asarray(values, dtype=float).reshape(-1, len(directions))
    array = array * _signs(directions)
    return np.where(np.isnan(array), np.inf, array)


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether loss vector ``a`` Pareto-dominates ``b``: fvlab's one rule (fvlab.pareto)."""
    return pareto.dominates(np.asarray(a).tolist(), np.asarray(b).tolist(), ["minimize"] * len(a))


def non_dominated_fronts(loss: np.ndarray) -> list[list[int]]:
    """Indices of the points, front by front (front 0 = the Pareto front), each front in index order."""
    loss = np.asarray(loss, dtype=float)
    n = len(loss)
    if n == 0:
        return []
    beats = pareto.dominance(loss, ["minimize"] * loss.shape[1])  # beats[i, j]: i dominates j
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


def epsilon_net_order(loss: np.ndarray) -> tuple[list[int], list[int]]:
    """(indices best first, front number of each point): by front, within a front as an epsilon-net
    (the point best on the first objective, then each time the point farthest from those already
    taken), then by index."""
    loss = np.asarray(loss, dtype=float)
    if len(loss) == 0:
        return [], []
    # Distances on losses scaled to [0, 1] per objective over the whole rung, so images/s do not
    # outweigh accuracy; a NaN (inf loss) sits at the worst edge.
    finite = np.isfinite(loss)
    columns = range(loss.shape[1])
    low = np.array([loss[finite[:, k], k].min() if finite[:, k].any() else 0.0 for k in columns])
    high = np.array([loss[finite[:, k], k].max() if finite[:, k].any() else 0.0 for k in columns])
    span = np.where(high > low, high - low, 1.0)
    scaled = np.where(finite, (np.where(finite, loss, 0.0) - low) / span, 1.0)
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


def promotion_order(loss: np.ndarray, promotion: str = "nsga2") -> tuple[list[int], list[int]]:
    """(indices best first, front number of each point) under a promotion rule of ``PROMOTIONS``
    (``first_front`` orders like ``nsga2``; it differs in how many go on, see fvlab.sweep.rungs)."""
    if promotion not in PROMOTIONS:
        raise ValueError(f"promotion {promotion!r} must be one of {', '.join(PROMOTIONS)}")
    return epsilon_net_order(loss) if promotion == "epsilon_net" else rank_order(loss)


def pareto_indices(values: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all on the front)."""
    loss = losses(values, directions)
    return non_dominated_fronts(loss)[0] if len(loss) else []


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
                directions: Sequence[str]) -> float:
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
