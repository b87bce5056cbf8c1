"""The report's PNG figures (matplotlib, Agg): every point labelled, axes with units, Pareto fronts."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from fvlab.metrics import (GFLOPS, LATENCY_MS, PARAMS_M, THROUGHPUT, THROUGHPUT_HI, THROUGHPUT_LO, VAL_ACC1,
                           VAL_ACC1_BEST, VAL_LOSS)
from fvlab.pareto import maximizes, pareto_optimal

__all__ = ["FIGSIZE", "DPI", "Point", "Series", "plot_accuracy_against",
           "plot_curves", "plot_study", "plot_batch_curves"]

FIGSIZE = (8.0, 5.0)  # inches; at DPI 110: 880 x 550 px, legible at 100% zoom
DPI = 110
ACCURACY_LABEL = f"{VAL_ACC1_BEST}: best top-1 validation accuracy (0-1)"
AXES = {"throughput": (f"{THROUGHPUT}: inference throughput (images/s, higher is better)", True),
        "gflops": (f"{GFLOPS}: GFLOPs per image (lower is better)", False)}


@dataclass
class Point:
    """One variant (mean over seeds, with its std) or trial on an accuracy chart."""

    label: str
    group: str
    accuracy: float
    accuracy_std: float | None = None
    throughput: float | None = None
    gflops: float | None = None
    feasible: bool = True
    throughput_lo: float | None = None  # the 95% interval of the side-by-side measurement
    throughput_hi: float | None = None


@dataclass
class Series:
    """Per-epoch validation accuracy of one variant or trial: one curve per seed."""

    label: str
    group: str
    curves: list[list[tuple[int, float]]]


def _spread(values: Sequence[float], min_gap: float) -> list[float]:
    """Label heights near ``values`` at least ``min_gap`` apart (labels of equal curves would overlap)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = list(values)
    for previous, current in zip(order, order[1:]):
        placed[current] = max(placed[current], placed[previous] + min_gap)
    shift = (max(placed) - max(values)) / 2 if values else 0.0  # centre the stack on the curves
    return [p - shift for p in placed]


def _new_figure() -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    fig.set_size_inches(*FIGSIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tight_layout's "not compatible" notes on Optuna's axes
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _colours(groups: Sequence[str]) -> dict[str, Any]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {g: cycle[i % len(cycle)] for i, g in enumerate(dict.fromkeys(groups))}


def _plot_infeasible(ax: Any, infeasible: Sequence[Point], axis: str) -> None:
    """Grey crosses, labelled, for the points that break a constraint."""
    ax.scatter([getattr(p, axis) for p in infeasible], [p.accuracy for p in infeasible], marker="x",
               color="grey", s=50, label="infeasible (breaks a constraint)", zorder=3)
    for p in infeasible:
        ax.annotate(p.label, (getattr(p, axis), p.accuracy), textcoords="offset points",
                    xytext=(7, 5), fontsize=10, color="grey")


def _plot_groups(ax: Any, usable: Sequence[Point], axis: str) -> None:
    """One colour per group: std over seeds as vertical bars, the throughput interval as horizontal ones."""
    colours = _colours([p.group for p in usable])
    several = len(colours) > 1
    for group, colour in colours.items():
        members = [p for p in usable if p.group == group]
        xerr = None
        if axis == "throughput" and any(p.throughput_lo is not None for p in members):
            xerr = [[max(p.throughput - p.throughput_lo, 0.0) if p.throughput_lo is not None else 0.0
                     for p in members],
                    [max(p.throughput_hi - p.throughput, 0.0) if p.throughput_hi is not None else 0.0
                     for p in members]]
        ax.errorbar([getattr(p, axis) for p in members], [p.accuracy for p in members],
                    yerr=[p.accuracy_std or 0.0 for p in members], xerr=xerr, fmt="o", color=colour,
                    ecolor=colour, elinewidth=1.2, capsize=4, markersize=7,
                    label=group if several else None, zorder=3)


def _label_points(ax: Any, usable: Sequence[Point], axis: str) -> None:
    """Label every point; points at (nearly) the same place get their labels stacked instead of overprinted."""
    xs = [getattr(p, axis) for p in usable]
    x_span = (max(xs) - min(xs)) or 1.0
    taken: list[tuple[float, float]] = []
    for p, x in zip(usable, xs):
        clashes = sum(abs(x - tx) < 0.08 * x_span and abs(p.accuracy - ty) < 1e-9 + 0.03 *
                      (max(q.accuracy for q in usable) - min(q.accuracy for q in usable) or 1.0)
                      for tx, ty in taken)
        taken.append((x, p.accuracy))
        ax.annotate(p.label, (x, p.accuracy), textcoords="offset points",
                    xytext=(7, 5 - 13 * clashes), fontsize=10)


def _plot_front(ax: Any, usable: Sequence[Point], axis: str, maximize_x: bool) -> None:
    """The Pareto front of accuracy and ``axis``: a dashed staircase, or a ring round a single point."""
    flags = pareto_optimal([(getattr(p, axis), p.accuracy) for p in usable],
                           ("maximize" if maximize_x else "minimize", "maximize"))
    front = sorted((getattr(p, axis), p.accuracy) for p, f in zip(usable, flags) if f)
    if len(front) > 1:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post" if not maximize_x else "pre", color="grey", linestyle="--",
                linewidth=1.2, zorder=2, label="Pareto front")
    elif front:
        ax.plot(*front[0], marker="o", markersize=14, markerfacecolor="none", color="grey",
                linestyle="none", label="Pareto front")


