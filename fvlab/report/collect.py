"""What ``fvlab report`` reads: run directories, their TensorBoard curves, and Optuna studies.

A run directory holds metrics.json (final figures), config.yaml (the resolved config) and the
TensorBoard events. A run still in progress has no metrics.json yet (or says ``running``): its
latest figures come from the events, read with TensorBoard's own ``EventAccumulator``.
A study directory holds ``study.journal`` (Optuna's journal file storage) and the trials' run
directories ``trial_NNNN/``.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fvlab.metrics import (CLASSIFICATION, MODEL_METRICS, SEGMENTATION, TRAIN_LOSS_EPOCH, TRIAL_ATTRS, VAL_METRICS,
                           VAL_MIOU, TaskMetrics)
from fvlab.report.stats import RUNNING
from fvlab.runs import (PROFILE_FILE, SUMMARY_CSV, TEST_FILE, find_runs, find_studies, read_config, read_metrics,
                        seed_of, trial_dir_name, variant_dir_of)

__all__ = ["Run", "Trial", "StudyData", "ReportInputError", "discover", "read_run",
           "read_curve", "resolved_arch", "load_journal_studies", "load_storage_study", "read_study",
           "variant_order_hint"]


class ReportInputError(ValueError):
    """A directory or study the report cannot read: the message says what it expected."""


@dataclass
class Run:
    """One run directory: its figures (metrics.json, or the latest events), arch and val/acc1 curve."""

    path: Path
    metrics: dict[str, Any]
    arch: dict[str, Any] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    tested: dict[str, Any] | None = None  # test.json of a later `fvlab test`, if any

    @property
    def experiment(self) -> str:
        """The experiment (or study) name."""
        return str(self.metrics.get("experiment") or "")

    @property
    def variant(self) -> str:
        """The variant (or trial directory) name."""
        return str(self.metrics.get("variant") or "default")


@dataclass
class Trial:
    """One Optuna trial as a report row."""

    number: int
    state: str  # complete | pruned | failed | infeasible | running | waiting
    params: dict[str, Any]
    metrics: dict[str, Any]
    reason: str = ""
    run: Run | None = None
    duplicate_of: int | None = None  # a configuration already trained: the original stands for it


@dataclass
class StudyData:
    """A study: its trials, objectives and where it came from."""

    name: str
    source: str
    study: Any  # optuna.Study
    trials: list[Trial]
    objective_names: list[str]
    study_dir: Path | None = None  # runs/<study>, when read from its journal


# ---- run directories -------------------------------------------------------------------


def discover(directory: Path, skip: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Run directories and study journals in or under ``directory`` (checkpoints and ``skip`` ignored)."""
    return find_runs(directory, skip=skip), find_studies(directory, skip=skip)


def _event_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    try:
        accumulator.Reload()
    except Exception as err:  # a truncated file of a crashed run: use what is there
        warnings.warn(f"{path}: TensorBoard events unreadable ({err})")
        return {}
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags().get("scalars", [])}


def read_curve(scalars: Mapping[str, list[tuple[int, float]]], tag: str | None = None) -> list[tuple[int, float]]:
    """(epoch starting at 1, value) per validation of ``tag`` (default: the run's task's monitor, val/acc1 or
    val/miou); the epoch comes from Lightning's ``epoch`` scalar."""
    tag = tag or _task_of(scalars).monitor
    epoch_at = {step: int(value) for step, value in scalars.get("epoch", [])}
    by_epoch: dict[int, float] = {}
    for index, (step, value) in enumerate(scalars.get(tag, [])):
        # A resumed run may log an epoch again: the later value wins.
        by_epoch[epoch_at.get(step, index) + 1] = value
    return sorted(by_epoch.items())


def _task_of(scalars: Mapping[str, list[tuple[int, float]]]) -> TaskMetrics:
    """The task whose metrics a run's events hold (segmentation when it logged val/miou)."""
    return SEGMENTATION if scalars.get(VAL_MIOU) else CLASSIFICATION


