"""Sweep workers: each runs trials of one study until its budget of ``n_trials`` is spent.

``n_trials`` is a total over every rerun, worker and machine: before each trial a worker
takes the study's budget lock, recovers trials whose process died, counts the trials that are
finished, running or waiting (a failed trial that was enqueued again counts once, as its
retry) and runs one more trial (``study.optimize(n_trials=1)``) only while the count is below
the budget; the trial carries its process tag and its parameters before the lock is released.
Each worker claims an index in the study, in start order, and seeds its
sampler from ``sampler.seed`` and that index: workers propose different configurations, and a
single worker with a fixed seed repeats its search. ``--workers K``
spawns K processes (not forked: CUDA and OpenMP do not survive a fork), each with its own
storage connection, its own GPU (``CUDA_VISIBLE_DEVICES``) or cores/K CPU threads.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from fvlab.sweep.attrs import DUPLICATE_OF, FAIL_REASON, PROCESS, PRUNED_REASON, RUN_NAME, WORKERS_ATTR
from fvlab.sweep.space import PRUNER_CLASSES, SAMPLER_CLASSES, SweepSpec

__all__ = ["WorkerSettings", "GridSampler", "budget_spent", "count_budget", "make_sampler", "make_pruner", "run_worker", "run_workers",
           "worker_seed", "worker_threads", "claim_worker_index", "EXIT_INTERRUPTED",
           "PrunerFactory"]

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = 130
# Builds a study's pruner from its sweep (make_pruner is the sweep file's own).
PrunerFactory = Callable[[SweepSpec], optuna.pruners.BasePruner | None]


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
    from fvlab.sweep.storage import retried_numbers

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    counted = sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return counted, waiting


def budget_spent(study: optuna.Study, n_trials: int | None) -> bool:
    """Whether workers would find nothing to do: the budget counted, no trial waiting or running.

    A running trial may be a dead worker's, which only a worker recovers (and queues again).
    """
    if n_trials is None:
        return False
    counted, waiting = count_budget(study)
    running = any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
    return counted >= n_trials and not waiting and not running


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


class GridSampler(optuna.samplers.BaseSampler):
    """Every combination of a discrete space once, in an order seeded per worker.

    Optuna's GridSampler numbers the points of its own shuffle, so workers with different seeds
    (every worker, every rerun) would read each other's points wrong; this one names a point by
    its values. The worker queues each trial's point (:meth:`enqueue_next`) under the budget lock
    and draws the trial's parameters before releasing it, so the next worker sees the point as
    taken. A trial already queued (the reference, a retry) is asked before a new point is queued,
    and keeps its own parameters.
    """

    def __init__(self, search_space: Mapping[str, Sequence[Any]], seed: int | None = None):
        self._names = sorted(search_space)
        combos = list(itertools.product(*(list(search_space[name]) for name in self._names)))
        order = np.random.default_rng(seed).permutation(len(combos))
        self.points = [dict(zip(self._names, combos[i])) for i in order]

    def _key(self, params: Mapping[str, Any]) -> tuple | None:
        if any(name not in params for name in self._names):
            return None
        # Floats of a stepped range compare by value (0.1 + 2 * 0.1 is not 0.3).
        return tuple(float(f"{v:.12g}") if isinstance(v, float) else v for v in (params[n] for n in self._names))

    def next_point(self, trials: Sequence[FrozenTrial]) -> dict[str, Any]:
        """The first point of this sampler's order that no trial holds (the first one when all are held)."""
        taken = {self._key(t.params) for t in trials}
        return dict(next((p for p in self.points if self._key(p) not in taken), self.points[0]))

    def enqueue_next(self, study: optuna.Study) -> None:
        """Queue a trial at the next point; call under the budget lock, with no trial waiting."""
        study.enqueue_trial(self.next_point(study.get_trials(deepcopy=False)))

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        """Nothing: every trial of a grid search is queued with its parameters."""
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        """Nothing: every trial of a grid search is queued with its parameters."""
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        """Never called for a queued trial; a trial asked without one has no point."""
        raise RuntimeError(f"trial {trial.number}: {param_name} is not set; a grid search's trials are queued "
                           f"with their point (GridSampler.enqueue_next) before they are asked")


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
            return GridSampler(sweep.grid_search_space(), seed=seed, **options)
        return cls(seed=seed, **options)


def make_pruner(sweep: SweepSpec) -> optuna.pruners.BasePruner | None:
    """The sweep's pruner, or None."""
    if sweep.pruner is None:
        return None
    if sweep.pruner == "rungs":
        from fvlab.sweep.rungs import RungsPruner

        return RungsPruner(**sweep.pruner_options)
    return PRUNER_CLASSES[sweep.pruner](**sweep.pruner_options)


