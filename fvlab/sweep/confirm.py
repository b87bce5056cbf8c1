"""``confirm: {seeds: [1, 2]}``: the front's configurations trained again with fresh seeds.

A front found with one seed per configuration is partly seed noise (on digits the seeds of one
configuration spread by 1-2 points, more than the effects searched), and the run that put a
configuration on the front is its luckiest draw (the winner's curse). After the search, or with
``fvlab sweep SWEEP.yaml --confirm`` on a finished study, each front member and the reference
trial are trained again with every listed seed, in ``runs/<study>/confirm/trial_NNNN/seed_<s>/``,
through the same fit runs as ``fvlab fit`` (a complete run is skipped, a changed one refused, so
a rerun resumes). The table's means, std and front use those fresh seeds only; the selecting
run's value is shown beside them, never averaged in. Each member's accuracy is compared with the
reference's, paired by confirm seed (95% paired-t interval). Fresh seeds remove the seed's luck,
not the architecture's luck on the validation images that selected it, so when the confirm runs
measured a test split the table shows its figures (``test/acc1``) and puts the ``*`` there: Holm's
step-down over every member and marked column of the table. Architecture figures (throughput,
GFLOPs) do not change with a seed: they are shown as measured, throughput with its interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import FrozenTrial

from fvlab.metrics import MODEL_TRIAL_ATTRS, THROUGHPUT, VAL_ACC1_BEST, held_out, is_model_metric, trial_attr
from fvlab.pareto import pareto_optimal
from fvlab.runs import config_hash, confirm_dir, read_metrics, trial_dir_name
from fvlab.stats import SIGNIFICANT_MARK, holm, marks_rule, mean_std, paired_bootstrap, paired_difference
from fvlab.sweep.attrs import SPEC, reference_trial
from fvlab.sweep.front_tables import format_front, front_trials, trial_config
from fvlab.sweep.space import SweepSpec
from fvlab.tables import interval, interval_cell

__all__ = ["confirm_members", "confirm_front", "confirm_table", "ConfirmTable", "confirmed_rows",
           "format_confirmed", "confirm_legend",
           "confirmed_table", "is_supernet_study", "rank_agreement", "supernet_agreement", "CONFIRM_LEGEND",
           "MIN_RANKED"]

# Fewer confirmed trials than this rank too few pairs for Kendall's tau to say anything
# (with 3 the only values are -1, -1/3, 1/3 and 1, and every bootstrap interval spans most of them).
MIN_RANKED = 4
RANK_METRIC = VAL_ACC1_BEST


def _model_figures(trial: FrozenTrial) -> dict[str, Any]:
    """The architecture's figures as the search measured them (a re-training does not change them)."""
    return {metric: trial.user_attrs[attr] for metric, attr in MODEL_TRIAL_ATTRS.items()
            if trial.user_attrs.get(attr) is not None}


def confirm_members(study: optuna.Study) -> list[FrozenTrial]:
    """What ``confirm`` trains: the front, then the reference trial when it is not on it."""
    members = front_trials(study)
    reference = reference_trial(study)
    if reference is not None and all(t.number != reference.number for t in members):
        members.append(reference)
    return members


def confirm_front(study: optuna.Study, sweep: SweepSpec, base_config: Mapping[str, Any], study_dir: Path,
                  log: Callable[..., None] = print) -> bool:
    """Train every front member and the reference with every confirm seed (complete runs skipped);
    True when one failed."""
    from fvlab.lit.build import BadConfig, build_run
    from fvlab.lit.fit import fit_run, release_memory
    from fvlab.lit.plan import RunRefused, plan_run

    failed = False
    for trial in confirm_members(study):
        config = trial_config(trial, sweep, base_config, study_dir)
        for seed in sweep.confirm_seeds or []:
            run_dir = confirm_dir(study_dir, trial.number, seed)
            label = f"[{sweep.study}] confirm trial {trial.number} seed {seed}"
            try:
                spec = build_run(config, run_dir, experiment=f"{sweep.study}_confirm",
                                 variant=trial_dir_name(trial.number), seed=seed)
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
    metrics = read_metrics(run_dir)
    return metrics if metrics and metrics.get("status") == "complete" else None


def _architecture_cell(trial: FrozenTrial, metric: str) -> str:
    """A ``model/*`` figure as measured (a seed does not change it); throughput with its interval."""
    lo, hi = trial.user_attrs.get(trial_attr(f"{metric}_lo")), trial.user_attrs.get(trial_attr(f"{metric}_hi"))
    fmt = "{:.0f}" if metric == THROUGHPUT else "{:.4g}"  # images/s: 10290, not 1.029e+04
    return interval_cell(trial.user_attrs.get(trial_attr(metric)), lo, hi, fmt)


