"""The result of a sweep as tables and configs: the best trial (one objective) or the Pareto front
(several), feasible only.

Written as ``runs/<study>/pareto.md`` and ``pareto.csv`` with the decoded parameters, and
each front configuration as ``runs/<study>/best/trial_NNNN.yaml``, which ``fvlab fit`` trains
as it is (into ``runs/<study>_best/trial_NNNN/``, so the trial's own run is kept). Also the
config a trial trained with (``trial_config``, which ``confirm`` re-trains) and the front measured
again beside the reference after the search (``measure_together``). The front itself is
fvlab.pareto's rule; ``confirm`` builds on this module, never the other way round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from fvlab.lit.build import apply_overrides
from fvlab.metrics import (GFLOPS, LATENCY_MS, PARAMS_M, SPEEDUP, TEST_ACC1, TEST_MIOU, THROUGHPUT, THROUGHPUT_HI,
                           THROUGHPUT_LO, TRIAL_ATTRS, VAL_MIOU_BEST)
from fvlab.pareto import pareto_optimal
from fvlab.runs import (PARETO_CSV, PARETO_MD, best_config_path, best_dir, best_study_name, read_config,
                        stale_best_configs, trained_config, trial_dir_name)
from fvlab.sweep.attrs import DUPLICATE_OF, REFERENCE, RUN_NAME, THREADS, TOGETHER_ATTR
from fvlab.sweep.space import SweepSpec, encode_choice
from fvlab.tables import csv_text, interval, markdown_table

__all__ = ["front_trials", "front_rows", "format_front", "write_front", "trial_config", "export_configs",
           "measure_together", "together_columns", "SCALE_NOTE"]

SPEED_OBJECTIVES = {THROUGHPUT: "throughput", LATENCY_MS: "latency_ms", SPEEDUP: "speedup"}
SCALE_NOTE = ("model/throughput is on the study's one scale: the trial's side-by-side speedup to the reference "
              "times the reference's throughput stored in the study when it was first measured (the trial's own "
              "moment read model/throughput_measured). 'together' columns: the front and the reference measured "
              "again side by side in one measurement after the search, and the front recomputed on them.")


# The base experiment's network among the networks measured together (its row in the front's table).
REFERENCE_TARGET = "reference"


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial, or the feasible Pareto front, ordered by trial number."""
    # A duplicate (user_attr duplicate_of) holds its original's values: the original stands for it.
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get(DUPLICATE_OF) is None]
    if not complete:
        return []
    if len(study.directions) == 1:
        try:
            best = study.best_trial
        except ValueError:  # no feasible complete trial
            return []
        original = best.user_attrs.get(DUPLICATE_OF)
        return [next((t for t in complete if t.number == original), best) if original is not None else best]
    # Not Optuna's best_trials: it compares exactly, and the objectives went through float32.
    feasible = [t for t in complete if all(c <= 0.0 for c in t.constraints.values())]
    flags = pareto_optimal([t.values for t in feasible], study.directions)
    return sorted((t for t, optimal in zip(feasible, flags) if optimal), key=lambda t: t.number)


def front_rows(trials: list[FrozenTrial], sweep: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial: its number and run, the objectives, the decoded parameters, the model figures."""
    rows = []
    for trial in trials:
        row: dict[str, Any] = {"trial": trial.number, "run": trial.user_attrs.get(RUN_NAME, "")}
        if trial.user_attrs.get(REFERENCE):
            row["run"] = f"{row['run']} (reference)"  # the base experiment's own settings
        row.update(zip(sweep.objectives, trial.values))
        test = TEST_MIOU if VAL_MIOU_BEST in sweep.objectives else TEST_ACC1  # a segmentation sweep's: test/miou
        row[test] = trial.user_attrs.get(TRIAL_ATTRS[test])  # measured once, never selected on
        row.update({key: sweep.space[key].decode(value) if key in sweep.space else value
                    for key, value in trial.params.items()})
        for metric in (PARAMS_M, GFLOPS, THROUGHPUT, SPEEDUP):
            attr = TRIAL_ATTRS[metric]
            if metric not in sweep.objectives and trial.user_attrs.get(attr) is not None:
                row[metric] = trial.user_attrs[attr]
        lo, hi = trial.user_attrs.get(TRIAL_ATTRS[THROUGHPUT_LO]), trial.user_attrs.get(TRIAL_ATTRS[THROUGHPUT_HI])
        if lo is not None and hi is not None:  # the side-by-side measurement's 95% interval
            row[f"{THROUGHPUT} [95%]"] = interval(lo, hi, "{:.0f}")
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):  # as the sweep file and the list choices write it
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return str(encode_choice(value))
    return str(value)


def format_front(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows (a column per key of any row)."""
    if not rows:
        return "(no feasible complete trial yet)"
    header = list(dict.fromkeys(k for row in rows for k in row))
    return markdown_table(header, [[_cell(row.get(k, "")) for k in header] for row in rows])


def write_front(study_dir: Path, rows: list[dict[str, Any]], title: str, notes: str = "") -> None:
    """``pareto.md`` (with ``notes`` below the table) and ``pareto.csv`` in the study directory."""
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / PARETO_MD).write_text(f"# {title}\n\n{format_front(rows)}\n" + (f"\n{notes}\n" if notes else ""))
    header = list(dict.fromkeys(k for row in rows for k in row))
    # List choices as the sweep file encodes them; numbers unrounded.
    encoded = [{k: _cell(v) if isinstance(v, (list, tuple)) else v for k, v in row.items()} for row in rows]
    (study_dir / PARETO_CSV).write_text(csv_text(encoded, header))