def _latest_figures(scalars: Mapping[str, list[tuple[int, float]]]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for tag in (*VAL_METRICS, TRAIN_LOSS_EPOCH, *MODEL_METRICS):
        if scalars.get(tag):
            figures[tag] = scalars[tag][-1][1]
    task = _task_of(scalars)
    curve = read_curve(scalars, task.monitor)
    if task is SEGMENTATION:  # a running run has no metrics.json to say so yet
        figures["task"] = task.task
    if curve:
        figures["epochs"] = curve[-1][0]
        figures.setdefault(task.primary, max(v for _, v in curve))
    return figures


def _fmt_setting(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return value


def resolved_arch(arch: Any) -> dict[str, Any]:
    """Architecture settings of a config's ``model.arch``: the variant's values where the config says null."""
    if isinstance(arch, str):
        arch = {"name": arch}
    if not isinstance(arch, Mapping):
        return {}
    from fvlab.models.factory import effective_arch

    if arch.get("name"):
        arch = {**arch, "name": str(arch["name"])}
    return {key: _fmt_setting(value) for key, value in effective_arch(arch).items()
            if key not in ("checkpoint_path", "class_path", "init_args")}


def read_run(path: Path, *, events: bool = True) -> Run:
    """One run directory; without a final metrics.json its latest figures come from the events."""
    metrics: dict[str, Any] = read_metrics(path) or {}
    config = read_config(path) or {}
    scalars = _event_scalars(path) if events else {}
    if not metrics or metrics.get("status") in (None, RUNNING):
        metrics = {**_latest_figures(scalars), **{k: v for k, v in metrics.items() if v is not None},
                   "status": RUNNING}
    seed = seed_of(path)
    variant_dir = variant_dir_of(path)
    metrics.setdefault("variant", config.get("variant") or variant_dir.name)
    metrics.setdefault("experiment", config.get("name") or variant_dir.parent.name)
    if metrics.get("seed") is None:
        metrics["seed"] = seed if seed is not None else config.get("seed_everything")
    model = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    arch = resolved_arch((model.get("init_args") or model).get("arch"))
    try:
        tested = json.loads((path / TEST_FILE).read_text())
    except (OSError, ValueError):
        tested = None
    return Run(path, metrics, arch, read_curve(scalars), tested if isinstance(tested, dict) else None)


def read_profile(experiment_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``fvlab profile``'s profile.json in an experiment directory (none when absent)."""
    try:
        rows = json.loads((Path(experiment_dir) / PROFILE_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def variant_order_hint(experiment_dir: Path) -> tuple[list[str], str | None]:
    """Variant order and reference from the summary.csv that ``fvlab fit`` wrote, if any."""
    try:
        with (experiment_dir / SUMMARY_CSV).open() as handle:
            rows = [row for row in csv.DictReader(handle) if row.get("kind") == "mean"]
    except (OSError, csv.Error):
        return [], None
    return [row["variant"] for row in rows if row.get("variant")], next(
        (row["reference"] for row in rows if row.get("reference")), None)


# ---- Optuna studies --------------------------------------------------------------------


def _journal_storage(path: Path) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except Exception as err:
        raise ReportInputError(f"{path}: not a readable Optuna journal ({type(err).__name__}: {err})") from None


def load_journal_studies(path: Path, study_name: str | None = None) -> list[tuple[Any, str]]:
    """(study, source) for every study in a journal file, or only ``study_name``."""
    import optuna

    storage = _journal_storage(path)
    names = optuna.get_all_study_names(storage)
    if study_name is not None:
        if study_name not in names:
            raise ReportInputError(f"{path} holds no study {study_name!r}; it holds: {', '.join(names) or 'none'}")
        names = [study_name]
    return [(optuna.load_study(study_name=name, storage=storage), str(path)) for name in names]


def load_storage_study(url: str, study_name: str | None) -> tuple[Any, str]:
    """A study from any Optuna storage URL (``sqlite:///...``, ``postgresql://...``) or journal file path;
    (study, source), the source with the URL's password hidden."""
    import optuna

    from fvlab.runtime import hide_password, scrub_password

    shown = hide_password(url)

    if url.endswith(".journal") or Path(url).is_file():
        if not Path(url).is_file():
            raise ReportInputError(f"--storage {url}: journal file not found")
        storage: Any = _journal_storage(Path(url))
    else:
        storage = url
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as err:
        raise ReportInputError(scrub_password(f"--storage {shown}: cannot open it ({type(err).__name__}: {err}); "
                               f"give an Optuna URL such as sqlite:///runs/study.db or a study.journal path",
                               url)) from None
    if study_name is None:
        if len(names) != 1:
            raise ReportInputError(f"--storage {shown} holds {len(names)} studies; name one with "
                                   f"--study-name ({', '.join(names) or 'none'})")
        study_name = names[0]
    if study_name not in names:
        raise ReportInputError(f"--study-name {study_name!r} is not in --storage {shown}; it holds: "
                               f"{', '.join(names) or 'no study'}")
    return optuna.load_study(study_name=study_name, storage=storage), shown


def _reason(*sources: Mapping[str, Any]) -> str:
    from fvlab.sweep.attrs import FAIL_REASON, PRUNED_REASON

    for source in sources:
        # Where a trial's reason is written: a failed run's metrics.json ("error") and fvlab's sweep (user_attrs).
        for key in ("error", FAIL_REASON, PRUNED_REASON):
            value = source.get(key)
            if value and not isinstance(value, bool):
                return str(value)
    return ""


def read_study(study: Any, source: str, runs_by_path: Mapping[Path, Run],
               study_dir: Path | None = None) -> StudyData:
    """Report rows of a study's trials, joined with their run directories."""
    from optuna.trial import TrialState

    from fvlab.sweep.attrs import DUPLICATE_OF, REFERENCE, RUN_DIR

    names = list(study.metric_names or [f"objective {i}" for i in range(len(study.directions))])
    trials = []
    for frozen in study.get_trials(deepcopy=False):
        attrs, system = dict(frozen.user_attrs), dict(frozen.system_attrs)
        run = None
        candidates = []
        if attrs.get(RUN_DIR):
            candidates.append(Path(str(attrs[RUN_DIR])))
            if study_dir is not None:
                candidates.append(study_dir / Path(str(attrs[RUN_DIR])).name)
        if study_dir is not None:
            candidates.append(study_dir / trial_dir_name(frozen.number))
        for candidate in candidates:
            run = runs_by_path.get(candidate.resolve())
            if run is not None:
                break
        metrics: dict[str, Any] = dict(run.metrics) if run is not None else {}
        if frozen.values is not None:
            for name, value in zip(names, frozen.values):
                metrics.setdefault(name, value)
        for name, attr in TRIAL_ATTRS.items():
            if attrs.get(attr) is not None:
                metrics[name] = attrs[attr]
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
                 TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}.get(frozen.state, str(frozen.state))
        reason = _reason(attrs, system, metrics if state != "complete" else {})
        # Optuna 5's Trial.set_constraint(key, value) -> "constraints:key"; older samplers' list -> "constraints".
        violated = {key.partition(":")[2]: value for key, value in system.items()
                    if key.startswith("constraints:") and value > 0}
        violated.update({f"constraint {i}": value for i, value in enumerate(system.get("constraints") or [])
                         if value > 0})
        # fvlab's sweep prunes an infeasible architecture before training it.
        if violated and state in ("complete", "pruned"):
            state = "infeasible"
            reason = reason or "; ".join(f"{key} exceeded by {value:.4g}" for key, value in violated.items())
        if state == "pruned" and not reason:
            reason = f"pruned at epoch {frozen.last_step}" if frozen.last_step is not None else "pruned"
        duplicate_of = attrs.get(DUPLICATE_OF)
        if duplicate_of is not None and state == "complete":
            reason = f"duplicate of trial {duplicate_of}, not trained (its values)"
        if attrs.get(REFERENCE):
            reason = "reference: the base experiment's own settings" + (f"; {reason}" if reason else "")
        trials.append(Trial(frozen.number, state, dict(frozen.params), metrics, reason, run,
                            duplicate_of=duplicate_of))
    return StudyData(study.study_name, source, study, trials, names)


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when missing or not finite."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
