"""Seed statistics of an ablation as tables: mean ± std per variant and paired differences to a reference.

Pure functions over metrics.json contents (dicts), so they are tested without a Trainer; the
statistics themselves (paired-t difference, Holm, mean ± std) are :mod:`fvlab.stats`'s:

- ``aggregate`` groups runs by variant: mean and sample standard deviation (ddof=1) over the
  completed seeds, the seeds that failed or are missing, the architecture's figures, and each
  variant's ``paired_difference`` to the reference variant, paired by seed;
- ``holm_marks`` decides which differences of a table are significant: Holm's step-down over every
  comparison of the table that can carry a ``*`` (all rows, all marked columns), so the chance of
  any false ``*`` in the table stays at 5%. The interval printed is the unadjusted one, so an
  interval can exclude zero without a ``*``. A comparison can carry a mark with at least
  ``MIN_MARKED_PAIRS`` pairs whose differences vary: differences equal up to rounding have no
  p-value (``n/a``);
- Δ pairs only the seeds both variants completed; when that is fewer seeds than a mean it is
  compared with, its cell says ``(n=2 pairs)``. One sample prints ``n/a`` for its spread;
- ``format_summary`` / ``write_summary`` make the comparison table of ``fvlab fit``
  (stdout, summary.md, summary.csv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fvlab.metrics import (CLASSIFICATION, GFLOPS, LATENCY_MS, MODEL_EXTRA_METRICS, MODEL_METRICS, PARAMS_M,
                           PRIMARY_METRIC, SEGMENTATION, SPEEDUP, TEST_METRICS, TEST_PRIMARY_METRIC, THROUGHPUT,
                           VAL_ACC1, VAL_ACC5, VAL_LOSS, VAL_MIOU, VAL_MIOU_BEST, VAL_PIXEL_ACC, TaskMetrics,
                           task_metrics)
from fvlab.runs import SUMMARY_CSV, SUMMARY_MD
from fvlab.stats import (CONFIDENCE, MIN_MARKED_PAIRS, SIGNIFICANT_MARK, PairedDifference, family_size, holm,
                         marks_rule, mean_std, paired_difference)
from fvlab.tables import csv_text, interval_cell, markdown_table

__all__ = ["SEED_METRICS", "MODEL_METRICS", "PRIMARY_METRIC", "TEST_PRIMARY_METRIC", "VariantStats", "holm_marks",
           "aggregate", "format_summary", "summary_csv_rows", "write_summary", "seed_label",
           "test_notes", "MODEL_COLUMNS", "model_cell"]

# Per-seed figures: mean ± std over the completed seeds.
SEED_METRICS = (PRIMARY_METRIC, VAL_ACC1, VAL_LOSS, *TEST_METRICS, VAL_MIOU_BEST, VAL_MIOU, VAL_PIXEL_ACC)
# The architecture's columns of every table; throughput carries its 95% interval in its cell.
MODEL_COLUMNS = (*MODEL_METRICS, SPEEDUP)
MODEL_TITLES = {PARAMS_M: ("params (M)", "{:.3f}"), GFLOPS: ("GFLOPs", "{:.4f}"),
                THROUGHPUT: ("throughput (img/s) [95%]", "{:.0f}"),
                LATENCY_MS: ("latency (ms)", "{:.2f}"), SPEEDUP: ("speedup", "{:.3f}")}
# Statuses of a run that has not produced final figures yet, or never will.
RUNNING, NOT_RUN = "running", "not run"


def holm_marks(variants: Sequence["VariantStats"]) -> list[bool]:
    """Per row of a table: whether its Δ gets the mark (Holm over the rows that can carry one)."""
    differences = [None if v.is_reference else v.difference for v in variants]
    alpha = 1 - next((d.confidence for d in differences if d is not None), CONFIDENCE)
    return holm([d.p_value if d is not None and d.can_mark else None for d in differences], alpha)


def seed_label(seed: Any) -> str:
    """``seed 3``, or ``(no seed)`` for runs that did not record one."""
    return "(no seed)" if seed is None else f"seed {seed}"


@dataclass
class VariantStats:
    """One variant over its seeds: statistics of the completed runs and what is missing."""

    variant: str
    experiment: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)
    expected_seeds: list[Any] = field(default_factory=list)
    mean: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)  # seeds behind each mean
    model: dict[str, float | None] = field(default_factory=dict)
    precision: str | None = None
    epochs: float | None = None
    wall_s: float | None = None
    difference: PairedDifference | None = None
    is_reference: bool = False
    task: TaskMetrics = CLASSIFICATION  # what Δ is taken on and the columns shown

    @property
    def complete(self) -> list[dict[str, Any]]:
        """Runs whose status is complete."""
        return [r for r in self.runs if r.get("status") == "complete"]

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Runs that ended without final figures: failed, pruned, interrupted."""
        return [r for r in self.runs if r.get("status") not in ("complete", RUNNING, NOT_RUN, None)]

    @property
    def running(self) -> list[dict[str, Any]]:
        """Runs still in progress (latest figures only)."""
        return [r for r in self.runs if r.get("status") == RUNNING]

    @property
    def missing_seeds(self) -> list[Any]:
        """Expected seeds without any run, or listed as not run."""
        have = {r.get("seed") for r in self.runs if r.get("status") != NOT_RUN}
        return [s for s in self.expected_seeds if s not in have]

    @property
    def n(self) -> int:
        """Completed seeds, the ones the statistics use."""
        return len(self.complete)

    @property
    def status(self) -> str:
        """complete when any seed completed, else running, failed or not run."""
        if self.complete:
            return "complete"
        if self.running:
            return RUNNING
        if self.failed:
            return str(self.failed[0].get("status"))
        return NOT_RUN

    def seeds_cell(self) -> str:
        """``2/3 (1 failed)``: completed seeds out of the expected ones and why the rest are out."""
        total = len(set(self.expected_seeds) | {r.get("seed") for r in self.runs})
        why = [f"{len(self.failed)} failed"] if self.failed else []
        why += [f"{len(self.running)} running"] if self.running else []
        why += [f"{len(self.missing_seeds)} missing"] if self.missing_seeds else []
        return f"{self.n}/{total}" + (f" ({', '.join(why)})" if why else "")


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def aggregate(results: Iterable[Mapping[str, Any]], *, reference: str | None = None,
              variant_order: Sequence[str] | None = None, seeds: Sequence[Any] | None = None,
              experiment: str = "") -> list[VariantStats]:
    """Group metrics.json dicts by variant; mean ± sample std over completed seeds; paired Δ."""
    groups: dict[str, VariantStats] = {}
    for name in variant_order or ():
        groups[name] = VariantStats(name, experiment)
    all_seeds = list(seeds or [])
    for result in results:
        name = str(result.get("variant") or "default")
        stats = groups.setdefault(name, VariantStats(name, experiment or str(result.get("experiment") or "")))
        stats.runs.append(dict(result))
        if result.get("status") != NOT_RUN or result.get("seed") is not None:
            if result.get("seed") not in all_seeds:
                all_seeds.append(result.get("seed"))
    for stats in groups.values():
        if not stats.experiment:
            stats.experiment = next((str(r["experiment"]) for r in stats.runs if r.get("experiment")), "")
        # Seeds the others ran count as missing here; unseeded runs (None) expect nothing more.
        stats.expected_seeds = [s for s in all_seeds if s is not None] or \
            sorted({r.get("seed") for r in stats.runs}, key=str)
        # A variant with no finished seed shows its running seeds' latest figures (marked running).
        complete = stats.complete or stats.running
        for key in SEED_METRICS:
            values = [v for v in (_number(r.get(key)) for r in complete) if v is not None]
            stats.mean[key], stats.std[key] = mean_std(values)
            stats.count[key] = len(values)
        # The architecture's figures do not depend on the seed (measured once per variant).
        measured = complete or stats.runs
        for key in (*MODEL_METRICS, *MODEL_EXTRA_METRICS):
            stats.model[key] = mean_std([v for v in (_number(r.get(key)) for r in measured)
                                          if v is not None])[0]
        precisions = sorted({str(r["precision"]) for r in measured if r.get("precision")})
        stats.precision = "/".join(precisions) or None
        stats.epochs = mean_std([v for v in (_number(r.get("epochs")) for r in measured) if v is not None])[0]
        stats.wall_s = mean_std([v for v in (_number(r.get("wall_s")) for r in measured) if v is not None])[0]
    if not groups:
        return []
    reference = reference if reference in groups else next(iter(groups))
    task = task_metrics(r for s in groups.values() for r in s.runs)
    by_seed = {name: {r.get("seed"): _number(r.get(task.primary)) for r in s.complete}
               for name, s in groups.items()}
    for name, stats in groups.items():
        stats.task = task
        stats.is_reference = name == reference
        if not stats.is_reference:
            stats.difference = paired_difference(by_seed[name], by_seed[reference], reference)
    return list(groups.values())


