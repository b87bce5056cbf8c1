"""What multi-objective successive halving (`pruner: rungs`) saves and keeps of the front, over repetitions.

The task and space are benchmarks/supernet_rank.py's: fastervit_micro on cluttered digits at
32 px (experiments/cluttered.yaml, a task on which architectures differ), stage-1 width ``dim``
x stage depths x HAT in stage 3 on/off (40 networks), 4 epochs, rungs at epoch 1 and 3
(``min_epochs: 1, reduction_factor: 3``), objectives val/acc1_best and model/throughput.

The ground truth: every architecture of the grid trained with K = 3 seeds by real grid sweeps
(fvlab's workers, one worker) that record each trial's objectives at the rung epochs and never
stop one (``--from-runs DIR`` reuses the grid sweeps of a supernet_rank run instead). Each
repetition r draws ``--trials`` architectures (the base experiment's first: it is trial 0 of
every study) in a random order (seed ``seed + r``), and for each seed s replays every promotion
rule of `pruner: rungs` (`nsga2`, `epsilon_net`, `first_front`: the default) on seed s's
records with fvlab's own rung decision, trial by trial as one worker decides. A trial stopped
at epoch k would have trained exactly the first k epochs of its full run (same seed, same
schedule), so the replay is the arm without training it again.

Scored like with like (fvlab.sweep.rank_quality): the front an arm keeps is chosen on seed s's
accuracies and scored on the held-out target of seed s (the mean of the other seeds) with the
side-by-side speedups, as a share of the true front's hypervolume on that target. Each rule
has its own random control: as many stops per rung as that rule made, at random (never the
reference), ``--draws`` draws averaged. Shares are averaged over seeds per repetition; means
over repetitions carry 95% t intervals, and a rule minus its control is the paired difference
per repetition. ``rung1_tau`` is the Kendall tau of the rung-1 accuracy of seed s against the
target without seed s over the whole grid, averaged over s (with its bootstrap interval): how
much an early rung knows.

    python benchmarks/search_cost.py                          # train the grid: K x 40 runs of 4 epochs
    python benchmarks/search_cost.py --from-runs /tmp/srank   # replay a supernet_rank run's grid, no training
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from fvlab.metrics import THROUGHPUT, VAL_ACC1_BEST

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "experiments" / "cluttered.yaml"
DIMS = [8, 16, 24, 32]
DEPTHS = [[1, 1, 1, 1], [1, 1, 2, 1], [2, 2, 1, 1], [1, 1, 3, 1], [2, 2, 2, 1]]
HAT = [[False, False, True, False], False]
SPACE = {"model.arch.dim": {"choices": DIMS}, "model.arch.depths": {"choices": DEPTHS},
         "model.arch.hat": {"choices": HAT}}
OBJECTIVES = {VAL_ACC1_BEST: "maximize", THROUGHPUT: "maximize"}
DIRECTIONS = list(OBJECTIVES.values())
MIN_EPOCHS, REDUCTION_FACTOR = 1, 3


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a repetition's full arm: what every replayed arm decides from."""

    number: int
    values: tuple[float, ...] | None  # final objectives (None: the trial failed)
    rungs: Mapping[int, tuple[float, ...]] = field(default_factory=dict)  # rung epochs -> objectives there
    epochs: int = 0  # epochs its run trained (0: a duplicate, told its original's values)
    reference: bool = False  # trial 0, the base experiment's settings: never stopped
    duplicate_of: int | None = None


def _with_interval(mean: float, test: Any, confidence: float) -> tuple[float, float, float]:
    interval = test.confidence_interval(confidence)
    return mean, float(interval.low), float(interval.high)


def t_interval(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean with its two-sided t interval (NaN bounds for one sample)."""
    from scipy import stats

    data = np.asarray(samples, dtype=float)
    if len(data) < 2:
        return float(data.mean()), math.nan, math.nan
    with warnings.catch_warnings():  # identical samples: scipy warns, and the interval is the point itself
        warnings.simplefilter("ignore", RuntimeWarning)
        return _with_interval(float(data.mean()), stats.ttest_1samp(data, 0.0), confidence)


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the per-repetition differences a - b: the paired t interval."""
    from scipy import stats

    if len(a) != len(b):  # scipy would broadcast a single sample against the other
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) < 2:
        return float(diff.mean()), math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _with_interval(float(diff.mean()), stats.ttest_rel(a, b), confidence)


