"""``fvlab sweep SWEEP.yaml``: check everything, create (or resume) the study, run workers, export the front."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fvlab._argparse import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, ArgumentParser
from fvlab.runs import PARETO_MD, STUDY_FILE, has_trial_dirs, without_display_keys
from fvlab.runtime import quiet_lightning as _quiet_lightning
from fvlab.sweep.attrs import (DEVICE_KIND, EXPERIMENT, FAIL_REASON, PRUNED_REASON, REFERENCE, SPEC, SPEC_HASH,
                               SWEEP_FILE, THREADS, reference_attempts, reference_trial)

if TYPE_CHECKING:  # optuna and the sweep spec load lazily: `fvlab sweep --help` stays fast
    import optuna

    from fvlab.sweep.space import SweepSpec

__all__ = ["sweep_command", "prepare_sweep", "open_study", "parse_sets"]


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fvlab sweep", description="Optuna search over a base experiment's "
                             "settings; rerunning the same command resumes the study.")
    parser.add_argument("sweep", help="sweep YAML file (see sweeps/)")
    parser.add_argument("--n-trials", type=int, help="total trials of the study, across reruns and workers "
                        "(default: the file's n_trials)")
    parser.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    parser.add_argument("--storage", help="Optuna storage URL (sqlite:///x.db, postgresql://...) or a journal "
                        "file (default: runs/<study>/study.journal)")
    parser.add_argument("--study-name", help="study name (replaces the file's study, and so the directory)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (one GPU each, or cores/K "
                        "CPU threads each)")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    parser.add_argument("--confirm", action="store_true", help="only re-train the front of the study with the "
                        "file's confirm seeds (no new trials); a search with confirm does it at its end")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of the base experiment, over the file's overrides "
                        "(repeatable; VALUE is YAML, e.g. --set trainer.max_epochs=1 --set "
                        "model.arch.depths=[1,1,2,1]); part of the study's identity, like the file")
    return parser


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["trainer.max_epochs=1"]`` -> ``{"trainer.max_epochs": 1}`` (values parsed as YAML); SweepError if malformed."""
    import yaml

    from fvlab.sweep.space import SweepError

    sets: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or "." not in key or key != key.strip():
            raise SweepError(f"--set {item}: give a dotted config key and a value, e.g. --set trainer.max_epochs=1")
        try:
            sets[key] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SweepError(f"--set {item}: the value is not YAML: {' '.join(str(err).split())}") from None
    return sets