def _error_bar_title(title: str, usable: Sequence[Point], axis: str) -> str:
    """``title`` with a line saying what the chart's error bars are, if it has any."""
    bars = []
    if any(p.accuracy_std for p in usable):
        bars.append("± std over seeds (vertical)")
    if axis == "throughput" and any(p.throughput_lo is not None for p in usable):
        bars.append("95% interval of throughput (horizontal)")
    if bars:
        title = (title + "\n" if title else "") + "error bars: " + "; ".join(bars)
    return title


def plot_accuracy_against(points: Sequence[Point], axis: str, path: Path, title: str = "",
                          ylabel: str = ACCURACY_LABEL) -> Path | None:
    """Accuracy (or mIoU: ``ylabel``) against throughput or GFLOPs: error bars over seeds, labels, the Pareto front."""
    x_label, maximize_x = AXES[axis]
    infeasible = [p for p in points if not p.feasible and getattr(p, axis) is not None]
    usable = [p for p in points if p.feasible and getattr(p, axis) is not None and p.accuracy is not None]
    if not usable:
        return None
    with plt.style.context("default"):
        fig, ax = _new_figure()
        if infeasible:
            _plot_infeasible(ax, infeasible, axis)
        _plot_groups(ax, usable, axis)
        _label_points(ax, usable, axis)
        _plot_front(ax, usable, axis, maximize_x)
        ax.margins(y=0.1)  # room for the labels of the top points
        ax.set_xlabel(x_label, fontsize=11)
        ax.set_ylabel(ylabel, fontsize=11)
        ax.set_title(_error_bar_title(title, usable, axis), fontsize=12)
        # Room for the labels right of the rightmost point.
        left, right = ax.get_xlim()
        ax.set_xlim(left, right + 0.12 * (right - left))
        ax.legend(fontsize=9, loc="best")
        return _save(fig, path)