def replay(records: Sequence[TrialRecord], rungs: Sequence[int], promotion: str = "nsga2",
           plan: Mapping[int, int] | None = None, reduction_factor: int = REDUCTION_FACTOR,
           directions: Sequence[str] = DIRECTIONS) -> dict[int, int | None]:
    """Trial number -> the rung (epochs) where the arm stops it, or None where it completes.

    Decided in trial-number order, each trial seeing the rung values of the earlier trials that
    reached the rung, as one sweep worker decides; ``plan`` (trial -> rung) replaces the rule by
    fixed stops (the random control). A duplicate shares its original's fate.
    """
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from fvlab.sweep.attrs import RUNG_ATTR
    from fvlab.sweep.rungs import decide

    outcome: dict[int, int | None] = {}
    reached: dict[int, list[Any]] = {rung: [] for rung in rungs}
    for record in sorted(records, key=lambda r: r.number):
        if record.values is None:
            continue
        if record.duplicate_of is not None:
            outcome[record.number] = outcome.get(record.duplicate_of)
            continue
        stop = None
        for rung in rungs:
            if rung not in record.rungs:
                break
            frozen = create_trial(state=TrialState.COMPLETE, values=list(record.values),
                                  params={"n": float(record.number)},
                                  distributions={"n": FloatDistribution(0.0, 1e9)},
                                  user_attrs={f"{RUNG_ATTR}{rung}": list(record.rungs[rung])})
            frozen.number = record.number
            reached[rung].append(frozen)
            if plan is not None:
                go_on = plan.get(record.number) != rung
            else:
                go_on = decide(reached[rung], record.number, rung, directions, reduction_factor, promotion).go_on
            if not go_on and not record.reference:
                stop = rung
                break
        outcome[record.number] = stop
    return outcome


def stopped_per_rung(records: Sequence[TrialRecord], outcome: Mapping[int, int | None]) -> dict[int, int]:
    """Rung -> how many trained trials (duplicates left out) the arm stopped there."""
    counts: dict[int, int] = {}
    for record in records:
        rung = outcome.get(record.number)
        if record.duplicate_of is None and rung is not None:
            counts[rung] = counts.get(rung, 0) + 1
    return dict(sorted(counts.items()))


def random_plan(records: Sequence[TrialRecord], stopped: Mapping[int, int], rng: random.Random) -> dict[int, int]:
    """Trial -> rung for a random control: as many stops per rung as ``stopped``, among the trials a
    pruner may stop (trained, not the reference), none stopped twice."""
    candidates = [r.number for r in sorted(records, key=lambda r: r.number)
                  if r.duplicate_of is None and not r.reference and r.values is not None]
    plan: dict[int, int] = {}
    for rung in sorted(stopped):
        free = [n for n in candidates if n not in plan]
        plan.update(dict.fromkeys(rng.sample(free, min(stopped[rung], len(free))), rung))
    return plan


def arm_epochs(records: Sequence[TrialRecord], outcome: Mapping[int, int | None]) -> int:
    """Epochs the arm trains: a stopped trial its rung's epochs, a complete one its full run's."""
    total = 0
    for record in records:
        if record.duplicate_of is None and record.values is not None:
            rung = outcome.get(record.number)
            total += record.epochs if rung is None else min(rung, record.epochs)
    return total


# ---- running the real sweeps --------------------------------------------------------------------


def write_sweep(folder: Path, study: str, seed: int, epochs: int = 4, train_batches: int = 0,
                dims: Sequence[int] = DIMS, depths: int = len(DEPTHS), promotion: str = "first_front",
                supernet: Mapping[str, Any] | None = None) -> Path:
    """A grid sweep over the space with training seed ``seed``: stand-alone with `pruner: rungs`
    (the record-only arm never stops a trial) or one-shot (``supernet``)."""
    space = {**SPACE, "model.arch.dim": {"choices": list(dims)}, "model.arch.depths": {"choices": DEPTHS[:depths]}}
    overrides: dict[str, Any] = {"trainer.max_epochs": epochs, "seed_everything": seed,
                                 "trainer.enable_progress_bar": False}
    if train_batches:
        overrides["trainer.limit_train_batches"] = train_batches
    n = len(dims) * depths * len(HAT)
    sweep: dict[str, Any] = {"study": study, "experiment": str(BASE), "space": space, "objectives": OBJECTIVES,
                             "sampler": {"name": "grid", "seed": 0}, "n_trials": n, "overrides": overrides}
    if supernet is None:
        sweep["pruner"] = {"name": "rungs", "min_epochs": MIN_EPOCHS, "reduction_factor": REDUCTION_FACTOR,
                           "promotion": promotion}
    else:
        sweep["supernet"] = dict(supernet)
    path = Path(folder) / f"{study}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def train_grid(runs: Path, seeds: int, **grid: Any) -> tuple[list[optuna.Study], dict[str, Any]]:
    """The grid trained stand-alone once per seed (rung values recorded, nothing stopped); the
    studies and their shared measurements (one scale, one measurement per network)."""
    from fvlab.sweep.attrs import ARCH_ATTR, SCALE_ATTR

    folder = runs / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    started, shared, studies = time.perf_counter(), {}, []
    for seed in range(seeds):
        studies.append(run_arm(write_sweep(folder, f"standalone_s{seed}", seed, **grid), runs, shared,
                               record_only=True))
        shared.update({k: v for k, v in studies[-1].user_attrs.items() if k.startswith(ARCH_ATTR) or k == SCALE_ATTR})
        print(f"stand-alone seed {seed}: {time.perf_counter() - started:.0f} s so far", flush=True)
    return studies, shared