def trial_config(trial: FrozenTrial, sweep: SweepSpec, base_config: Mapping[str, Any],
                 study_dir: Path) -> dict[str, Any]:
    """The config a trial trained with: its run's config.yaml, else the base with its parameters."""
    run_name = trial.user_attrs.get(RUN_NAME) or trial_dir_name(trial.number)
    config = trained_config(Path(study_dir) / run_name)  # without the run's labels: confirm runs get their own
    if config is not None:
        return config
    return apply_overrides(base_config, {**sweep.overrides, **sweep.decode(trial.params)})


def export_configs(study_dir: Path, trials: list[FrozenTrial], sweep: SweepSpec,
                   base_config: Mapping[str, Any]) -> list[Path]:
    """``best/trial_NNNN.yaml`` per front trial: the trial's resolved config, runnable with ``fvlab fit``."""
    best_dir(study_dir).mkdir(parents=True, exist_ok=True)
    wanted = set()
    paths = []
    for trial in trials:
        run_name = trial.user_attrs.get(RUN_NAME) or trial_dir_name(trial.number)
        config = read_config(study_dir / run_name)
        if config is None:  # trained on another machine: rebuild it from the base and the trial's parameters
            config = apply_overrides(base_config, {**sweep.overrides, **sweep.decode(trial.params)})
        config = {**config, "name": best_study_name(sweep.study), "variant": run_name}
        scores = ", ".join(f"{m}={v:.4g}" for m, v in zip(sweep.objectives, trial.values))
        path = best_config_path(study_dir, run_name)
        path.write_text(f"# fvlab sweep {sweep.study}, trial {trial.number}: {scores}\n"
                        f"# Train it: fvlab fit {path} (e.g. --trainer.max_epochs 300)\n"
                        + yaml.safe_dump(config, sort_keys=False))
        wanted.add(path.name)
        paths.append(path)
    for old in stale_best_configs(study_dir, keep=wanted):  # left the front since the last export
        old.unlink()
    return paths


def measure_together(study: optuna.Study, members: list[FrozenTrial], sweep: SweepSpec,
                     base_config: Mapping[str, Any], study_dir: Path) -> dict[str, dict[str, Any]]:
    """The members' architectures and the reference's, measured side by side in one measurement
    (each distinct architecture once); stored in the study, and reused while the members are the same."""
    import torch

    from fvlab.lit.build import build_run
    from fvlab.lit.fit import release_memory
    from fvlab.lit.measure import Target, identity_key, measure_specs
    from fvlab.sweep.canonical import network_identity

    numbers = sorted(t.number for t in members)
    stored = study.user_attrs.get(TOGETHER_ATTR) or {}
    if stored.get("members") == numbers:
        return stored["figures"]
    targets: dict[str, Target] = {}
    counts: dict[str, dict[str, Any]] = {}
    name_of: dict[int, str] = {}
    threads = torch.get_num_threads()
    if study.user_attrs.get(THREADS):  # the thread count every trial was measured with
        torch.set_num_threads(int(study.user_attrs[THREADS]))
    try:
        reference = build_run(apply_overrides(base_config, sweep.overrides), None, {"trainer.logger": False})
        name_of_identity = {identity_key(network_identity(reference)): REFERENCE_TARGET}
        targets[REFERENCE_TARGET] = Target.of(reference)
        del reference
        for trial in sorted(members, key=lambda t: t.number):
            spec = build_run(trial_config(trial, sweep, base_config, study_dir), None, {"trainer.logger": False})
            key = identity_key(network_identity(spec))
            if key not in name_of_identity:
                name_of_identity[key] = trial_dir_name(trial.number)
                targets[name_of_identity[key]] = Target.of(spec)
                counts[name_of_identity[key]] = {GFLOPS: trial.user_attrs.get(TRIAL_ATTRS[GFLOPS])}
            name_of[trial.number] = name_of_identity[key]
            del spec
        measured = measure_specs(targets, reference=REFERENCE_TARGET, counts=counts)
    finally:
        torch.set_num_threads(threads)
        targets.clear()
        release_memory()
    figures = {}
    for number, name in name_of.items():
        detail = measured[name].get("throughput") or {}
        if detail:
            figures[str(number)] = {"throughput": detail["images_per_s"], "throughput_lo": detail["images_per_s_lo"],
                                    "throughput_hi": detail["images_per_s_hi"], "latency_ms": detail["latency_ms"],
                                    "speedup": detail["speedup"], "speedup_lo": detail["speedup_lo"],
                                    "speedup_hi": detail["speedup_hi"]}
    study.set_user_attr(TOGETHER_ATTR, {"members": numbers, "figures": figures})
    return figures


def together_columns(rows: list[dict[str, Any]], trials: list[FrozenTrial], together: Mapping[str, Any],
                     sweep: SweepSpec) -> None:
    """Add the figures measured together beside the search-time ones, and the front recomputed on them."""
    points = []
    for row, trial in zip(rows, trials, strict=True):
        figures = together.get(str(trial.number))
        if figures is None:
            points.append(None)
            continue
        row[f"{THROUGHPUT} (together)"] = figures["throughput"]
        row["together [95%]"] = interval(figures["throughput_lo"], figures["throughput_hi"], "{:.0f}")
        row[f"{SPEEDUP} (together)"] = figures["speedup"]
        points.append([figures[SPEED_OBJECTIVES[m]] if m in SPEED_OBJECTIVES else v
                       for m, v in zip(sweep.objectives, trial.values)])
    for row, optimal in zip(rows, pareto_optimal(points, sweep.directions)):
        row["front (together)"] = "yes" if optimal else "no"
