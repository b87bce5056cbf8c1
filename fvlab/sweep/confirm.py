"""``confirm: {seeds: [1, 2]}``: the front's configurations trained again with other seeds.

A front found with one seed per configuration is partly seed noise (on digits the seeds of one
configuration spread by 1-2 points, more than the effects searched). After the search, or with
``fvlab sweep SWEEP.yaml --confirm`` on a finished study, each front member is trained again
with every listed seed, in ``runs/<study>/confirm/trial_NNNN/seed_<s>/``, through the same fit
runs as ``fvlab fit`` (a complete run is skipped, a changed one refused, so a rerun resumes).
The trial's own run counts as one seed. Each member then gets mean ± std per objective, and
the front is recomputed on the means: members that leave it are marked.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
import yaml
from optuna.trial import FrozenTrial

from fvlab.experiment import apply_overrides
from fvlab.pareto import pareto_optimal
from fvlab.sweep.space import SweepSpec

__all__ = ["trial_config", "confirm_dir", "confirm_front", "confirm_seeds_on_disk", "confirmed_rows",
           "format_confirmed"]


def trial_config(trial: FrozenTrial, sweep: SweepSpec, base_config: Mapping[str, Any],
                 study_dir: Path) -> dict[str, Any]:
    """The config a trial trained with: its run's config.yaml, else the base with its parameters."""
    run_name = trial.user_attrs.get("run_name") or f"trial_{trial.number:04d}"
    resolved = Path(study_dir) / run_name / "config.yaml"
    if resolved.is_file():
        config = yaml.safe_load(resolved.read_text())
        for key in ("name", "variant"):  # the run's labels; the confirm runs get their own
            config.pop(key, None)
        return config
    return apply_overrides(base_config, {**sweep.overrides, **sweep.decode(trial.params)})


def confirm_dir(study_dir: Path, trial: FrozenTrial, seed: int) -> Path:
    """``runs/<study>/confirm/trial_NNNN/seed_<s>``."""
    return Path(study_dir) / "confirm" / f"trial_{trial.number:04d}" / f"seed_{seed}"


def _model_figures(trial: FrozenTrial) -> dict[str, Any]:
    """The architecture's figures as the search measured them (a re-training does not change them)."""
    from fvlab.sweep.objective import USER_ATTRS

    return {metric: trial.user_attrs[attr] for metric, attr in USER_ATTRS.items()
            if trial.user_attrs.get(attr) is not None}


def confirm_front(study: optuna.Study, sweep: SweepSpec, base_config: Mapping[str, Any], study_dir: Path,
                  log: Callable[..., None] = print) -> bool:
    """Train every front member with every confirm seed (complete runs skipped); True when one failed."""
    from fvlab.lit.runner import BadConfig, RunRefused, build_run, config_hash, fit_run, plan_run, release_memory
    from fvlab.sweep.pareto import front_trials

    failed = False
    for trial in front_trials(study):
        config = trial_config(trial, sweep, base_config, study_dir)
        for seed in sweep.confirm_seeds or []:
            run_dir = confirm_dir(study_dir, trial, seed)
            label = f"[{sweep.study}] confirm trial {trial.number} seed {seed}"
            try:
                spec = build_run(config, run_dir, experiment=f"{sweep.study}_confirm",
                                 variant=f"trial_{trial.number:04d}", seed=seed)
                plan = plan_run(run_dir, config_hash(spec.config), config=spec.config)
            except (BadConfig, RunRefused) as err:
                log(f"{label}: {err}", flush=True)
                failed = True
                continue
            if plan.action == "skip":
                log(f"{label}: complete, skipped", flush=True)
                del spec
                continue
            log(f"{label} -> {run_dir}", flush=True)
            result = fit_run(spec, model_metrics=_model_figures(trial))
            del spec
            release_memory()
            if result.get("status") != "complete":
                failed = True
                log(f"{label} failed: {result.get('error')}", flush=True)
    return failed


def _read_metrics(run_dir: Path) -> dict[str, Any] | None:
    from fvlab.lit.runner import read_metrics

    metrics = read_metrics(run_dir)
    return metrics if metrics and metrics.get("status") == "complete" else None


def confirm_seeds_on_disk(study_dir: Path) -> list[int]:
    """The seeds of the confirm runs under ``runs/<study>/confirm`` (``fvlab report``, without the sweep file)."""
    found = {int(p.name[len("seed_"):]) for p in (Path(study_dir) / "confirm").glob("trial_*/seed_*")
             if p.name[len("seed_"):].isdigit()}
    return sorted(found)


def confirmed_rows(study: optuna.Study, objectives: list[str], seeds: list[int],
                   study_dir: Path) -> list[dict[str, Any]]:
    """Per front member: each objective's mean ± std over its seeds (its own run included), and
    whether it stays on the front recomputed on the means. Empty before any confirm run is complete."""
    from fvlab.sweep.pareto import front_trials

    members = []
    for trial in front_trials(study):
        samples: dict[str, list[float]] = {m: [float(v)] for m, v in zip(objectives, trial.values)}
        run_seeds = [trial.user_attrs.get("seed")]
        for seed in seeds:
            metrics = _read_metrics(confirm_dir(study_dir, trial, seed))
            if metrics is None:
                continue
            run_seeds.append(seed)
            for metric in objectives:
                value = metrics.get(metric)
                if value is not None and math.isfinite(float(value)):
                    samples[metric].append(float(value))
        members.append((trial, run_seeds, samples))
    if not any(len(run_seeds) > 1 for _, run_seeds, _ in members):
        return []
    means = [[statistics.fmean(samples[m]) for m in objectives] for _, _, samples in members]
    stays = pareto_optimal(means, study.directions)
    rows = []
    for (trial, run_seeds, samples), mean, on_front in zip(members, means, stays):
        row: dict[str, Any] = {"trial": trial.number, "seeds": " ".join(str(s) for s in run_seeds)}
        for metric, value in zip(objectives, mean):
            spread = statistics.stdev(samples[metric]) if len(samples[metric]) > 1 else 0.0
            row[metric] = f"{value:.4g} ± {spread:.2g}"
        row["on the front of the means"] = "yes" if on_front else "no: left it"
        rows.append(row)
    return rows


def format_confirmed(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`confirmed_rows` (empty without rows)."""
    from fvlab.sweep.pareto import format_front

    return format_front(rows) if rows else ""