def grid_studies(runs: Path, seeds: int) -> list[optuna.Study]:
    """The grid sweeps a supernet_rank or search_cost run kept in ``runs`` (``--runs-dir``)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    studies = []
    for seed in range(seeds):
        journal = Path(runs) / f"standalone_s{seed}" / "study.journal"
        if not journal.is_file():
            raise SystemExit(f"--from-runs: no {journal}; run supernet_rank.py or search_cost.py with --runs-dir first")
        studies.append(optuna.load_study(study_name=f"standalone_s{seed}",
                                         storage=JournalStorage(JournalFileBackend(str(journal)))))
    return studies


def record_only_pruner(sweep: Any) -> optuna.pruners.BasePruner:
    """The sweep's `pruner: rungs`, recording every rung's values but never stopping a trial: the full arm."""
    from fvlab.sweep.rungs import RungDecision, RungsPruner

    class RecordOnly(RungsPruner):
        """Records like RungsPruner (the callback still writes rung_<epochs>); every trial goes on."""

        def decide(self, study: optuna.Study, number: int, epochs: int) -> RungDecision:
            return RungDecision(epochs=epochs, go_on=True, rank=0, trials=0, keep=0, front=0)

    return RecordOnly(**sweep.pruner_options)


def run_arm(path: Path, runs: Path, shared: Mapping[str, Any], record_only: bool) -> optuna.Study:
    """Run one study in this process (one worker), its architecture figures and scale from ``shared``."""
    from fvlab.sweep.command import open_study, prepare_sweep
    from fvlab.sweep.workers import WorkerSettings, run_workers

    args = argparse.Namespace(sweep=str(path), n_trials=None, timeout=None, workers=1, study_name=None,
                              storage=None, runs_dir=str(runs), confirm=False)
    sweep, _, kind = prepare_sweep(args)
    journal = runs / sweep.study / "study.journal"
    _, study = open_study(args, sweep, kind, journal)
    for key, value in shared.items():  # one scale and one measurement per architecture for all studies
        study.set_user_attr(key, value)
    code = run_workers(WorkerSettings(sweep_path=str(path), study_name=sweep.study, n_trials=sweep.n_trials,
                                      storage=None, journal=str(journal), runs_dir=str(runs)),
                       pruner_factory=record_only_pruner if record_only else None)
    if code != 0:
        raise SystemExit(f"{sweep.study}: the workers ended with {code}")
    return study


def records_of(study: optuna.Study, rungs: Sequence[int]) -> list[TrialRecord]:
    """The study's trials as records: final values, rung values, epochs trained."""
    from fvlab.sweep.attrs import DUPLICATE_OF, REFERENCE, RUN_DIR, RUNG_ATTR

    records = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        run_dir = attrs.get(RUN_DIR)
        metrics = Path(run_dir) / "metrics.json" if run_dir else None
        epochs = 0
        if attrs.get(DUPLICATE_OF) is None and metrics is not None and metrics.is_file():
            epochs = int(json.loads(metrics.read_text()).get("epochs") or 0)
        records.append(TrialRecord(
            number=trial.number, values=tuple(trial.values) if trial.state == TrialState.COMPLETE else None,
            rungs={r: tuple(attrs[f"{RUNG_ATTR}{r}"]) for r in rungs if f"{RUNG_ATTR}{r}" in attrs},
            epochs=epochs, reference=bool(attrs.get(REFERENCE)), duplicate_of=attrs.get(DUPLICATE_OF)))
    return records