# ---- formatting ------------------------------------------------------------------------


def model_cell(model: Mapping[str, Any], key: str) -> str:
    """One architecture figure; throughput as ``1183 [1150, 1204]`` (median and 95% interval over rounds)."""
    lo, hi = _number(model.get(f"{key}_lo")), _number(model.get(f"{key}_hi"))
    return interval_cell(_number(model.get(key)), lo, hi, MODEL_TITLES[key][1])


def mean_std_cell(stats: VariantStats, key: str, fmt: str = "{:.4f}") -> str:
    """``0.9667 ± 0.0083``; ``0.9667 ± n/a`` with one seed; ``-`` with none."""
    mean, std = stats.mean.get(key), stats.std.get(key)
    if mean is None:
        return "-"
    return fmt.format(mean) + " ± " + ("n/a" if std is None else fmt.format(std))


def pairs_note(stats: VariantStats, reference: VariantStats | None = None) -> str:
    """`` (n=2 pairs)`` when Δ pairs fewer or other seeds than the means it is shown with, else empty."""
    d = stats.difference
    if stats.is_reference or d is None or d.mean is None:
        return ""
    behind = {stats.count.get(stats.task.primary, stats.n)}
    if reference is not None:
        behind.add(reference.count.get(stats.task.primary, reference.n))
    return "" if behind == {d.n} else f" (n={d.n} pair{'s' if d.n != 1 else ''})"


