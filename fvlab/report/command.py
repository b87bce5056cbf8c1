"""``fvlab report DIR... [--out DIR] [--storage URL --study-name NAME]``: report.md, report.csv, PNGs.

DIR may be a run directory, an experiment directory (``runs/<experiment>``, variants and seeds
below it), a study directory (``runs/<study>`` with ``study.journal`` and ``trial_NNNN/``) or a
directory holding several of these (``runs``). Experiments end up in one combined variant table;
each study gets its own trial table. ``--out`` defaults to ``report/`` in the directory the DIRs
share (``DIR/report/`` for one DIR).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fvlab._argparse import EXIT_BAD_INPUT, EXIT_OK, ArgumentParser
from fvlab.metrics import (CLASSIFICATION, GFLOPS, MODEL_EXTRA_METRICS, SEGMENTATION, TEST_METRICS, THROUGHPUT,
                           THROUGHPUT_HI, THROUGHPUT_LO, VAL_ACC1, VAL_ACC1_BEST, VAL_LOSS, VAL_MIOU,
                           VAL_MIOU_BEST, VAL_PIXEL_ACC, is_model_metric)
from fvlab.report import collect
from fvlab.report.collect import ReportInputError, Run, StudyData, finite
from fvlab.report.stats import (MODEL_COLUMNS, MODEL_METRICS, MODEL_TITLES, RUNNING, VariantStats, aggregate,
                                difference_cell, explanation, holm_marks, mean_std_cell, model_cell, seed_label,
                                summary_notes)
from fvlab.runs import CONFIG_FILE, REPORT_CSV, REPORT_MD, confirm_seeds, is_confirm_run, variant_dir_of
from fvlab.stats import family_size
from fvlab.tables import csv_text, markdown_table

SEGMENTATION_NAMES = (VAL_MIOU, VAL_MIOU_BEST, VAL_PIXEL_ACC)

__all__ = ["Report", "build_report", "write_report", "report_command"]

EXPECTED = ("run directories (with metrics.json or fvlab's config.yaml: runs/<experiment>, "
            "runs/<experiment>/<variant>) or a study directory with study.journal (runs/<study>)")
PARETO_NOTE = ("Pareto: yes marks the rows that no other row beats on both val/acc1_best and "
               "throughput (complete runs and feasible trials only).")


@dataclass
class Report:
    """Everything read, grouped: experiments (variant statistics) and studies (trials)."""

    sources: list[str]
    experiments: dict[str, list[Run]] = field(default_factory=dict)
    variants: dict[str, list[VariantStats]] = field(default_factory=dict)
    studies: list[StudyData] = field(default_factory=list)
    profiles: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # `fvlab profile`'s profile.json

    def variant_rows(self) -> list[tuple[str, VariantStats]]:
        """(row label, statistics) over all experiments; ``exp/variant`` when there are several."""
        several = len(self.variants) > 1
        return [((f"{name}/" if several else "") + v.variant, v)
                for name, variants in self.variants.items() for v in variants]


# ---- reading ---------------------------------------------------------------------------


def _discover_all(dirs: Sequence[Path], skip: Path | None) -> tuple[dict[Path, Path], list[Path]]:
    """(resolved path -> run directory, study journals) found in ``dirs``; ReportInputError for a bad DIR."""
    run_paths: dict[Path, Path] = {}
    journals: list[Path] = []
    for directory in dirs:
        if not directory.exists():
            raise ReportInputError(f"{directory}: no such directory; expected {EXPECTED}")
        if not directory.is_dir():
            raise ReportInputError(f"{directory} is a file; give a directory: {EXPECTED}")
        found_runs, found_journals = collect.discover(directory, skip=skip)
        if not found_runs and not found_journals:
            raise ReportInputError(f"{directory} holds no run or study: expected {EXPECTED}")
        run_paths.update((p.resolve(), p) for p in found_runs)
        journals += [j for j in found_journals if j.resolve() not in {k.resolve() for k in journals}]
    return run_paths, journals


def _load_studies(journals: list[Path], storage: str | None,
                  study_name: str | None) -> list[tuple[Any, str, Path | None]]:
    """(study, source, study directory or None) of each study to report; ReportInputError if none is named so."""
    studies: list[tuple[Any, str, Path | None]] = []
    for journal in journals:
        for study, source in collect.load_journal_studies(journal):
            if storage is None and study_name is not None and study.study_name != study_name:
                continue
            studies.append((study, source, journal.parent))
    if storage is None and study_name is not None and not studies:
        raise ReportInputError(f"--study-name {study_name!r}: no such study in "
                               f"{', '.join(map(str, journals)) or 'the directories (no study.journal)'}; "
                               f"with another storage add --storage URL")
    if storage is not None:
        study, source = collect.load_storage_study(storage, study_name)
        # The journal of a DIR given again as --storage is one study, not two.
        if (Path(storage).resolve(), study.study_name) not in {(Path(src).resolve(), s.study_name)
                                                               for s, src, _ in studies}:
            studies.append((study, source, None))
    return studies


def _add_studies(report: Report, studies: list[tuple[Any, str, Path | None]], runs: dict[Path, Run]) -> set[Path]:
    """Read each study into ``report``; the runs that belong to a study (its trials and confirm runs)."""
    used: set[Path] = set()
    for study, source, study_dir in studies:
        data = collect.read_study(study, source, runs, study_dir)
        used |= {t.run.path.resolve() for t in data.trials if t.run is not None}
        if study_dir is not None:
            # The front re-trained over seeds: its own table (below), not an experiment's variants.
            used |= {r for r in runs if is_confirm_run(r, study_dir)}
            data.study_dir = Path(study_dir)
        report.studies.append(data)
    return used


def _add_variants(report: Report, name: str, members: list[Run]) -> None:
    """Experiment ``name``'s profiles and variant statistics into ``report``, in the experiment's order."""
    experiment_dirs = {variant_dir_of(r.path).parent for r in members}
    order, reference = [], None
    for experiment_dir in sorted(experiment_dirs):
        report.profiles.setdefault(name, []).extend(collect.read_profile(experiment_dir))
        hint, hint_reference = collect.variant_order_hint(experiment_dir)
        order += hint
        reference = reference or hint_reference
    present = {r.variant for r in members}
    # Without fit's summary.csv: training order (the first run's config.yaml was written first).
    rest = sorted(present - set(order), key=lambda v: min(_started(r) for r in members if r.variant == v))
    order = [v for v in dict.fromkeys(order) if v in present] + rest
    report.variants[name] = aggregate([r.metrics for r in members], reference=reference,
                                      variant_order=order, experiment=name)


def build_report(dirs: Sequence[Path], *, storage: str | None = None, study_name: str | None = None,
                 skip: Path | None = None) -> Report:
    """Read every run and study in ``dirs`` (and ``storage``); ReportInputError when there is nothing."""
    from fvlab.runtime import hide_password

    run_paths, journals = _discover_all(dirs, skip)
    runs = {resolved: collect.read_run(path) for resolved, path in run_paths.items()}
    studies = _load_studies(journals, storage, study_name)
    report = Report([str(d) for d in dirs] + ([hide_password(storage)] if storage else []))
    used = _add_studies(report, studies, runs)
    for resolved, run in runs.items():
        if resolved not in used:
            report.experiments.setdefault(run.experiment, []).append(run)
    for name, members in report.experiments.items():
        _add_variants(report, name, members)
    return report


def _started(run: Run) -> float:
    try:
        return (run.path / CONFIG_FILE).stat().st_mtime
    except OSError:
        return float("inf")


# ---- tables ----------------------------------------------------------------------------


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _differing(settings: Sequence[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for s in settings for k in s))
    return [k for k in keys if k != "name" and len({repr(s.get(k)) for s in settings}) > 1] + \
        (["name"] if len({repr(s.get("name")) for s in settings}) > 1 else [])


def _variant_arch(report: Report, experiment: str, variant: str) -> dict[str, Any]:
    return next((r.arch for r in report.experiments.get(experiment, []) if r.variant == variant and r.arch), {})


def _model_cells(metrics: dict[str, Any]) -> list[str]:
    return [model_cell(metrics, k) for k in MODEL_COLUMNS]


def variant_pareto(report: Report) -> list[bool]:
    """Pareto flags of the variant rows (mean accuracy against throughput, complete variants)."""
    from fvlab.pareto import pareto_optimal

    points = []
    for _, v in report.variant_rows():
        acc, speed = v.mean.get(v.task.primary), v.model.get(THROUGHPUT)
        points.append((speed, acc) if v.n and v.status == "complete" and acc is not None
                      and speed is not None else None)
    return pareto_optimal(points, ("maximize", "maximize"))


def tested_notes(report: Report) -> list[str]:
    """One line per run that ``fvlab test`` measured later (its test.json), beside the figures of training."""
    several = len(report.variants) > 1
    lines = []
    for name, runs in report.experiments.items():
        for run in sorted(runs, key=lambda r: (r.variant, str(r.metrics.get("seed")))):
            if not run.tested:
                continue
            metrics = run.tested.get("metrics") or {}
            figures = ", ".join(f"{k} {_value(metrics.get(k))}" for k in TEST_METRICS)
            checkpoint = Path(str(run.tested.get("checkpoint") or "?")).name
            lines.append(f"fvlab test: {name + '/' if several else ''}{run.variant} "
                         f"{seed_label(run.metrics.get('seed'))}: {figures} ({checkpoint}, "
                         f"{run.tested.get('split') or 'test'} split)")
    return lines


def variant_table(report: Report) -> tuple[str, list[str], list[dict[str, Any]]]:
    """The combined variant table, its notes and its CSV rows."""
    rows = report.variant_rows()
    arch = [_variant_arch(report, v.experiment, v.variant) for _, v in rows]
    columns = _differing(arch)
    several = len(report.variants) > 1
    reference = "reference" if several else next((v.variant for _, v in rows if v.is_reference), "")
    tasks = list(dict.fromkeys(v.task for _, v in rows)) or [CLASSIFICATION]
    # Experiments of both kinds in one report: each row shows its own task's figures.
    primary, test = (" or ".join(dict.fromkeys(getattr(t, key) for t in tasks)) for key in ("primary", "test"))
    header = ["variant", *columns, "seeds", primary, f"Δ vs {reference} [95% CI]", test,
              *(MODEL_TITLES[k][0] for k in MODEL_COLUMNS), "epochs", "wall (s)", "Pareto"]
    pareto = variant_pareto(report)
    # One family for Holm: every comparison this table prints, whichever experiment it belongs to.
    marks = holm_marks([v for _, v in rows])
    table, csv_rows = [], []
    for (label, v), settings, optimal, mark in zip(rows, arch, pareto, marks):
        label = label + (" (running)" if v.status == RUNNING else "")
        ref = next((u for u in report.variants[v.experiment] if u.is_reference), None)
        table.append([label, *(_value(settings.get(c)) for c in columns), v.seeds_cell(),
                      mean_std_cell(v, v.task.primary), difference_cell(v, mark, ref),
                      mean_std_cell(v, v.task.test), *_model_cells(v.model),
                      _value(None if v.epochs is None else round(v.epochs, 1)),
                      _value(None if v.wall_s is None else round(v.wall_s, 1)), "yes" if optimal else ""])
        d = v.difference
        csv_rows.append({"kind": "mean", "source": v.experiment, "variant": v.variant, "status": v.status,
                         "n_complete": v.n, "n_failed": len(v.failed), "n_running": len(v.running),
                         "n_missing": len(v.missing_seeds),
                         **{f"arch.{c}": settings.get(c) for c in columns},
                         **{k: v.mean.get(k) for k in (VAL_ACC1_BEST, VAL_ACC1, VAL_LOSS,
                                                       *TEST_METRICS, *SEGMENTATION.columns, VAL_MIOU_BEST)},
                         **{f"{k}_std": v.std.get(k) for k in (VAL_ACC1_BEST, VAL_ACC1, VAL_LOSS,
                                                               *TEST_METRICS, *SEGMENTATION.columns, VAL_MIOU_BEST)},
                         f"delta/{v.task.primary}": d.mean if d else None, "delta_ci_low": d.low if d else None,
                         "delta_ci_high": d.high if d else None, "delta_n_pairs": d.n if d else None,
                         "delta_p_value": d.p_value if d else None,
                         "delta_significant": mark if d is not None and d.can_mark else None,
                         "reference": ref.variant if ref is not None else "",
                         **v.model, "epochs": v.epochs, "wall_s": v.wall_s, "pareto": optimal})
        for run in v.runs:
            csv_rows.append({"kind": "run", "source": v.experiment, "variant": v.variant,
                             "seed": run.get("seed"), "status": run.get("status"),
                             **{f"arch.{c}": settings.get(c) for c in columns},
                             **{k: run.get(k) for k in (VAL_ACC1_BEST, VAL_ACC1, VAL_LOSS, *TEST_METRICS,
                                                          VAL_MIOU_BEST, VAL_MIOU, VAL_PIXEL_ACC,
                                                          *MODEL_METRICS, *MODEL_EXTRA_METRICS, "epochs",
                                                          "wall_s", "precision",
                                                          "test_note")},
                             "reason": run.get("error")})
    family = family_size(None if v.is_reference else v.difference for _, v in rows)
    notes = [explanation(None if several else reference, family=family, task=tasks[0])]
    for name, variants in report.variants.items():
        notes += summary_notes(variants, explain=False, prefix=f"{name}/" if several else "")
    notes += tested_notes(report)
    notes.append(PARETO_NOTE)
    return markdown_table(header, table), notes, csv_rows


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    return {k: (s if list(short.values()).count(s) == 1 else k) for k, s in short.items()}


def _study_task(data: StudyData) -> Any:
    """The task a study's trials are ranked by: segmentation when an objective or a trial says so."""
    from fvlab.metrics import task_metrics

    if any(name in SEGMENTATION_NAMES for name in data.objective_names):
        return SEGMENTATION
    return task_metrics(t.metrics for t in data.trials)