def _raise_interrupt(signum: int, frame: Any) -> None:
    # The first SIGINT/SIGTERM stops the trial; a second one (Ctrl-C reaches every process of
    # the group, and the parent forwards it too) must not break the recording of that stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _trial_line(study: optuna.Study, number: int, objectives: list[str], prefix: str) -> str:
    trial = _frozen(study, number)
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        what = " ".join(f"{m}={v:.4g}" for m, v in zip(objectives, trial.values))
        if attrs.get(DUPLICATE_OF) is not None:
            what += f" (duplicate of trial {attrs[DUPLICATE_OF]}, not trained)"
    elif trial.state == TrialState.PRUNED:
        what = f"pruned: {attrs.get(PRUNED_REASON)}"
    else:
        what = f"{trial.state.name.lower()}: {attrs.get(FAIL_REASON)}"
    return f"{prefix}trial {number} ({attrs.get(RUN_NAME, '?')}): {what}"


def _prefix(settings: WorkerSettings) -> str:
    return f"[{settings.study_name}{f' w{settings.worker}' if settings.workers > 1 else ''}] "


def _frozen(study: optuna.Study, number: int) -> FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


@dataclass
class _Worker:
    """One worker's study, objective and budget; :meth:`run` runs its trials."""

    settings: WorkerSettings
    sweep: SweepSpec
    study: optuna.Study
    storage: BaseStorage
    locked: Callable[[], contextlib.AbstractContextManager[None]]  # the study's budget lock
    objective: Callable[[optuna.Trial], Any]
    trial: optuna.Trial | None = None  # the trial running now
    interrupted: bool = False  # an interrupt left the objective of ``trial``

    @property
    def prefix(self) -> str:
        """What starts each line this worker prints."""
        return _prefix(self.settings)

    def run(self) -> None:
        """Run trials until the budget is spent or the deadline passes."""
        from fvlab.sweep.objective import TrialFailed

        while True:
            if self.settings.deadline is not None and time.time() >= self.settings.deadline:
                print(f"{self.prefix}--timeout reached; no new trials", flush=True)
                return
            with contextlib.ExitStack() as held:
                held.enter_context(self.locked())
                if not self._room_for_a_trial():
                    return
                # optimize() asks under the lock, beats the trial's heartbeat (PostgreSQL) and tells
                # it its end: PRUNED, FAIL (TrialFailed: the reason is in its user_attrs) or COMPLETE.
                self.study.optimize(lambda trial: self._run_trial(trial, held), n_trials=1, catch=(TrialFailed,))
            gc.collect()
            print(_trial_line(self.study, self.trial.number, list(self.sweep.objectives), self.prefix), flush=True)
            self.trial = None

    def _room_for_a_trial(self) -> bool:
        """Under the lock: recover dead trials; whether the budget has room (a grid point is then queued)."""
        from fvlab.sweep.storage import recover_dead_trials

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)  # PostgreSQL: trials of machines that stopped beating
        for number, retried in recover_dead_trials(self.study, self.storage):
            print(f"{self.prefix}trial {number}: its process is gone; failed"
                  + (" and queued again" if retried else ", not retried (killed too often)"), flush=True)
        counted, waiting = count_budget(self.study)
        budget = self.settings.n_trials
        if not waiting and budget is not None and counted >= budget:
            return False
        if not waiting and isinstance(self.study.sampler, GridSampler):  # a queued retry goes first
            self.study.sampler.enqueue_next(self.study)
        return True

    def _run_trial(self, trial: optuna.Trial, held: contextlib.ExitStack) -> Any:
        """The objective as optimize() calls it, on the trial it asked while the lock is ``held``."""
        from fvlab.sweep.objective import TrialFailed
        from fvlab.sweep.storage import process_tag

        self.trial = trial
        try:
            # Before the lock goes: another worker must not take this trial for a dead one, and
            # sees its parameters (the grid's point, TPE's constant liar).
            trial.set_user_attr(PROCESS, process_tag())
            for param in self.sweep.space.values():
                param.suggest(trial)
            held.close()
            return self.objective(trial)
        except KeyboardInterrupt:
            self.interrupted = True
            if trial.user_attrs.get(FAIL_REASON) is None:
                trial.set_user_attr(FAIL_REASON, "interrupted")
            raise
        except (optuna.TrialPruned, TrialFailed):
            raise
        except Exception as err:
            if trial.user_attrs.get(FAIL_REASON) is None:
                trial.set_user_attr(FAIL_REASON, f"{type(err).__name__}: {err}")
            raise

    def stop(self) -> int:
        """After an interrupt: the running trial failed (interrupted) and queued again; the exit code."""
        from fvlab.sweep.storage import retry_trial

        if self.trial is None:
            print(f"{self.prefix}interrupted between trials", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        trial, frozen = self.trial, _frozen(self.study, self.trial.number)
        if frozen.state == TrialState.RUNNING:  # interrupted before optimize() told it
            if frozen.user_attrs.get(FAIL_REASON) is None:
                trial.set_user_attr(FAIL_REASON, "interrupted")
            self.study.tell(trial, state=TrialState.FAIL)
        elif not (frozen.state == TrialState.FAIL and self.interrupted):  # it had ended
            print(f"{self.prefix}interrupted between trials", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        retry_trial(self.study, _frozen(self.study, trial.number))
        print(f"{self.prefix}interrupted: trial {trial.number} recorded as failed (interrupted) and "
              f"queued again; rerun the same command to resume", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _open_worker(settings: WorkerSettings, pruner_factory: PrunerFactory | None = None) -> _Worker:
    """Load the study, claim a worker index, seed the sampler and build the objective."""
    from fvlab.experiment import load_experiment
    from fvlab.lit.build import apply_overrides
    from fvlab.sweep.objective import ArchitectureProfiler
    from fvlab.sweep.oneshot import objective_for
    from fvlab.sweep.space import load_sweep
    from fvlab.sweep.storage import budget_lock, open_storage, recover_dead_trials

    sweep = load_sweep(settings.sweep_path, study_name=settings.study_name, n_trials=settings.n_trials,
                       overrides=settings.overrides)
    base = load_experiment(sweep.experiment).base_config()
    storage = open_storage(settings.storage, Path(settings.journal))
    study = optuna.load_study(study_name=settings.study_name, storage=storage,
                              pruner=(pruner_factory or make_pruner)(sweep))

    def locked() -> contextlib.AbstractContextManager[None]:
        return budget_lock(storage, settings.storage, Path(settings.journal), settings.study_name)

    with locked():
        index = claim_worker_index(study)
    study.sampler = make_sampler(sweep, worker_seed(sweep.seed, index), parallel=True)
    profiler = ArchitectureProfiler(study, apply_overrides(base, sweep.overrides),
                                    throughput=sweep.uses_throughput(), locked=locked)
    objective = objective_for(sweep, base, Path(settings.runs_dir) / settings.study_name, profiler,
                              locked=locked, recover=lambda: recover_dead_trials(study, storage))
    return _Worker(settings, sweep, study, storage, locked, objective)


def run_worker(settings: WorkerSettings, pruner_factory: PrunerFactory | None = None) -> int:
    """Run trials until the study's budget is spent (or the deadline passes); returns an exit code.

    ``pruner_factory`` builds the study's pruner from the sweep (default :func:`make_pruner`, the
    sweep file's own), so a caller can study another pruning rule on the same sweep.
    """
    from fvlab.runtime import tune_allocator

    tune_allocator()  # a spawned worker measures under the same allocator state as `fvlab fit`
    if settings.cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.cuda_device
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    # SIGTERM's default (or Lightning's, outside fit) would end the process with the trial RUNNING.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    verbosity = optuna.logging.get_verbosity()
    # Each trial's line says how it ended; Optuna would add a traceback for every failed one.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    worker = None
    try:
        worker = _open_worker(settings, pruner_factory)
        worker.run()
    except KeyboardInterrupt:
        if worker is None:
            print(f"{_prefix(settings)}interrupted between trials", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        return worker.stop()
    finally:
        optuna.logging.set_verbosity(verbosity)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _spawned_worker(settings: WorkerSettings, pruner_factory: PrunerFactory | None = None) -> None:
    import lightning.pytorch  # noqa: F401  (before the freeze, as `fvlab` does)

    from fvlab.runtime import frozen_heap

    with frozen_heap():
        code = run_worker(settings, pruner_factory)
    sys.exit(code)


def _cuda_devices() -> list[str]:
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(count)]


def run_workers(settings: WorkerSettings, pruner_factory: PrunerFactory | None = None) -> int:
    """Run ``settings.workers`` worker processes (spawned) and wait for them; returns an exit code.

    ``pruner_factory`` is :func:`run_worker`'s; with several workers it travels to spawned
    processes, so it must then be picklable (a module-level function).
    """
    if settings.workers <= 1:
        return run_worker(settings, pruner_factory)
    devices = _cuda_devices()
    context = multiprocessing.get_context("spawn")
    processes = []
    for index in range(settings.workers):
        own = WorkerSettings(**{**settings.__dict__, "worker": index})
        if devices:
            own.cuda_device = devices[index % len(devices)]
        else:
            own.threads = worker_threads(settings.workers)
        process = context.Process(target=_spawned_worker, args=(own, pruner_factory), name=f"fvlab-sweep-{index}")
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