def difference_cell(stats: VariantStats, significant: bool = False, reference: VariantStats | None = None) -> str:
    """``+0.0083 [-0.0120, +0.0287]``, the mark when ``significant`` (see ``holm_marks``), and the
    pair count when it differs from the seeds behind the variant's or the ``reference``'s mean."""
    if stats.is_reference:
        return "reference"
    d = stats.difference
    if d is None or d.mean is None:
        return "-"
    pairs = pairs_note(stats, reference)
    if d.low is None:
        return f"{d.mean:+.4f} [n/a]{pairs}"
    mark = f" {SIGNIFICANT_MARK}" if significant else ""
    return f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{mark}{pairs}"


def explanation(reference: str | None = None, confidence: float = CONFIDENCE, family: int = 0,
                task: TaskMetrics = CLASSIFICATION) -> str:
    """The line saying what ±, Δ (on ``task``'s primary metric), its interval, the pair count and the
    mark (Holm over ``family``) mean."""
    to = f"the reference variant {reference!r}" if reference else "its experiment's reference variant"
    return (f"± is the sample standard deviation (n-1) over the completed seeds (n/a with one seed). "
            f"Δ is the mean per-seed difference of {task.primary} to {to}, paired by seed, with its "
            f"unadjusted {confidence:.0%} paired-t confidence interval; (n=2 pairs): Δ pairs only the "
            f"seeds both completed, fewer than the variant's or the reference's mean uses. "
            f"{marks_rule(family, confidence)} "
            f"{task.test} is the best checkpoint measured once on the held-out test split, "
            f"which selects nothing.")


def test_notes(variants: Sequence[VariantStats], prefix: str = "") -> list[str]:
    """Why a variant's test figures are missing (no test split, a failed test): one line per variant."""
    notes = []
    for v in variants:
        reasons = list(dict.fromkeys(str(r["test_note"]) for r in v.complete if r.get("test_note")))
        if reasons:
            notes.append(f"{v.task.test} of {prefix}{v.variant}: {'; '.join(reasons)} (shown as -, "
                         f"never replaced by the validation figure)")
    return notes


def difference_notes(variants: Sequence[VariantStats], prefix: str = "") -> list[str]:
    """Why a Δ has no interval (too few pairs, no spread) or no mark (fewer than three pairs)."""
    def names(rule: Any) -> list[str]:
        return [prefix + v.variant for v in variants
                if not v.is_reference and v.difference is not None and v.difference.mean is not None
                and rule(v.difference)]

    notes = []
    if lone := names(lambda d: d.n < 2):
        notes.append(f"n/a: fewer than two seeds completed in both {', '.join(lone)} and the "
                     f"reference, so no interval; list several seeds (seeds: [0, 1, 2]) for one.")
    if equal := names(lambda d: d.equal):
        notes.append(f"n/a: every per-seed difference of {', '.join(equal)} to the reference is the same, "
                     f"so there is no spread to test: no interval, no p-value, no mark.")
    if few := names(lambda d: d.n == 2 and not d.equal):
        notes.append(f"no mark possible: {', '.join(few)} pair{'s' if len(few) == 1 else ''} 2 seeds with the "
                     f"reference; a mark needs at least {MIN_MARKED_PAIRS}.")
    return notes


def summary_notes(variants: Sequence[VariantStats], explain: bool = True, prefix: str = "") -> list[str]:
    """The lines under the table: what ± and the mark mean, test figures, seeds failed or missing."""
    if not variants:
        return []
    reference = next((v.variant for v in variants if v.is_reference), variants[0].variant)
    confidence = next((v.difference.confidence for v in variants if v.difference), CONFIDENCE)
    family = family_size(None if v.is_reference else v.difference for v in variants)
    notes = [explanation(reference, confidence, family, variants[0].task)] if explain else []
    notes += test_notes(variants, prefix)
    notes += difference_notes(variants, prefix)
    for v in variants:
        for run in v.failed:
            notes.append(f"{run.get('status')}: {prefix}{v.variant} "
                         f"{seed_label(run.get('seed'))}: {run.get('error') or 'no reason recorded'}"
                         f" (left out of the statistics)")
        for run in v.running:
            shown = " (its latest figures are shown)" if not v.complete else " (left out of the statistics)"
            notes.append(f"running: {prefix}{v.variant} {seed_label(run.get('seed'))}{shown}")
        for seed in v.missing_seeds:
            notes.append(f"missing: {prefix}{v.variant} {seed_label(seed)} (not run yet)")
    return notes