_Samples = dict[str, dict[int, float]]  # metric -> confirm seed -> value


def _confirm_samples(study: optuna.Study, metrics: list[str], seeds: list[int],
                     study_dir: Path) -> list[tuple[FrozenTrial, _Samples]]:
    """Each front member (and the reference) with its finite ``metrics`` per completed confirm seed."""
    members = []
    for trial in confirm_members(study):
        by_seed: _Samples = {m: {} for m in metrics}
        for seed in seeds:
            figures = _read_metrics(confirm_dir(study_dir, trial.number, seed))
            for metric in metrics if figures is not None else ():
                value = figures.get(metric)
                if value is not None and math.isfinite(float(value)):
                    by_seed[metric][seed] = float(value)
        members.append((trial, by_seed))
    return members


def _paired_differences(members: list[tuple[FrozenTrial, _Samples]], reference: FrozenTrial | None,
                        metrics: list[str]) -> dict[int, dict[str, Any]]:
    """Per member but the reference: each metric's paired difference to the reference's."""
    reference_seeds = next((by_seed for t, by_seed in members
                            if reference is not None and t.number == reference.number), None)
    differences = {}
    for trial, by_seed in members:
        if reference_seeds is not None and trial.number != reference.number:
            differences[trial.number] = {m: paired_difference(by_seed[m], reference_seeds[m], "reference")
                                         for m in metrics}
    return differences


def _front_of_means(study: optuna.Study, members: list[tuple[FrozenTrial, _Samples]], objectives: list[str],
                    own: dict[int, dict[str, float]], figure: Mapping[str, str]) -> list[bool]:
    """Whether each member is on the front recomputed on the confirm means of ``figure[objective]``
    (architecture figures as measured)."""
    means = []
    for trial, by_seed in members:
        means.append([statistics.fmean(by_seed[figure[m]].values()) if by_seed.get(figure.get(m, m)) else
                      (own[trial.number][m] if is_model_metric(m) else math.nan) for m in objectives])
    return pareto_optimal([None if any(math.isnan(v) for v in mean) else mean for mean in means],
                          study.directions)


def _difference_cell(d: Any, is_reference: bool, significant: bool) -> str:
    """``+0.0123 [-0.0010, +0.0256] * (n=3)``: a paired difference, ``reference``, or ``-``."""
    if is_reference:
        return "reference"
    if d is None or d.mean is None:
        return "-"
    mark = f" {SIGNIFICANT_MARK}" if significant else ""
    return f"{d.mean:+.4f} {interval(d.low, d.high, '{:+.4f}')}{mark} (n={d.n})"


def _mean_std(values: list[float]) -> str:
    """``0.9667 ± 0.0083`` (4 and 2 significant digits); ``± n/a`` with one value, ``-`` with none."""
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.4g} ± {'n/a' if std is None else f'{std:.2g}'}"


@dataclass
class _Columns:
    """What the confirm table shows: the trained objectives, their held-out counterparts (when the
    confirm runs measured a test split) and which of the two carries Holm's marks."""

    objectives: list[str]
    trained: list[str]
    held_out: list[str]  # test-split metrics, in the order of the trained objectives they stand for

    @property
    def marked(self) -> list[str]:
        """The columns whose Δ may carry a mark: the held-out ones when there are any."""
        return self.held_out or self.trained

    @classmethod
    def of(cls, objectives: list[str], has: Callable[[str], bool]) -> "_Columns":
        """The columns for ``objectives``; ``has(metric)``: whether any confirm run measured it."""
        trained = [m for m in objectives if not is_model_metric(m)]
        tests = [held_out(m) for m in trained]
        return cls(objectives, trained, list(dict.fromkeys(t for t in tests if t is not None and has(t))))