def quiet_setup(profile_rounds: int) -> str:
    """A benchmark process's set-up: side-by-side rounds, quiet logs, the allocator tuned; the CPU's name."""
    os.environ["FVLAB_PROFILE_ROUNDS"] = str(profile_rounds)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from fvlab.runtime import cpu_description, quiet_lightning, tune_allocator

    quiet_lightning()
    tune_allocator()
    return cpu_description()[0]


def _fmt(interval: tuple[float, float, float]) -> str:
    mean, lo, hi = interval
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


@dataclass
class Grid:
    """The grid's records per seed, by architecture (the base's first), and the held-out targets."""

    archs: list[str]
    records: list[dict[str, TrialRecord]]  # per seed: architecture -> its trial's record
    targets: np.ndarray  # (archs, K): each architecture's mean final accuracy over the other seeds


def grid_of(studies: Sequence[optuna.Study], rungs: Sequence[int]) -> Grid:
    """The grid sweeps as records by architecture, complete in every seed."""
    from fvlab.sweep.rank_quality import held_out_targets

    per_seed = []
    for study in studies:
        records = {r.number: r for r in records_of(study, rungs)}
        per_seed.append({json.dumps(t.params, sort_keys=True): records[t.number]
                         for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE})
    common = [a for a in per_seed[0] if all(a in p for p in per_seed)]
    base = next(a for a in common if per_seed[0][a].reference)
    archs = [base, *sorted(a for a in common if a != base)]
    acc = np.array([[p[a].values[0] for p in per_seed] for a in archs])
    return Grid(archs, per_seed, held_out_targets(acc))


def seed_records(grid: Grid, picks: Sequence[int], seed: int) -> list[TrialRecord]:
    """Seed ``seed``'s records of the picked architectures, numbered in the repetition's order
    (trial 0 the base: the reference, which no pruner stops)."""
    return [TrialRecord(i, grid.records[seed][grid.archs[a]].values, grid.records[seed][grid.archs[a]].rungs,
                        grid.records[seed][grid.archs[a]].epochs, reference=i == 0) for i, a in enumerate(picks)]


def front_share(records: Sequence[TrialRecord], outcome: Mapping[int, int | None], targets: np.ndarray) -> float:
    """The hypervolume of the front an arm keeps (chosen on its own run's accuracies), scored on the
    held-out ``targets`` with the measured speeds, as a share of the true front's on them."""
    from fvlab.sweep.rank_quality import front_hypervolume, front_of

    speed = np.array([r.values[1] for r in records])
    kept = np.array([outcome.get(r.number) is None for r in records])
    index = np.flatnonzero(kept)
    picked = np.zeros(len(records), dtype=bool)
    picked[index[np.array(front_of([records[i].values[0] for i in index], speed[index]), dtype=bool)]] = True
    true = front_hypervolume(front_of(targets, speed), targets, speed)
    return front_hypervolume(picked, targets, speed) / true if true else math.nan


def repetition_scores(grid: Grid, picks: Sequence[int], rules: Sequence[str], rungs: Sequence[int],
                      draws: int, rng: random.Random) -> dict[str, dict[str, float]]:
    """Per rule: epochs share, hypervolume share and its own random control's, averaged over seeds."""
    scores = {rule: {"epochs": [], "hv": [], "random_hv": []} for rule in rules}
    for s in range(grid.targets.shape[1]):
        records, targets = seed_records(grid, picks, s), grid.targets[list(picks), s]
        full = arm_epochs(records, {})
        for rule in rules:
            outcome = replay(records, rungs, rule)
            stopped = stopped_per_rung(records, outcome)
            randoms = [front_share(records, replay(records, rungs, plan=random_plan(records, stopped, rng)), targets)
                       for _ in range(draws)]
            scores[rule]["epochs"].append(arm_epochs(records, outcome) / full)
            scores[rule]["hv"].append(front_share(records, outcome, targets))
            scores[rule]["random_hv"].append(float(np.mean(randoms)))
    return {rule: {k: float(np.mean(v)) for k, v in figures.items()} for rule, figures in scores.items()}


def rung1_quality(grid: Grid, rungs: Sequence[int]) -> Any:
    """Kendall tau of each seed's rung-1 accuracy against the target without that seed, over the grid."""
    from fvlab.sweep.rank_quality import per_seed_rank_quality

    first = np.array([[p[a].rungs[rungs[0]][0] for p in grid.records] for a in grid.archs])
    acc = np.array([[p[a].values[0] for p in grid.records] for a in grid.archs])
    return per_seed_rank_quality(first, acc, seed=1)