def trial_table(data: StudyData) -> tuple[str, list[str], list[dict[str, Any]], list[bool]]:
    """One study's trial table, its notes, CSV rows and Pareto flags."""
    from fvlab.pareto import pareto_optimal

    trials = data.trials
    task = _study_task(data)
    columns = _differing([t.params for t in trials]) or list(dict.fromkeys(k for t in trials for k in t.params))
    names = _short_names(columns)
    extra = [n for n in data.objective_names if n not in (task.primary, task.test, *MODEL_COLUMNS)
             and any(t.metrics.get(n) is not None for t in trials)]
    pareto = pareto_optimal([
        (finite(t.metrics.get(THROUGHPUT)), finite(t.metrics.get(task.primary)))
        if t.state == "complete" and t.duplicate_of is None and finite(t.metrics.get(THROUGHPUT)) is not None
        and finite(t.metrics.get(task.primary)) is not None else None for t in trials], ("maximize", "maximize"))
    together = _together(data)
    together_pareto = pareto_optimal([
        (together[str(t.number)]["throughput"], finite(t.metrics.get(task.primary)))
        if str(t.number) in together and finite(t.metrics.get(task.primary)) is not None else None
        for t in trials], ("maximize", "maximize"))
    header = ["trial", "state", *(names[c] for c in columns), task.primary, task.test, *extra,
              *(MODEL_TITLES[k][0] for k in MODEL_COLUMNS), "epochs", "wall (s)", "Pareto",
              *(["throughput (together)", "Pareto (together)"] if together else []), "reason"]
    table, csv_rows = [], []
    for t, optimal, optimal_together in zip(trials, pareto, together_pareto):
        both = together.get(str(t.number))
        together_cells = ([f"{both['throughput']:.1f}" if both else "", "yes" if optimal_together else ""]
                          if together else [])
        acc = finite(t.metrics.get(task.primary))
        table.append([f"#{t.number}", t.state, *(_value(t.params.get(c)) for c in columns),
                      "-" if acc is None else f"{acc:.4f}", _value(finite(t.metrics.get(task.test))),
                      *(_value(t.metrics.get(n)) for n in extra),
                      *_model_cells({k: finite(v) for k, v in t.metrics.items() if is_model_metric(k)}),
                      _value(t.metrics.get("epochs")), _value(finite(t.metrics.get("wall_s"))),
                      "yes" if optimal else "", *together_cells, t.reason[:80]])
        csv_rows.append({"kind": "trial", "source": data.name, "trial": t.number, "status": t.state,
                         **{f"param.{c}": t.params.get(c) for c in columns},
                         **{k: t.metrics.get(k) for k in (task.primary, task.test, *extra,
                                                          *MODEL_METRICS, *MODEL_EXTRA_METRICS, "epochs",
                                                          "wall_s")},
                         "pareto": optimal, "throughput_together": both["throughput"] if both else None,
                         "pareto_together": optimal_together if together else None, "reason": t.reason,
                         "run_dir": str(t.run.path) if t.run is not None else None})
    counts = {s: sum(t.state == s for t in trials) for s in dict.fromkeys(t.state for t in trials)}
    notes = [f"{data.name} ({data.source}): {len(trials)} trials, "
             + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; objectives: {', '.join(data.objective_names)}."]
    notes += [f"{t.state}: trial #{t.number}: {t.reason or 'no reason recorded'}" for t in trials
              if t.state in ("failed", "pruned", "infeasible")]
    notes.append(PARETO_NOTE)
    from fvlab.sweep.attrs import SCALE_ATTR
    from fvlab.sweep.front_tables import SCALE_NOTE

    if data.study is not None and data.study.user_attrs.get(SCALE_ATTR):
        notes.append(SCALE_NOTE)
    return markdown_table(header, table), notes, csv_rows, pareto


def _together(data: StudyData) -> dict[str, dict[str, Any]]:
    """The front and the reference measured side by side after the search (empty before that)."""
    from fvlab.sweep.attrs import TOGETHER_ATTR

    stored = data.study.user_attrs.get(TOGETHER_ATTR) if data.study is not None else None
    return dict((stored or {}).get("figures") or {})


# ---- writing ---------------------------------------------------------------------------


def _plot_data(report: Report) -> tuple[list[Any], list[Any]]:
    """The accuracy points (variants and trials) and validation curves every plot of the report draws from."""
    from fvlab.report.plots import Point, Series

    points, series = [], []
    for label, v in report.variant_rows():
        if v.mean.get(v.task.primary) is not None:  # val/miou_best for a segmentation experiment
            points.append(Point(label, v.experiment, v.mean[v.task.primary], v.std.get(v.task.primary),
                                v.model.get(THROUGHPUT), v.model.get(GFLOPS),
                                throughput_lo=v.model.get(THROUGHPUT_LO),
                                throughput_hi=v.model.get(THROUGHPUT_HI)))
        runs = [r for r in report.experiments.get(v.experiment, []) if r.variant == v.variant
                and r.metrics.get("status") in ("complete", RUNNING)]
        series.append(Series(label, v.experiment, [r.curve for r in runs if r.curve]))
    for data in report.studies:
        primary = _study_task(data).primary
        for t in data.trials:
            acc = finite(t.metrics.get(primary))
            if t.state in ("complete", "infeasible") and acc is not None:
                points.append(Point(f"#{t.number}", data.name, acc, None, finite(t.metrics.get(THROUGHPUT)),
                                    finite(t.metrics.get(GFLOPS)), feasible=t.state == "complete"))
            if t.run is not None and t.run.curve:
                series.append(Series(f"#{t.number}", data.name, [t.run.curve]))
    return points, series


def _plots(report: Report, out: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    from fvlab.report.plots import plot_accuracy_against, plot_batch_curves, plot_curves, plot_study

    points, series = _plot_data(report)
    made: list[tuple[Path, str]] = []
    skipped: list[str] = []
    tasks = {v.task for _, v in report.variant_rows()} | {_study_task(data) for data in report.studies}
    # mIoU and accuracy on one axis only when the report mixes the two kinds of run.
    label = ("val/miou_best: best validation mIoU (0-1)" if tasks == {SEGMENTATION} else
             "val/acc1_best or val/miou_best (0-1)" if SEGMENTATION in tasks else None)
    curve_label = {"ylabel": "val/miou: validation mIoU (0-1)"} if tasks == {SEGMENTATION} else {}
    against = {"ylabel": label} if label else {}
    has_seeds = any(p.accuracy_std for p in points)
    bars = " (error bars: ± std over seeds)" if has_seeds else ""
    path = plot_accuracy_against(points, "throughput", out / "accuracy_vs_throughput.png",
                                 "Accuracy against measured throughput", **against)
    if path:
        made.append((path, f"Accuracy against measured throughput{bars}: points on the dashed Pareto "
                           f"front are the best trade-offs; up and right is better."))
    path = plot_accuracy_against(points, "gflops", out / "accuracy_vs_gflops.png", "Accuracy against GFLOPs",
                                 **against)
    if path:
        made.append((path, f"Accuracy against GFLOPs{bars}: up and left is better; compare with the "
                           f"throughput plot to see where FLOPs do not predict speed."))
    if not points:
        skipped.append("accuracy plots: no complete run with val/acc1_best yet")
    for name, rows in report.profiles.items():
        suffix = "" if len(report.profiles) == 1 else f"_{name}"
        path = plot_batch_curves(rows, out / f"throughput_vs_batch{suffix}.png",
                                 f"{name}: throughput against batch size (fvlab profile --batch-sizes)")
        if path:
            made.append((path, f"{name}: images/s against batch size per variant, measured side by side "
                               f"(median and 95% interval over interleaved rounds): where the curves cross, "
                               f"the ranking depends on the batch size."))
    path = plot_curves(series, out / "val_acc1_per_epoch.png", "Validation accuracy per epoch", **curve_label)
    if path:
        made.append((path, "Validation top-1 accuracy per epoch" + (" (line: mean over seeds, band: ± std)"
                                                                   if any(len(s.curves) > 1 for s in series) else "")
                     + ": curves still rising at the end were stopped before converging."))
    for data in report.studies:
        prefix = "study" if len(report.studies) == 1 else f"study_{data.name}"
        study_made, study_skipped = plot_study(data, out, prefix)
        made += study_made
        skipped += study_skipped
    return made, skipped


def _confirmed(data: StudyData) -> str:
    """The confirm table of a study trained with ``confirm: {seeds}`` (empty without confirm runs)."""
    from fvlab.sweep.confirm import confirmed_table

    study_dir = getattr(data, "study_dir", None)
    seeds = confirm_seeds(study_dir) if study_dir is not None else []
    return confirmed_table(data.study, list(data.objective_names), seeds, study_dir) if seeds else ""


def write_report(report: Report, out: Path) -> str:
    """Write report.md, report.csv and the PNGs into ``out``; returns the text for stdout."""
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str, list[str]]] = []
    csv_rows: list[dict[str, Any]] = []
    if report.variants:
        table, notes, rows = variant_table(report)
        title = "Variants" + (f" of {next(iter(report.variants))}" if len(report.variants) == 1 else
                              f" of {', '.join(report.variants)}")
        sections.append((title, table, notes))
        csv_rows += rows
    for data in report.studies:
        table, notes, rows, _ = trial_table(data)
        sections.append((f"Trials of study {data.name}", table, notes))
        csv_rows += rows
        confirmed = _confirmed(data)
        if confirmed:
            sections.append((f"Front of study {data.name} confirmed over seeds", confirmed,
                             ["mean ± std (n-1) over the seeds listed, the trial's own run included; the front is "
                              "recomputed on the means, and members that left it say so."]))
    plots, skipped = _plots(report, out)
    md = ["# fvlab report", "", "Sources: " + ", ".join(f"`{s}`" for s in report.sources), ""]
    stdout = []
    for title, table, notes in sections:
        md += [f"## {title}", "", table, "", *(f"{n}\n" for n in notes)]
        stdout += [title, "", table, "", *notes, ""]
    if plots:
        md += ["## Plots", ""]
        for path, caption in plots:
            md += [f"![{caption}]({path.name})", "", f"*{caption}*", ""]
    md += [f"Not plotted: {s}\n" for s in skipped]
    (out / REPORT_MD).write_text("\n".join(md).rstrip() + "\n")
    fields = list(dict.fromkeys(["kind", "source", "variant", "seed", "trial", "status"]
                                + [k for row in csv_rows for k in row]))
    (out / REPORT_CSV).write_text(csv_text(csv_rows, fields))
    stdout.append(f"report: {out / REPORT_MD} (+ {REPORT_CSV}, {len(plots)} plots)")
    return "\n".join(stdout)


