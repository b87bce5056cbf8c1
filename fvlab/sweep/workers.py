"""Sweep workers: each runs trials of one study until its budget of ``n_trials`` is spent.

``n_trials`` is a total over every rerun, worker and machine: before each trial a worker
takes the study's budget lock, recovers trials whose process died, counts the trials that are
finished, running or waiting (a failed trial that was enqueued again counts once, as its
retry) and asks for a new trial (``study.ask()``) only while the count is below the budget;
the trial carries its process tag before the lock is released, runs, and is told its result
(``study.tell()``). Each worker claims an index in the study, in start order, and seeds its
sampler from ``sampler.seed`` and that index: workers propose different configurations, and a
single worker with a fixed seed repeats its search. ``--workers K``
spawns K processes (not forked: CUDA and OpenMP do not survive a fork), each with its own
storage connection, its own GPU (``CUDA_VISIBLE_DEVICES``) or cores/K CPU threads.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from fvlab.sweep.space import PRUNER_CLASSES, SAMPLER_CLASSES, SweepSpec

__all__ = ["WorkerSettings", "count_budget", "make_sampler", "make_pruner", "run_worker", "run_workers",
           "worker_seed", "worker_threads", "claim_worker_index", "EXIT_INTERRUPTED", "WORKERS_ATTR"]

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 130
WORKERS_ATTR = "fvlab_workers_started"  # study user attr: how many workers have claimed an index


@dataclass
class WorkerSettings:
    """What a worker process needs (picklable: spawned workers re-read the sweep file)."""

    sweep_path: str
    study_name: str
    n_trials: int | None
    storage: str | None
    journal: str
    runs_dir: str
    deadline: float | None = None
    worker: int = 0
    workers: int = 1
    threads: int | None = None
    cuda_device: str | None = None
    overrides: dict[str, Any] | None = None  # fvlab sweep --set


def count_budget(study: optuna.Study) -> tuple[int, int]:
    """(trials that count towards n_trials, trials waiting to run)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counted = sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return counted, waiting


def worker_seed(base: int, index: int) -> int:
    """The sampler seed of the study's ``index``-th worker (in start order, over reruns and machines)."""
    return int(np.random.SeedSequence([base, index]).generate_state(1)[0])


def worker_threads(workers: int) -> int:
    """CPU threads each of ``workers`` worker processes runs (and measures throughput) with."""
    import torch

    if workers <= 1:
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // workers)


def claim_worker_index(study: optuna.Study) -> int:
    """The next worker index of the study; call under the budget lock (the read-increment-write)."""
    index = int(study.user_attrs.get(WORKERS_ATTR, 0))
    study.set_user_attr(WORKERS_ATTR, index + 1)
    return index


class _GridSampler(optuna.samplers.GridSampler):
    # GridSampler stops study.optimize() when the grid is spent, and raises outside it; the
    # workers' budget (n_trials capped at the grid's size) already ends the search.
    def after_trial(self, study: optuna.Study, trial: Any, state: TrialState, values: Any) -> None:
        """Nothing: the budget, not the sampler, ends the search."""

    def before_trial(self, study: optuna.Study, trial: Any) -> None:
        """Give the trial an unvisited grid point; an enqueued trial (the reference) counts as its own.

        Optuna's GridSampler leaves enqueued trials off the grid and hands trial k the k-th point,
        which assumes no enqueued trial: with the reference as trial 0, a grid of n points would
        then need n + 1 trials and visit the reference's point twice.
        """
        if "grid_id" in trial.system_attrs:
            return
        storage = study._storage
        fixed = trial.system_attrs.get("fixed_params")
        if fixed is not None:
            point = tuple(fixed.get(name) for name in self._param_names)
            if point in self._all_grids:
                storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
                storage.set_trial_system_attr(trial._trial_id, "grid_id", self._all_grids.index(point))
            return
        targets = self._get_unvisited_grid_ids(study) or list(range(len(self._all_grids)))
        storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
        storage.set_trial_system_attr(trial._trial_id, "grid_id", int(self._rng.rng.choice(sorted(targets))))