def print_summary(reps: Sequence[Mapping[str, Mapping[str, float]]], rules: Sequence[str], headline: str,
                  rung1: Any, seconds: float) -> None:
    """The per-rule table, the goal and the last line."""
    print("| rule | epochs share, mean [95%] | hypervolume share [95%] | its random control [95%] | "
          "minus its control (paired) |")
    print("|---|---|---|---|---|")
    for rule in rules:
        series = {k: [rep[rule][k] for rep in reps] for k in ("epochs", "hv", "random_hv")}
        print(f"| {rule} | {_fmt(t_interval(series['epochs']))} | {_fmt(t_interval(series['hv']))} | "
              f"{_fmt(t_interval(series['random_hv']))} | {_fmt(paired_interval(series['hv'], series['random_hv']))} |")
    head = {k: [rep[headline][k] for rep in reps] for k in ("epochs", "hv", "random_hv")}
    epochs, hv = t_interval(head["epochs"]), t_interval(head["hv"])
    random_hv, diff = t_interval(head["random_hv"]), paired_interval(head["hv"], head["random_hv"])
    met = epochs[0] <= 0.5 and hv[0] >= 0.9 and diff[1] > 0
    print(f"rung-1 accuracy against the held-out target over the grid: {rung1.line()}")
    print(f"goal ({headline}: mean epochs share <= 50%, mean hypervolume share >= 90%, paired interval over its "
          f"random control above zero): {'met' if met else 'NOT met'}; {seconds:.0f} s")
    print(f"search_cost: epochs={_fmt(epochs)} hv={_fmt(hv)} random_hv={_fmt(random_hv)} diff={_fmt(diff)} "
          f"repeats={len(reps)} rung1_tau={rung1.tau:.2f} [{rung1.tau_ci[0]:.2f}, {rung1.tau_ci[1]:.2f}]")


def main() -> None:
    """Train (or read) the grid, replay the repetitions, print per-repetition figures and the summary."""
    from fvlab.sweep.space import PROMOTIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trials", type=int, default=12, help="architectures per repetition (the base first)")
    parser.add_argument("--seeds", type=int, default=3, help="stand-alone seeds per architecture (K >= 3)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-batches", type=int, default=0, help="trainer.limit_train_batches (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="repetition r draws its trials with seed + r")
    parser.add_argument("--promotion", choices=PROMOTIONS, default="first_front", help="the rule of the last line")
    parser.add_argument("--draws", type=int, default=100, help="random controls averaged per repetition and seed")
    parser.add_argument("--profile-rounds", type=int, default=10,
                        help="side-by-side rounds per architecture (FVLAB_PROFILE_ROUNDS)")
    parser.add_argument("--from-runs", help="replay the grid sweeps kept in this directory instead of training")
    parser.add_argument("--runs-dir", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    if args.repeats < 2 or args.seeds < 3:
        parser.error("--repeats: at least 2 (an interval needs two); --seeds: at least 3 (held-out targets)")
    cpu = quiet_setup(args.profile_rounds)
    from fvlab.sweep.space import rung_epochs

    import torch

    rungs = rung_epochs(MIN_EPOCHS, REDUCTION_FACTOR, args.epochs)
    print(f"# {args.repeats} repetitions x {args.trials} trials of the {len(DIMS) * len(DEPTHS) * len(HAT)}-network "
          f"grid, {args.seeds} seeds, max_epochs {args.epochs} (rungs at {rungs}), cluttered digits at 32 px, "
          f"fastervit_micro; {cpu}, {torch.get_num_threads()} threads", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.from_runs:
            studies = grid_studies(Path(args.from_runs), args.seeds)
        else:
            studies = train_grid(Path(args.runs_dir or tmp), args.seeds, epochs=args.epochs,
                                 train_batches=args.train_batches)[0]
        grid = grid_of(studies, rungs)
    rules, reps = list(PROMOTIONS), []
    for r in range(args.repeats):
        rng = random.Random(args.seed + r)
        picks = [0, *rng.sample(range(1, len(grid.archs)), min(args.trials, len(grid.archs)) - 1)]
        reps.append(repetition_scores(grid, picks, rules, rungs, args.draws, rng))
        print(f"repetition {r + 1}: " + ", ".join(
            f"{rule} {reps[-1][rule]['epochs']:.0%} epochs / hv {reps[-1][rule]['hv']:.1%} (random "
            f"{reps[-1][rule]['random_hv']:.1%})" for rule in rules), flush=True)
    print_summary(reps, rules, args.promotion, rung1_quality(grid, rungs), time.perf_counter() - started)


if __name__ == "__main__":
    main()