def report_command(argv: Sequence[str]) -> int:
    """``fvlab report``: tables and plots comparing runs, variants, seeds and trials."""
    parser = ArgumentParser(prog="fvlab report", description="report.md, report.csv and PNG plots "
                             "comparing runs, variants, seeds and the trials of Optuna studies")
    parser.add_argument("dirs", nargs="*", type=Path, metavar="DIR",
                        help="run, experiment or study directories (e.g. runs/ablate_carrier runs/hat_search)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md, report.csv and the PNGs go (default: report/ in the "
                             "directory the DIRs share, i.e. DIR/report for one DIR)")
    parser.add_argument("--storage", default=None, help="an Optuna storage URL (sqlite:///..., "
                        "postgresql://...) or a study.journal path")
    parser.add_argument("--study-name", default=None, help="the study to report from --storage "
                        "(or from the DIRs' journals)")
    args = parser.parse_args(argv)
    try:
        if not args.dirs and args.storage is None:
            raise ReportInputError(f"give one or more directories: {EXPECTED}; or --storage URL --study-name NAME")
        if args.out is None:
            if not args.dirs:
                raise ReportInputError("--out DIR is needed when the report reads only --storage")
            args.out = Path(os.path.commonpath([d.absolute() for d in args.dirs])) / "report"
            if len(args.dirs) == 1:
                args.out = args.dirs[0] / "report"
        if args.out.exists() and not args.out.is_dir():
            raise ReportInputError(f"--out {args.out} is a file; give a directory")
        report = build_report(args.dirs, storage=args.storage, study_name=args.study_name, skip=args.out)
    except ReportInputError as err:
        print(f"fvlab report: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(write_report(report, args.out))
    return EXIT_OK