def _confirm_row(trial: FrozenTrial, by_seed: _Samples, columns: _Columns, seeds: list[int],
                 own_label: str, own_values: dict[str, float], deltas: dict[str, str] | None,
                 is_reference: bool) -> dict[str, Any]:
    """One member's row: confirm seeds, each objective's mean ± std beside its own value and its Δ,
    then the held-out figures and their Δ."""
    row: dict[str, Any] = {"trial": f"{trial.number}" + (" (reference)" if is_reference else "")}
    row["confirm seeds"] = " ".join(str(s) for s in seeds
                                    if any(s in by_seed[m] for m in columns.trained)) or "-"
    for metric in columns.objectives:
        if is_model_metric(metric):
            row[metric] = _architecture_cell(trial, metric)
            continue
        row[metric] = _mean_std(list(by_seed[metric].values()))
        row[f"{metric} ({own_label})"] = f"{own_values[metric]:.4g}"
        if deltas is not None:
            row[f"Δ {metric}"] = deltas[metric]
    for metric in columns.held_out:
        row[metric] = _mean_std(list(by_seed[metric].values()))
        if deltas is not None:
            row[f"Δ {metric}"] = deltas[metric]
    return row


def _holm_over_table(differences: dict[int, dict[str, Any]], marked: list[str]) -> tuple[set[tuple[int, str]], int]:
    """Holm's step-down over every (member, marked column) comparison that can carry a mark: the
    marked ones and the family's size."""
    cells = [(number, m) for number, by_metric in differences.items() for m in marked
             if by_metric[m].can_mark]
    rejected = holm([differences[number][m].p_value for number, m in cells])
    return {cell for cell, mark in zip(cells, rejected) if mark}, len(cells)


@dataclass
class ConfirmTable:
    """The confirm table's rows and what its legend must say about them."""

    rows: list[dict[str, Any]]
    columns: _Columns | None = None
    family: int = 0


def confirm_table(study: optuna.Study, objectives: list[str], seeds: list[int], study_dir: Path) -> ConfirmTable:
    """Per front member (and the reference): each objective's mean ± std over the fresh confirm
    seeds beside the selecting run's value, the paired difference to the reference, the held-out
    (test) figures and their difference when the data has a test split, and whether the member
    stays on the front recomputed on the means. No rows before any confirm run is complete."""
    # In a one-shot study the trial's own value is its subnet's, evaluated on the supernet.
    own_label = "supernet" if is_supernet_study(study) else "selecting run"
    reference = reference_trial(study)  # the complete attempt, never a failed one a retry replaced
    trained = [m for m in objectives if not is_model_metric(m)]
    candidates = list(dict.fromkeys([*trained, *(t for m in trained if (t := held_out(m)) is not None)]))
    members = _confirm_samples(study, candidates, seeds, study_dir)
    if not any(by_seed[m] for _, by_seed in members for m in trained):
        return ConfirmTable([])
    columns = _Columns.of(objectives, lambda metric: any(by_seed[metric] for _, by_seed in members))
    own = {trial.number: dict(zip(objectives, trial.values)) for trial, _ in members}
    differences = _paired_differences(members, reference, [*columns.trained, *columns.held_out])
    marked, family = _holm_over_table(differences, columns.marked)
    on_val = _front_of_means(study, members, objectives, own, {m: m for m in trained})
    on_test = (_front_of_means(study, members, objectives, own,
                               {m: held_out(m) for m in trained if held_out(m) in columns.held_out})
               if columns.held_out and all(held_out(m) in columns.held_out for m in trained) else None)
    rows = []
    for index, (trial, by_seed) in enumerate(members):
        is_reference = reference is not None and trial.number == reference.number
        deltas = ({m: _difference_cell(differences.get(trial.number, {}).get(m), is_reference,
                                       (trial.number, m) in marked)
                   for m in (*columns.trained, *columns.held_out)} if differences else None)
        row = _confirm_row(trial, by_seed, columns, seeds, own_label, own[trial.number], deltas, is_reference)
        row["on the front of the means"] = "yes" if on_val[index] else "no"
        if on_test is not None:
            row["on the front of the test means"] = "yes" if on_test[index] else "no"
        rows.append(row)
    return ConfirmTable(rows, columns, family)


def confirmed_rows(study: optuna.Study, objectives: list[str], seeds: list[int],
                   study_dir: Path) -> list[dict[str, Any]]:
    """The rows of :func:`confirm_table` (empty before any confirm run is complete)."""
    return confirm_table(study, objectives, seeds, study_dir).rows


CONFIRM_LEGEND = ("Means ± sample std over the fresh confirm seeds only (n/a with one seed); the selecting "
                  "run, whose value put the trial on the front, is shown beside them and not averaged in. "
                  "Δ: mean per-seed difference to the reference trial over the confirm seeds both have (n), "
                  "with its unadjusted 95% paired-t interval. Throughput is on the study's one scale, with its "
                  "95% interval.")