def make_sampler(sweep: SweepSpec, seed: int, parallel: bool) -> optuna.samplers.BaseSampler:
    """The sweep's sampler, seeded; TPE is multivariate, with the constant liar for parallel workers."""
    cls = SAMPLER_CLASSES[sweep.sampler]
    options = dict(sweep.sampler_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if sweep.sampler == "tpe":
            options.setdefault("multivariate", True)
            options.setdefault("constant_liar", parallel)
        if sweep.sampler == "grid":
            return _GridSampler(sweep.grid_search_space(), seed=seed, **options)
        return cls(seed=seed, **options)


def make_pruner(sweep: SweepSpec) -> optuna.pruners.BasePruner | None:
    """The sweep's pruner, or None."""
    if sweep.pruner is None:
        return None
    if sweep.pruner == "rungs":
        from fvlab.sweep.rungs import RungsPruner  # imports Lightning: only where trials run

        return RungsPruner(**sweep.pruner_options)
    return PRUNER_CLASSES[sweep.pruner](**sweep.pruner_options)


def _raise_interrupt(signum: int, frame: Any) -> None:
    # The first SIGINT/SIGTERM stops the trial; a second one (Ctrl-C reaches every process of
    # the group, and the parent forwards it too) must not break the recording of that stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _trial_line(study: optuna.Study, number: int, objectives: list[str], prefix: str) -> str:
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        what = " ".join(f"{m}={v:.4g}" for m, v in zip(objectives, trial.values))
        if attrs.get("duplicate_of") is not None:
            what += f" (duplicate of trial {attrs['duplicate_of']}, not trained)"
    elif trial.state == TrialState.PRUNED:
        what = f"pruned: {attrs.get('pruned_reason')}"
    else:
        what = f"{trial.state.name.lower()}: {attrs.get('fail_reason')}"
    return f"{prefix}trial {number} ({attrs.get('run_name', '?')}): {what}"


def _tell(study: optuna.Study, trial: optuna.Trial, objective: Any) -> None:
    """Run the objective on an asked trial and tell the study how it ended."""
    from optuna.storages._heartbeat import get_heartbeat_thread  # what optimize() runs around a trial

    from fvlab.sweep.objective import TrialFailed

    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            values = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return
        except TrialFailed:  # its reason is in the trial's user_attrs
            study.tell(trial, state=TrialState.FAIL)
            return
        except Exception as err:
            if trial.user_attrs.get("fail_reason") is None:
                trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}")
            study.tell(trial, state=TrialState.FAIL)
            raise
    study.tell(trial, values)