def _summary_header(reference: str, task: TaskMetrics = CLASSIFICATION) -> list[str]:
    return ["variant", "seeds", task.primary, f"Δ vs {reference} [95% CI]", task.test, *task.columns,
            *(MODEL_TITLES[k][0] for k in MODEL_COLUMNS), "precision"]


def format_summary(variants: Sequence[VariantStats], note_sep: str = "\n") -> str:
    """The comparison table of ``fvlab fit`` with its note lines."""
    if not variants:
        return "(no runs)"
    reference = next((v.variant for v in variants if v.is_reference), variants[0].variant)
    ref = next((v for v in variants if v.is_reference), None)
    task = variants[0].task
    rows = [[v.variant, v.seeds_cell(), mean_std_cell(v, task.primary), difference_cell(v, mark, ref),
             mean_std_cell(v, task.test), *(mean_std_cell(v, k) for k in task.columns),
             *(model_cell(v.model, k) for k in MODEL_COLUMNS), v.precision or "-"]
            for v, mark in zip(variants, holm_marks(variants))]
    return markdown_table(_summary_header(reference, task), rows) + "\n\n" + note_sep.join(summary_notes(variants))


# ---- summary.csv -----------------------------------------------------------------------

CSV_FIELDS = ["kind", "experiment", "variant", "seed", "status", "n_complete", "n_failed", "n_missing",
              *(f for k in SEED_METRICS for f in (k, f"{k}_std")), VAL_ACC5, "test_note",
              "reference", "delta_metric", f"delta/{PRIMARY_METRIC}", f"delta/{SEGMENTATION.primary}", "delta_ci_low", "delta_ci_high", "delta_n_pairs",
              "delta_excludes_zero", "delta_p_value", "delta_significant", *MODEL_METRICS, *MODEL_EXTRA_METRICS,
              "precision", "epochs", "wall_s", "error"]


def summary_csv_rows(variants: Sequence[VariantStats]) -> list[dict[str, Any]]:
    """One ``run`` row per variant and seed, then one ``mean`` row per variant (std in ``*_std``)."""
    rows: list[dict[str, Any]] = []
    reference = next((v.variant for v in variants if v.is_reference), "")
    for v in variants:
        for run in v.runs:
            row = {k: run.get(k) for k in CSV_FIELDS if k in run}
            row.update(kind="run", experiment=run.get("experiment") or v.experiment, variant=v.variant,
                       seed=run.get("seed"), status=run.get("status"), reference=reference)
            rows.append(row)
    for v, mark in zip(variants, holm_marks(variants)):
        d = v.difference
        row = {"kind": "mean", "experiment": v.experiment, "variant": v.variant, "status": v.status,
               "n_complete": v.n, "n_failed": len(v.failed),
               "n_missing": len(v.missing_seeds) + len(v.running), "reference": reference,
               "precision": v.precision, "epochs": v.epochs, "wall_s": v.wall_s, **v.model}
        for key in SEED_METRICS:
            row[key], row[f"{key}_std"] = v.mean.get(key), v.std.get(key)
        if d is not None:
            row.update({"delta_metric": v.task.primary, f"delta/{v.task.primary}": d.mean, "delta_ci_low": d.low, "delta_ci_high": d.high,
                        "delta_n_pairs": d.n, "delta_excludes_zero": d.excludes_zero if d.low is not None else None,
                        "delta_p_value": d.p_value, "delta_significant": mark if d.can_mark else None})
        rows.append(row)
    return rows


def write_summary(directory: Path, results: Sequence[Mapping[str, Any]], *, title: str = "",
                  reference: str | None = None, variant_order: Sequence[str] | None = None,
                  seeds: Sequence[Any] | None = None) -> str:
    """Write summary.md and summary.csv into ``directory``; returns the table and notes for stdout."""
    variants = aggregate(results, reference=reference, variant_order=variant_order, seeds=seeds)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Markdown joins consecutive lines into one paragraph: one note per paragraph there.
    (directory / SUMMARY_MD).write_text((f"# {title}\n\n" if title else "")
                                          + format_summary(variants, note_sep="\n\n") + "\n")
    (directory / SUMMARY_CSV).write_text(csv_text(summary_csv_rows(variants), CSV_FIELDS))
    return format_summary(variants)