def plot_curves(series: Sequence[Series], path: Path, title: str = "",
                ylabel: str = f"{VAL_ACC1}: top-1 validation accuracy (0-1)") -> Path | None:
    """Validation accuracy (or mIoU: ``ylabel``) per epoch: the mean over seeds as a line, ± std as a band."""
    series = [s for s in series if any(s.curves)]
    if not series:
        return None
    with plt.style.context("default"):
        fig, ax = _new_figure()
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        banded = False
        ends = []
        for i, s in enumerate(series):
            colour = cycle[i % len(cycle)]
            epochs = sorted({e for curve in s.curves for e, _ in curve})
            means, lows, highs = [], [], []
            for epoch in epochs:
                values = [v for curve in s.curves for e, v in curve if e == epoch]
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                banded |= len(values) > 1
                means.append(mean)
                lows.append(mean - std)
                highs.append(mean + std)
            ax.plot(epochs, means, marker="o", markersize=4, color=colour, linewidth=1.6)
            ax.fill_between(epochs, lows, highs, color=colour, alpha=0.15, linewidth=0)
            ends.append((s.label, epochs[-1], means[-1], colour))
        low, high = ax.get_ylim()
        heights = _spread([y for _, _, y, _ in ends], 0.045 * (high - low))
        x_text = max(x for _, x, _, _ in ends)
        for (label, x, y, colour), text_y in zip(ends, heights):
            ax.annotate(label, (x, y), xytext=(x_text + 0.03 * max(x_text, 1), text_y), fontsize=10,
                        color=colour, va="center",
                        arrowprops=dict(arrowstyle="-", color=colour, linewidth=0.6, alpha=0.6))
        ax.set_xlabel("epoch", fontsize=11)
        ax.set_ylabel(ylabel, fontsize=11)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if banded:
            title = (title + "\n" if title else "") + "line: mean over seeds; band: ± std"
        ax.set_title(title, fontsize=12)
        left, right = ax.get_xlim()
        ax.set_xlim(left, right + 0.15 * (right - left))
        return _save(fig, path)


UNITS = {VAL_ACC1_BEST: f"{VAL_ACC1_BEST} (0-1)", VAL_ACC1: f"{VAL_ACC1} (0-1)", VAL_LOSS: VAL_LOSS,
         THROUGHPUT: f"{THROUGHPUT} (images/s)", GFLOPS: f"{GFLOPS} (GFLOPs)",
         PARAMS_M: f"{PARAMS_M} (millions)", LATENCY_MS: f"{LATENCY_MS} (ms)"}


def with_unit(name: str) -> str:
    """A metric name with its unit, for an axis label."""
    return UNITS.get(name, name)


def _optuna_figure(draw: Callable[[], Any], path: Path, title: str,
                   finish: Callable[[Any], None] | None = None) -> Path:
    # Optuna's matplotlib plots switch the global style: keep that inside this figure.
    with plt.style.context("default"), matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        ax = draw()
        ax.set_title(title, fontsize=12)
        if ax.get_xlabel() == "Trial":
            ax.set_xlabel("trial number", fontsize=11)
            ax.xaxis.get_major_locator().set_params(integer=True)
        if finish is not None:
            finish(ax)
        return _save(ax.figure, path)


def _label_trials(study: Any, complete: Sequence[Any]) -> Callable[[Any], None]:
    def finish(ax: Any) -> None:
        for trial in complete:
            ax.annotate(f"#{trial.number}", (trial.values[0], trial.values[1]), textcoords="offset points",
                        xytext=(6, 4), fontsize=10)
    return finish