def confirm_legend(table: ConfirmTable) -> str:
    """What the table's figures mean, which split to cite, and the rule and family of its marks."""
    columns = table.columns
    if columns is not None and columns.held_out:
        shown = ", ".join(columns.held_out)
        split = (f"Cite the held-out columns ({shown}, their Δ and marks): the validation split chose these "
                 f"trials, so their val figures carry the selection's luck even on fresh seeds, while the "
                 f"test split selected nothing. The val figures and their Δ (unmarked) stay beside them.")
        where = "this table (the test-split Δ)"
    else:
        split = ("The data has no test split, so Δ and its marks are on the selection split, the one these "
                 "trials were chosen on: they carry the selection's luck (give the data a test split to "
                 "cite held-out figures).")
        where = "this table"
    return f"{CONFIRM_LEGEND} {split} {marks_rule(table.family, where=where)}"


def format_confirmed(table: ConfirmTable) -> str:
    """A Markdown table of :func:`confirm_table` with its legend (empty without rows)."""
    return f"{format_front(table.rows)}\n\n{confirm_legend(table)}" if table.rows else ""


def is_supernet_study(study: optuna.Study) -> bool:
    """Whether the study is a one-shot search (its identity has a ``supernet`` block)."""
    return (study.user_attrs.get(SPEC) or {}).get("supernet") is not None


def rank_agreement(x: list[float], y: list[float], resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float | None, float | None]:
    """Kendall's tau-b between ``x`` and ``y`` with a percentile bootstrap 95% interval over the pairs
    (resampled with replacement; resamples where tau is undefined, all values tied, are left out)."""
    from scipy.stats import kendalltau

    def tau_of(xs: Any, ys: Any) -> float:
        """Kendall's tau-b of one resample (scipy loops over resamples: it takes no ``axis``)."""
        return kendalltau(xs, ys).statistic

    tau = float(kendalltau(x, y).statistic)
    interval = paired_bootstrap((x, y), tau_of, resamples, seed)
    if interval.kept == 0:
        return tau, None, None
    return tau, float(interval.low), float(interval.high)


def supernet_agreement(study: optuna.Study, seeds: list[int], study_dir: Path, metric: str = RANK_METRIC) -> str:
    """How well the supernet ranks the confirmed trials: Kendall's tau between each trial's supernet
    ``metric`` and its stand-alone mean over the confirm seeds, on the split the front was not chosen
    on when the confirm runs measured one (``metric``'s test counterpart), with its bootstrap
    interval, or why it cannot be judged. Empty for a study without a supernet."""
    if not is_supernet_study(study):
        return ""
    members = confirm_members(study)
    runs = {t.number: [m for m in (_read_metrics(confirm_dir(study_dir, t.number, s)) for s in seeds) if m]
            for t in members}
    test = held_out(metric)
    target = test if test and any(r.get(test) is not None for rs in runs.values() for r in rs) else metric
    supernet, standalone = [], []
    for trial in members:
        own = trial.user_attrs.get(trial_attr(metric))
        values = [r[target] for r in runs[trial.number] if r.get(target) is not None]
        if own is not None and values:
            supernet.append(float(own))
            standalone.append(statistics.fmean(float(v) for v in values))
    if target == metric:
        what = (f"Kendall τ between supernet and stand-alone {metric} (mean over the confirm seeds; no test "
                f"split, so on the split the front was chosen on)")
    else:
        what = (f"Kendall τ between the supernet's {metric} and the stand-alone {target} (mean over the "
                f"confirm seeds; the test split, which chose nothing)")
    if len(supernet) < MIN_RANKED:
        return (f"{what}: cannot be judged from {len(supernet)} confirmed trial(s); it needs at least "
                f"{MIN_RANKED} (confirm more trials: a larger front, or a sweep with more objectives).")
    tau, low, high = rank_agreement(supernet, standalone)
    shown = "n/a (every value tied)" if math.isnan(tau) else f"{tau:.2f}"
    return (f"{what} over {len(supernet)} confirmed trials: τ = {shown}, bootstrap 95% interval "
            f"{interval(low, high, '{:.2f}')} "
            f"(2000 resamples of the trials).")


def confirmed_table(study: optuna.Study, objectives: list[str], seeds: list[int], study_dir: Path) -> str:
    """The confirm table with, in a one-shot study, the supernet's rank agreement under it (empty
    before any confirm run is complete)."""
    text = format_confirmed(confirm_table(study, objectives, seeds, study_dir))
    agreement = supernet_agreement(study, seeds, study_dir)
    return f"{text}\n\n{agreement}" if text and agreement else text