def run_worker(settings: WorkerSettings) -> int:
    """Run trials until the study's budget is spent (or the deadline passes); returns an exit code."""
    from fvlab.runtime import tune_allocator

    tune_allocator()  # a spawned worker measures under the same allocator state as `fvlab fit`
    if settings.cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.cuda_device
    import torch

    from fvlab.experiment import apply_overrides, load_experiment
    from fvlab.sweep.objective import ArchitectureProfiler
    from fvlab.sweep.oneshot import objective_for
    from fvlab.sweep.space import load_sweep
    from fvlab.sweep.storage import (budget_lock, open_storage, process_tag, recover_dead_trials,
                                     retry_trial)

    if settings.threads:
        torch.set_num_threads(settings.threads)
    # SIGTERM's default (or Lightning's, outside fit) would end the process with the trial RUNNING.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prefix = f"[{settings.study_name}{f' w{settings.worker}' if settings.workers > 1 else ''}] "
    journal = Path(settings.journal)
    trial: optuna.Trial | None = None
    try:
        sweep = load_sweep(settings.sweep_path, study_name=settings.study_name, n_trials=settings.n_trials,
                           overrides=settings.overrides)
        base = load_experiment(sweep.experiment).base_config()
        storage = open_storage(settings.storage, journal)
        study = optuna.load_study(study_name=settings.study_name, storage=storage, pruner=make_pruner(sweep))

        def locked() -> contextlib.AbstractContextManager[None]:
            return budget_lock(storage, settings.storage, journal, settings.study_name)

        with locked():
            index = claim_worker_index(study)
        study.sampler = make_sampler(sweep, worker_seed(sweep.seed, index), parallel=True)
        profiler = ArchitectureProfiler(study, apply_overrides(base, sweep.overrides),
                                        throughput=sweep.uses_throughput(), locked=locked)
        objective = objective_for(sweep, base, Path(settings.runs_dir) / settings.study_name, profiler,
                                  locked=locked, recover=lambda: recover_dead_trials(study, storage))
        objectives = list(sweep.objectives)
        budget = settings.n_trials
        heartbeat = is_heartbeat_enabled(storage)
        while True:
            if settings.deadline is not None and time.time() >= settings.deadline:
                print(f"{prefix}--timeout reached; no new trials", flush=True)
                break
            with locked():
                if heartbeat:  # PostgreSQL: trials of machines that stopped beating
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ExperimentalWarning)
                        optuna.storages.fail_stale_trials(study)
                for number, retried in recover_dead_trials(study, storage):
                    print(f"{prefix}trial {number}: its process is gone; failed"
                          + (" and queued again" if retried else ", not retried (killed too often)"), flush=True)
                counted, waiting = count_budget(study)
                if not waiting and budget is not None and counted >= budget:
                    break
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "heartbeat ... with Study.optimize": _tell runs it
                    trial = study.ask()  # a queued retry first
                # Before the lock goes: another worker must not take this trial for a dead one.
                trial.set_user_attr("fvlab_process", process_tag())
            _tell(study, trial, objective)
            gc.collect()
            print(_trial_line(study, trial.number, objectives, prefix), flush=True)
            trial = None
    except KeyboardInterrupt:
        if trial is None:
            print(f"{prefix}interrupted between trials", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        frozen = study._storage.get_trial(trial._trial_id)
        if frozen.state == TrialState.RUNNING:
            if frozen.user_attrs.get("fail_reason") is None:
                trial.set_user_attr("fail_reason", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            retry_trial(study, study._storage.get_trial(trial._trial_id))
        print(f"{prefix}interrupted: trial {trial.number} recorded as failed (interrupted) and "
              f"queued again; rerun the same command to resume", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _spawned_worker(settings: WorkerSettings) -> None:
    sys.exit(run_worker(settings))


def _cuda_devices() -> list[str]:
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(count)]


def run_workers(settings: WorkerSettings) -> int:
    """Run ``settings.workers`` worker processes (spawned) and wait for them; returns an exit code."""
    if settings.workers <= 1:
        return run_worker(settings)
    devices = _cuda_devices()
    context = multiprocessing.get_context("spawn")
    processes = []
    for index in range(settings.workers):
        own = WorkerSettings(**{**settings.__dict__, "worker": index})
        if devices:
            own.cuda_device = devices[index % len(devices)]
        else:
            own.threads = worker_threads(settings.workers)
        process = context.Process(target=_spawned_worker, args=(own,), name=f"fvlab-sweep-{index}")
        process.start()
        processes.append(process)

    def forward(signum: int, frame: Any) -> None:
        # Workers stop on the first SIGINT or SIGTERM and ignore repeats.
        for process in processes:
            if process.is_alive() and process.pid:
                os.kill(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for process in processes:
            while process.is_alive():
                process.join(timeout=1.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [p.exitcode for p in processes]
    if any(code == EXIT_INTERRUPTED for code in codes):
        return EXIT_INTERRUPTED
    return 0 if all(code == 0 for code in codes) else 1