def plot_study(data: Any, out: Path, prefix: str) -> tuple[list[tuple[Path, str]], list[str]]:
    """Optuna's history, importances, Pareto front and hypervolume plots; (files+captions, skip notes)."""
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    study, names = data.study, data.objective_names
    made: list[tuple[Path, str]] = []
    skipped: list[str] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return made, [f"{data.name}: no complete trial yet, so no study plots"]
    several = len(study.directions) > 1
    for i, name in enumerate(names):
        path = out / f"{prefix}_history_{i}.png" if several else out / f"{prefix}_history.png"
        made.append((_optuna_figure(lambda i=i, name=name: optuna_plots.plot_optimization_history(
            study, target=(lambda t, i=i: t.values[i]) if several else None, target_name=with_unit(name)),
            path, f"Optimisation history of {data.name}: {name}"),
            f"Optimisation history of {data.name}: {name} per trial and the best so far; "
            f"a flat best line means the search has converged."))
    varying = {k for t in complete for k in t.params
               if len({repr(u.params.get(k)) for u in complete}) > 1}
    if len(complete) < 2 or not varying:
        skipped.append(f"{data.name}: parameter importances need at least two complete trials with a "
                       f"parameter that varies ({len(complete)} complete)")
    else:
        try:
            path = out / f"{prefix}_importances.png"
            made.append((_optuna_figure(lambda: optuna_plots.plot_param_importances(
                study, target=(lambda t: t.values[0]) if several else None, target_name=names[0]), path,
                f"Parameter importances of {data.name} for {names[0]}"),
                f"Parameter importances of {data.name} for {names[0]} (fANOVA): the settings that "
                f"matter most are at the top."))
        except Exception as err:  # too few distinct values for the evaluator: a note, not a crash
            skipped.append(f"{data.name}: parameter importances failed ({type(err).__name__}: {err})")
    if several and len(study.directions) <= 3:
        path = out / f"{prefix}_pareto_front.png"
        finish = _label_trials(study, complete) if len(study.directions) == 2 else None
        made.append((_optuna_figure(lambda: optuna_plots.plot_pareto_front(
            study, target_names=[with_unit(n) for n in names]), path,
            f"Pareto front of {data.name} (Optuna's objectives)", finish),
                     f"Pareto front of {data.name} in Optuna's objectives: red points are trials no "
                     f"other trial beats on every objective; grey ones break a constraint."))
        values = [t.values for t in complete]
        reference = []
        for j, direction in enumerate(study.directions):
            column = [v[j] for v in values]
            span = (max(column) - min(column)) or abs(max(column)) or 1.0
            reference.append(min(column) - 0.1 * span if maximizes(direction)
                             else max(column) + 0.1 * span)
        path = out / f"{prefix}_hypervolume.png"
        made.append((_optuna_figure(lambda: optuna_plots.plot_hypervolume_history(study, reference), path,
                                    f"Hypervolume history of {data.name}"),
                     f"Hypervolume history of {data.name} (reference point {[round(r, 4) for r in reference]}): "
                     f"it rises while the search still finds better trade-offs."))
    return made, skipped


def plot_batch_curves(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Throughput against batch size per variant (log x), with 95% intervals: ``fvlab profile --batch-sizes``."""
    by_curve: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get(THROUGHPUT) is not None and row.get("batch_size"):
            by_curve.setdefault((str(row["name"]), str(row.get("backend", "eager"))), []).append(row)
    curves = {key: sorted(points, key=lambda r: r["batch_size"]) for key, points in by_curve.items()
              if len({r["batch_size"] for r in points}) > 1}
    if not curves:
        return None
    several_backends = len({backend for _, backend in curves}) > 1
    with plt.style.context("default"):
        fig, ax = _new_figure()
        colours = _colours([name for name, _ in curves])
        for (name, backend), points in curves.items():
            xs = [r["batch_size"] for r in points]
            ys = [r[THROUGHPUT] for r in points]
            lo = [r.get(THROUGHPUT_LO) if r.get(THROUGHPUT_LO) is not None else y
                  for r, y in zip(points, ys)]
            hi = [r.get(THROUGHPUT_HI) if r.get(THROUGHPUT_HI) is not None else y
                  for r, y in zip(points, ys)]
            ax.errorbar(xs, ys, yerr=[[max(y - a, 0.0) for y, a in zip(ys, lo)],
                                      [max(b - y, 0.0) for y, b in zip(ys, hi)]],
                        marker="o", capsize=3, color=colours[name],
                        linestyle="--" if several_backends and backend != "eager" else "-",
                        label=f"{name} ({backend})" if several_backends else name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (log scale)", fontsize=11)
        ax.set_ylabel(f"{THROUGHPUT}: images/s (median, 95% interval)", fontsize=11)
        ax.set_title(title or "Throughput against batch size, measured side by side", fontsize=12)
        ax.legend(fontsize=9, loc="best")
        return _save(fig, path)