def _check_sweep_args(args: argparse.Namespace) -> None:
    """SweepError for --n-trials, --timeout or --workers out of range."""
    from fvlab.sweep.space import SweepError

    if args.n_trials is not None and args.n_trials < 1:
        raise SweepError(f"--n-trials must be >= 1, got {args.n_trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise SweepError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.workers < 1:
        raise SweepError(f"--workers must be >= 1, got {args.workers}")


def _load_checked_sweep(args: argparse.Namespace) -> Any:
    """The sweep file with the command line's name, trials and --set overrides; SweepError without a budget."""
    from fvlab.sweep.space import SweepError, load_sweep

    sweep = load_sweep(args.sweep, study_name=args.study_name, n_trials=args.n_trials,
                       overrides=parse_sets(getattr(args, "set", None) or []))
    if sweep.n_trials is None and args.timeout is None and sweep.sampler != "grid":
        raise SweepError(f"{args.sweep}: n_trials: missing; give n_trials in the file, --n-trials N or --timeout S")
    return sweep


def _build_base(args: argparse.Namespace, sweep: Any) -> tuple[dict[str, Any], Any]:
    """(base experiment config, the run built from it with the sweep's overrides); SweepError if it cannot be."""
    from fvlab.experiment import ExperimentError, load_experiment
    from fvlab.lit.build import BadConfig, build_run
    from fvlab.sweep.space import SweepError

    try:
        experiment = load_experiment(sweep.experiment)
        base = experiment.base_config()
    except ExperimentError as err:
        raise SweepError(f"experiment {sweep.experiment}: {err}") from None
    try:
        spec = build_run([base, sweep.overrides], None, {"trainer.logger": False})
    except BadConfig as err:
        raise SweepError(f"{args.sweep}: the base experiment with overrides cannot be built: {err}") from None
    return base, spec


def _check_space_keys(sweep: Any, config: dict[str, Any]) -> None:
    """SweepError unless the rungs fit the trainer's epochs and every space key is a key of ``config``."""
    from fvlab.experiment import get_dotted
    from fvlab.sweep.space import SweepError, check_rungs_epochs

    note = check_rungs_epochs(sweep, get_dotted(config, "trainer.max_epochs", None),
                              get_dotted(config, "trainer.check_val_every_n_epoch", 1),
                              get_dotted(config, "trainer.limit_val_batches", None))
    if note:
        print(f"[{sweep.study}] note: {note}", file=sys.stderr, flush=True)
    missing = object()
    for key in sweep.space:
        if get_dotted(config, key, missing) is missing:
            raise SweepError(f"space.{key}: not a key of the resolved config of {sweep.experiment}; "
                             f"use dotted keys such as model.arch.window_size or model.lr")


def _base_params(sweep: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The space's values in ``config``, with the architecture's unset fields as the model is built."""
    import copy

    from fvlab.sweep.space import reference_params

    effective = copy.deepcopy(config)
    from fvlab.experiment import model_arguments

    model = model_arguments(effective)
    if isinstance(model.get("arch"), dict):
        from fvlab.models.factory import effective_arch

        model["arch"] = effective_arch(model["arch"])  # unset fields: the values the model is built with
    return reference_params(sweep.space, effective)


def _check_confirm_seeds(args: argparse.Namespace, sweep: Any, config: dict[str, Any]) -> None:
    """SweepError for --confirm without confirm seeds, or a confirm seed that every trial already trains with."""
    from fvlab.experiment import get_dotted
    from fvlab.sweep.space import SweepError

    if getattr(args, "confirm", False) and not sweep.confirm_seeds:
        raise SweepError(f"--confirm: {args.sweep} has no confirm seeds; add e.g. confirm: {{seeds: [1, 2]}}")
    own_seed = get_dotted(config, "seed_everything", None)
    if sweep.confirm_seeds and own_seed in sweep.confirm_seeds:
        raise SweepError(f"confirm.seeds: {own_seed} is the seed every trial trains with (seed_everything of "
                         f"{sweep.experiment}), so it would train the same run again; use other seeds")


def _drop_searched_keys(resolved: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """``resolved`` without the searched keys: their base value never reaches a trial."""
    for key in space:
        *parents, last = key.split(".")
        section = resolved
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(last, None)
    return resolved


def prepare_sweep(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    """Load and check the sweep and its base experiment; nothing written. Returns (sweep, base, device kind)."""
    import gc

    from fvlab.lit.measure import device_kind
    from fvlab.sweep.space import SweepError

    _check_sweep_args(args)
    sweep = _load_checked_sweep(args)
    base, spec = _build_base(args, sweep)
    _check_space_keys(sweep, spec.config)
    sweep.reference = _base_params(sweep, spec.config)
    _check_confirm_seeds(args, sweep, spec.config)
    kind = device_kind(spec.device)
    sweep.base = _drop_searched_keys(without_display_keys(spec.config), sweep.space)
    del spec
    gc.collect()
    if sweep.supernet is not None:
        from fvlab.sweep.oneshot import check_supernet_config

        check_supernet_config(sweep, base)
    runs_dir = Path(args.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise SweepError(f"--runs-dir {runs_dir} is a file; give a directory (default: runs)")
    return sweep, base, kind


def open_study(args: argparse.Namespace, sweep: SweepSpec, kind: str, journal: Path) -> tuple[Any, optuna.Study]:
    """(storage, study): the study created, or loaded and checked to be the same search; SweepError otherwise.

    Under the study's budget lock, so that commands started together create it once and
    every other one finds it with its identity already recorded.
    """
    from fvlab.runtime import hide_password, scrub_password
    from fvlab.sweep.space import SweepError
    from fvlab.sweep.storage import budget_lock, open_storage, retrying
    from fvlab.sweep.workers import worker_threads

    study_dir = journal.parent
    if args.storage is None and not journal.exists() and study_dir.is_dir() \
            and has_trial_dirs(study_dir):
        raise SweepError(f"{study_dir} holds trials but no study.journal; move it away or choose "
                         f"another --study-name")
    # Threads set the speed of a CPU; on a GPU they do not enter the throughput figures.
    threads = worker_threads(args.workers) if kind.startswith("cpu") else None
    where = hide_password(args.storage) if args.storage else str(journal)
    try:
        storage = open_storage(args.storage, journal)
    except Exception as err:  # a bad URL or an unreachable server
        raise SweepError(scrub_password(f"--storage {args.storage}: {type(err).__name__}: "
                                        f"{' '.join(str(err).split())[:300]}", args.storage)) from None
    with budget_lock(storage, args.storage, journal, sweep.study):
        study = retrying(lambda: _load_or_create(storage, sweep, kind, threads), "creating the study")
    _check_study(study, sweep, kind, threads, where)
    return storage, study


def _load_or_create(storage: Any, sweep: Any, kind: str, threads: int | None) -> Any:
    import warnings

    import optuna
    from optuna.exceptions import ExperimentalWarning

    if sweep.study in optuna.get_all_study_names(storage):
        return optuna.load_study(study_name=sweep.study, storage=storage)
    study = optuna.create_study(study_name=sweep.study, storage=storage, directions=sweep.directions,
                                load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        study.set_metric_names(list(sweep.objectives))  # optuna-dashboard labels the axes
    study.set_user_attr(SPEC, sweep.identity())
    study.set_user_attr(SPEC_HASH, sweep.identity_hash())
    study.set_user_attr(DEVICE_KIND, kind)
    study.set_user_attr(THREADS, threads)
    study.set_user_attr(SWEEP_FILE, str(sweep.path))
    study.set_user_attr(EXPERIMENT, str(sweep.experiment))
    if sweep.reference is not None:
        # The base experiment's own settings are trial 0: every front is read against it.
        study.enqueue_trial(sweep.reference, user_attrs={REFERENCE: True})
    return study


def _check_study(study: Any, sweep: Any, kind: str, threads: int | None, where: str) -> None:
    """A resumed study must be the same search, measured the same way."""
    from fvlab.pareto import direction_name
    from fvlab.sweep.space import SweepError, describe_change

    attrs = study.user_attrs
    if attrs.get(SPEC_HASH) != sweep.identity_hash():
        changed = describe_change(attrs.get(SPEC) or {}, sweep.identity())
        raise SweepError(f"study {sweep.study!r} in {where} was created with a different "
                         f"{changed}; restore the files or start a new study with --study-name NAME")
    if sweep.uses_throughput() and attrs.get(DEVICE_KIND) not in (None, kind):
        raise SweepError(f"study {sweep.study!r} measured throughput on {attrs[DEVICE_KIND]!r}, this machine "
                         f"is {kind!r}: a study's throughput figures must come from one device kind; "
                         f"use another --study-name here")
    if sweep.uses_throughput() and attrs.get(THREADS) not in (None, threads):
        raise SweepError(f"study {sweep.study!r} measured throughput with {attrs[THREADS]} CPU thread(s) "
                         f"per worker, this command would use {threads}: a study's throughput figures must "
                         f"come from one thread count; rerun with the --workers of the first run (on a "
                         f"machine with as many cores) or start a new study with --study-name NAME")
    if [direction_name(d) for d in study.directions] != sweep.directions:
        raise SweepError(f"study {sweep.study!r} has other directions; use another --study-name")


def _report(study: Any, sweep: Any, base: dict[str, Any], study_dir: Path, label: str) -> None:
    from fvlab.sweep.front_tables import (SCALE_NOTE, export_configs, format_front, front_rows, front_trials,
                                          measure_together, together_columns, write_front)
    from fvlab.sweep.workers import count_budget

    trials = front_trials(study)
    reference = reference_trial(study)
    members = list(trials)
    if reference is not None and all(t.number != reference.number for t in trials):
        # Shown below the front, so that every front is read against where the search started.
        members.append(reference)
    rows = front_rows(members, sweep)
    if len(members) > len(trials):
        rows[-1]["run"] = rows[-1]["run"].replace("(reference)", "(reference, not on the front)")
    notes = ""
    if sweep.uses_throughput() and members:
        try:
            together = measure_together(study, members, sweep, base, study_dir)
        except Exception as err:  # a measurement never fails the search: the search-time figures stand
            print(f"[{sweep.study}] measuring the front together failed: {type(err).__name__}: {err}",
                  file=sys.stderr)
            together = {}
        together_columns(rows, members, together, sweep)
        notes = SCALE_NOTE
    if reference is None:
        base_trial = next(iter(reference_attempts(study)[-1:]), None)  # its latest attempt
        if base_trial is not None and base_trial.state.is_finished():
            why = base_trial.user_attrs.get(PRUNED_REASON) or base_trial.user_attrs.get(FAIL_REASON) or ""
            notes = (f"The reference trial {base_trial.number} (the base experiment's settings) is "
                     f"{base_trial.state.name.lower()}: {why}\n\n" + notes).strip()
    what = "best trial" if len(sweep.objectives) == 1 else "Pareto front (feasible trials)"
    from fvlab.sweep.confirm import confirmed_table

    confirmed = (confirmed_table(study, list(sweep.objectives), sweep.confirm_seeds, study_dir)
                 if sweep.confirm_seeds else "")
    write_front(study_dir, rows, f"{sweep.study}: {what}", notes)
    if confirmed:
        with (study_dir / PARETO_MD).open("a") as f:
            f.write(f"\n## Confirmed over fresh seeds (the front recomputed on the means)\n\n{confirmed}\n")
    paths = export_configs(study_dir, trials, sweep, base)
    states: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name.lower()] = states.get(trial.state.name.lower(), 0) + 1
    counted, _ = count_budget(study)
    print(f"\n{sweep.study}: {counted} trial(s) "
          f"({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}); {what}:\n")
    print(format_front(rows))
    if notes:
        print(f"\n{notes}")
    if confirmed:
        print(f"\nconfirmed over fresh seeds (the front recomputed on the means):\n\n{confirmed}")
    print(f"\n{study_dir}/pareto.md, pareto.csv" + (f"; configs: {study_dir}/best/ ({len(paths)})" if paths else ""))
    print(f"tensorboard --logdir {study_dir}")
    print(f"optuna-dashboard {label}")


def _supernet(args: argparse.Namespace, sweep: Any, base: dict[str, Any], storage: Any, journal: Path,
              study_dir: Path) -> int:
    """Train the study's supernet unless it is complete; an exit code (130: interrupted)."""
    from fvlab.sweep.oneshot import train_supernet
    from fvlab.sweep.space import SweepError
    from fvlab.sweep.storage import budget_lock
    from fvlab.sweep.workers import EXIT_INTERRUPTED

    try:
        # Under the study's lock: one command trains it, commands started beside it wait and then
        # find it complete (the lock is a file or advisory lock, released if its process dies).
        with budget_lock(storage, args.storage, journal, sweep.study):
            train_supernet(sweep, base, study_dir)
    except SweepError as err:
        print(f"fvlab sweep: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RuntimeError as err:
        print(f"[{sweep.study}] {err}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def sweep_command(argv: Sequence[str]) -> int:
    """``fvlab sweep``: Optuna search over HAT settings (multi-objective, constrained, pruned, resumable)."""
    args = _parser().parse_args(argv)
    from fvlab.sweep.space import SweepError
    from fvlab.sweep.storage import storage_label
    from fvlab.sweep.workers import WorkerSettings, budget_spent, run_workers

    import optuna

    _quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial
    try:
        sweep, base, kind = prepare_sweep(args)
        study_dir = Path(args.runs_dir) / sweep.study
        journal = study_dir / STUDY_FILE
        if args.confirm and args.storage is None and not journal.is_file():
            raise SweepError(f"--confirm: no study at {journal}; run the search first (fvlab sweep {args.sweep})")
        storage, study = open_study(args, sweep, kind, journal)
    except SweepError as err:
        print(f"fvlab sweep: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    n_trials = sweep.n_trials
    if sweep.grid_size is not None:
        n_trials = min(n_trials or sweep.grid_size, sweep.grid_size)
    settings = WorkerSettings(
        sweep_path=str(sweep.path), study_name=sweep.study, n_trials=n_trials, storage=args.storage,
        journal=str(journal), runs_dir=str(args.runs_dir), overrides=parse_sets(args.set),
        deadline=time.time() + args.timeout if args.timeout else None, workers=args.workers)
    label = storage_label(args.storage, journal)
    code = 0
    if sweep.supernet is not None and not args.confirm:
        code = _supernet(args, sweep, base, storage, journal, study_dir)
        if code == EXIT_BAD_INPUT:
            return code
    if code == 0 and not args.confirm and budget_spent(study, n_trials):
        # No worker process to start (each would import torch only to find the budget spent).
        more = "every grid point has run" if n_trials == sweep.grid_size else "raise n_trials to search further"
        print(f"[{sweep.study}] all {n_trials} trial(s) have run; {more}", flush=True)
    elif code == 0 and not args.confirm:
        print(f"[{sweep.study}] {n_trials if n_trials else 'unlimited'} trial(s) in total, "
              f"{args.workers} worker(s), storage {label}", flush=True)
        code = run_workers(settings)
    if code == 0 and sweep.confirm_seeds:
        from fvlab.sweep.confirm import confirm_front
        from fvlab.sweep.workers import count_budget

        counted, waiting = count_budget(study)
        if args.confirm or n_trials is None or (counted >= n_trials and not waiting):
            if confirm_front(study, sweep, base, study_dir):
                code = 1
    _report(study, sweep, base, study_dir, label)
    if code == 130:
        print(f"[{sweep.study}] interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if code == 0 else EXIT_FAILURE
