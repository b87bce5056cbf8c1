"""What multi-objective successive halving (`pruner: rungs`) saves and keeps of the front, over repetitions.

The search: 10 trials (trial 0 the reference) of fastervit_tiny on the embedded digits at 32 px, width (`dim` 8, 16, 32
or 64) and stage depths (1-1-1-1, 1-1-2-1, 2-2-2-1 or 1-1-4-1) in the space (16 distinct
models; the learning rate fixed at the base experiment's), objectives val/acc1_best and
model/throughput (both maximised), `trainer.max_epochs` 9 without warm-up, rungs at epochs 1
and 3 (`min_epochs: 1, reduction_factor: 3`).

Why this setting (chosen for an early rung that carries signal): width and depth change what a
model can learn, so a narrow or shallow model is expected to be behind at epoch 1 and still at
epoch 9, while the learning rate (left out: with it in the space, epoch 1 ranked the rate) and
the carrier-token count (left out) mostly move how fast the first epoch goes or a few of 270
validation images. Warm-up is off because a one-epoch warm-up makes the
first rung measure the warm-up, and batches of 16 keep BatchNorm statistics current (with
batches of 64 a model at 3e-3 still validated at chance after epoch 1; seen in a small run). An
epoch is 32 batches (``--train-batches``), to fit the time: with the whole split (80) one
repetition took about 10 minutes. Each repetition prints the Spearman correlation between the
accuracy at the first rung and the final accuracy over its trained trials: the check that the
first rung ranks like the end.

Each repetition r (sampler seed ``seed + r``, training seed ``seed + 100 + r``, all different):

- `full`: a real sweep (fvlab's workers, one worker) that trains every trial to the end and
  records each trial's objectives at the rung epochs (a pruner that records and never stops);
- every promotion rule of `pruner: rungs` (`nsga2`; `epsilon_net`; `first_front`, the default),
  replayed on those records with fvlab's own rung decision (`fvlab.sweep.rungs.decide`), trial
  by trial in number order as one worker decides: a trial stopped at epoch k would have
  trained exactly the first k epochs of its full run (same seed, same schedule over
  `max_epochs`), so the replay is the arm without training it again and without the run-to-run
  noise that made one-shot arms disagree;
- `random`: a control that stops as many trials at each rung as the headline rule
  (`--promotion`) did in that repetition, chosen at random (never the reference, trial 0, which
  no pruner stops); its hypervolume share is the mean over ``--draws`` random choices;
- `--live N` (default 1): in the first N repetitions the headline rule also runs as a real
  sweep with the real pruner, and the benchmark prints whether it stopped the same trials at the
  same rungs as the replay (the replay's premise, checked each time).

Hypervolume on one scale: throughput is measured once per architecture, side by side with the
reference, and the first measurement's reference throughput is stored and copied into every
later study (`fvlab_throughput_scale`, with the architectures' figures), so every trial of every
arm and repetition has `model/throughput` = its speedup x that one stored figure. The reference
point is fixed globally: the worst value of each objective over every repetition's full arm
(every arm's complete trials are among them). A share is an arm's hypervolume over its
repetition's full hypervolume; means over repetitions carry 95% t intervals, and rungs minus
random is the paired difference of the shares per repetition with its 95% paired t interval.

    python benchmarks/search_cost.py                          # 5 repetitions (~17 min on 2 quiet cores)
    python benchmarks/search_cost.py --repeats 2 --trials 6   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
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

ROOT = Path(__file__).resolve().parent.parent
# Architecture only (the base experiment's 32 x 1-1-2-1 among the choices: it is trial 0).
SPACE = {"model.arch.dim": {"choices": [8, 16, 32, 64]},
         "model.arch.depths": {"choices": [[1, 1, 1, 1], [1, 1, 2, 1], [2, 2, 2, 1], [1, 1, 4, 1]]}}
OBJECTIVES = {"val/acc1_best": "maximize", "model/throughput": "maximize"}
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


def repetition_seeds(repetition: int, seed: int = 0) -> tuple[int, int]:
    """(sampler seed, training seed) of repetition ``repetition`` (0-based): all different."""
    return seed + repetition, seed + 100 + repetition


def t_interval(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean with its two-sided t interval (NaN bounds for one sample)."""
    from scipy import stats

    data = np.asarray(samples, dtype=float)
    mean = float(data.mean())
    if len(data) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(data) - 1) * data.std(ddof=1) / math.sqrt(len(data)))
    return mean, mean - half, mean + half


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the per-repetition differences a - b: the paired t interval."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    return t_interval([x - y for x, y in zip(a, b)], confidence)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get mean ranks; NaN when either side is constant)."""
    from scipy import stats

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


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

    from fvlab.sweep.rungs import RUNG_ATTR, decide

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


def arm_points(records: Sequence[TrialRecord], outcome: Mapping[int, int | None]) -> list[list[float]]:
    """Final objectives of the trials the arm completes (the front is taken by the hypervolume)."""
    return [list(r.values) for r in records if r.values is not None and r.number in outcome
            and outcome[r.number] is None]


def worst_point(points: Sequence[Sequence[float]], directions: Sequence[str] = DIRECTIONS) -> list[float]:
    """The worst value of each objective over ``points``: the hypervolume's reference point."""
    return [(min if d == "maximize" else max)(p[i] for p in points) for i, d in enumerate(directions)]


def first_rung_spearman(records: Sequence[TrialRecord], rung: int) -> float:
    """Spearman correlation of the first objective at ``rung`` and at the end, over trained trials."""
    pairs = [(r.rungs[rung][0], r.values[0]) for r in records
             if r.duplicate_of is None and r.values is not None and rung in r.rungs]
    return spearman([a for a, _ in pairs], [b for _, b in pairs])


# ---- running the real sweeps --------------------------------------------------------------------


def write_sweep(folder: Path, study: str, trials: int, epochs: int, image_size: int, sampler_seed: int,
                training_seed: int, promotion: str = "nsga2", batch_size: int = 16,
                train_batches: int | None = None) -> Path:
    """A repetition's sweep file (every arm runs with `pruner: rungs`; the full arm's never stops)."""
    sweep = {"study": study, "experiment": str(ROOT / "experiments" / "baseline.yaml"), "space": SPACE,
             "objectives": OBJECTIVES, "sampler": {"name": "random", "seed": sampler_seed}, "n_trials": trials,
             "pruner": {"name": "rungs", "min_epochs": MIN_EPOCHS, "reduction_factor": REDUCTION_FACTOR,
                        "promotion": promotion},
             "overrides": {"trainer.max_epochs": epochs, "data.init_args.image_size": image_size,
                           "data.init_args.batch_size": batch_size, "model.warmup_epochs": 0,
                           "seed_everything": training_seed}}
    if train_batches:
        sweep["overrides"]["trainer.limit_train_batches"] = train_batches
    path = folder / f"{study}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run_arm(path: Path, runs: Path, shared: Mapping[str, Any], record_only: bool) -> optuna.Study:
    """Run one study in this process (one worker), its architecture figures and scale from ``shared``."""
    from fvlab.sweep import workers
    from fvlab.sweep.command import _open_study, prepare_sweep
    from fvlab.sweep.rungs import RungDecision, RungsPruner

    class RecordOnly(RungsPruner):
        """Records every rung's values and never stops a trial: the full arm."""

        def decide(self, study: optuna.Study, number: int, epochs: int) -> RungDecision:
            return RungDecision(epochs=epochs, go_on=True, rank=0, trials=0, keep=0, front=0)

    args = argparse.Namespace(sweep=str(path), n_trials=None, timeout=None, workers=1, study_name=None,
                              storage=None, runs_dir=str(runs), confirm=False)
    sweep, _, kind = prepare_sweep(args)
    journal = runs / sweep.study / "study.journal"
    _, study = _open_study(args, sweep, kind, journal)
    for key, value in shared.items():  # one scale and one measurement per architecture for all studies
        study.set_user_attr(key, value)
    original = workers.make_pruner
    if record_only:
        workers.make_pruner = lambda spec: RecordOnly(**spec.pruner_options)
    try:
        code = workers.run_workers(workers.WorkerSettings(
            sweep_path=str(path), study_name=sweep.study, n_trials=sweep.n_trials, storage=None,
            journal=str(journal), runs_dir=str(runs)))
    finally:
        workers.make_pruner = original
    if code != 0:
        raise SystemExit(f"{sweep.study}: the workers ended with {code}")
    return study


def records_of(study: optuna.Study, rungs: Sequence[int]) -> list[TrialRecord]:
    """The study's trials as records: final values, rung values, epochs trained."""
    from fvlab.sweep.rungs import RUNG_ATTR

    records = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        run_dir = attrs.get("run_dir")
        metrics = Path(run_dir) / "metrics.json" if run_dir else None
        epochs = 0
        if attrs.get("duplicate_of") is None and metrics is not None and metrics.is_file():
            epochs = int(json.loads(metrics.read_text()).get("epochs") or 0)
        records.append(TrialRecord(
            number=trial.number, values=tuple(trial.values) if trial.state == TrialState.COMPLETE else None,
            rungs={r: tuple(attrs[f"{RUNG_ATTR}{r}"]) for r in rungs if f"{RUNG_ATTR}{r}" in attrs},
            epochs=epochs, reference=bool(attrs.get("reference")), duplicate_of=attrs.get("duplicate_of")))
    return records


def live_outcome(study: optuna.Study) -> dict[int, int | None]:
    """Trial number -> the rung where the real pruner stopped it (None: complete)."""
    from fvlab.sweep.rungs import PRUNED_RUNG_ATTR

    return {t.number: (int(t.user_attrs[PRUNED_RUNG_ATTR]) if t.state == TrialState.PRUNED
                       and t.user_attrs.get(PRUNED_RUNG_ATTR) is not None else None)
            for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}


def same_stops(records: Sequence[TrialRecord], live: Mapping[int, int | None],
               replayed: Mapping[int, int | None]) -> bool:
    """Whether a live arm stopped the same trained trials at the same rungs as the replay (duplicates,
    told their original's values, left out)."""
    trained = [r.number for r in records if r.duplicate_of is None and r.values is not None]
    return all(n in live and live[n] == replayed.get(n) for n in trained)


def quiet_setup(profile_rounds: int) -> str:
    """A benchmark process's set-up: side-by-side rounds, quiet logs, the allocator tuned; the CPU's name."""
    os.environ["FVLAB_PROFILE_ROUNDS"] = str(profile_rounds)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from fvlab.runtime import quiet_lightning, tune_allocator

    quiet_lightning()
    tune_allocator()
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")), platform.processor())


def _fmt(interval: tuple[float, float, float]) -> str:
    mean, lo, hi = interval
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def main() -> None:
    """Run the repetitions and print per-repetition figures, per-arm intervals and the one-line summary."""
    from fvlab.sweep.front import PROMOTIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-batches", type=int, default=32,
                        help="training batches per epoch (trainer.limit_train_batches; 0: the whole split, 80)")
    parser.add_argument("--seed", type=int, default=0, help="repetition r: sampler seed+r, training seed seed+100+r")
    parser.add_argument("--promotion", choices=PROMOTIONS, default="first_front",
                        help="the rule of the summary line and of the random control's stop counts")
    parser.add_argument("--draws", type=int, default=200, help="random choices averaged per repetition")
    parser.add_argument("--live", type=int, default=1, help="repetitions whose headline rule also runs for real")
    parser.add_argument("--profile-rounds", type=int, default=20,
                        help="side-by-side rounds per architecture (FVLAB_PROFILE_ROUNDS)")
    parser.add_argument("--runs-dir", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats: at least 2 (an interval needs two repetitions)")
    cpu = quiet_setup(args.profile_rounds)
    from fvlab.sweep.front import hypervolume
    from fvlab.sweep.objective import ARCH_ATTR
    from fvlab.sweep.pareto import SCALE_ATTR
    from fvlab.sweep.attrs import reference_trial
    from fvlab.sweep.space import rung_epochs

    import torch

    rungs = rung_epochs(MIN_EPOCHS, REDUCTION_FACTOR, args.epochs)
    print(f"# {args.repeats} repetitions x {args.trials} trials, max_epochs {args.epochs} (rungs at {rungs}), "
          f"digits at {args.image_size} px, batch {args.batch_size} x {args.train_batches or 'all'} per epoch, fastervit_tiny; {cpu}, {torch.get_num_threads()} threads")
    rules = list(PROMOTIONS)
    started = time.perf_counter()
    reps: list[dict[str, Any]] = []
    shared: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp)
        folder = runs / "sweeps"
        folder.mkdir(parents=True, exist_ok=True)
        for r in range(args.repeats):
            sampler_seed, training_seed = repetition_seeds(r, args.seed)
            begun = time.perf_counter()
            full = run_arm(write_sweep(folder, f"full_r{r}", args.trials, args.epochs, args.image_size,
                                       sampler_seed, training_seed, batch_size=args.batch_size,
                                       train_batches=args.train_batches), runs, shared,
                       record_only=True)
            shared.update({k: v for k, v in full.user_attrs.items() if k.startswith(ARCH_ATTR) or k == SCALE_ATTR})
            reference = reference_trial(full)
            itself = reference.user_attrs.get("speedup") if reference is not None else None
            records = records_of(full, rungs)
            rep = {"seeds": (sampler_seed, training_seed), "records": records, "seconds": time.perf_counter() - begun,
                   "itself": itself,
                   "outcomes": {rule: replay(records, rungs, rule) for rule in rules}}
            rep["stopped"] = stopped_per_rung(records, rep["outcomes"][args.promotion])
            rng = random.Random(sampler_seed)
            rep["plans"] = [random_plan(records, rep["stopped"], rng) for _ in range(args.draws)]
            if r < args.live:
                live = run_arm(write_sweep(folder, f"live_r{r}", args.trials, args.epochs, args.image_size,
                                           sampler_seed, training_seed, args.promotion, args.batch_size,
                                           args.train_batches),
                               runs, shared, record_only=False)
                rep["live"] = same_stops(records, live_outcome(live), rep["outcomes"][args.promotion])
            reps.append(rep)
        every = [list(rec.values) for rep in reps for rec in rep["records"] if rec.values is not None]
        reference = worst_point(every)
        print(f"one throughput scale: the reference's {shared.get(SCALE_ATTR, {}).get('throughput', math.nan):.1f} "
              f"img/s stored once; reference point (worst over every full arm): val/acc1_best {reference[0]:.4f}, "
              f"model/throughput {reference[1]:.1f}")
        # Trial 0 builds the reference's network: a speedup far from 1 means a disturbed measurement.
        print(f"trial 0's speedup to the reference (the same network; 1 expected): "
              f"{reps[0]['itself'] if reps[0]['itself'] is None else round(reps[0]['itself'], 3)}")
        shares: dict[str, dict[str, list[float]]] = {arm: {"epochs": [], "hv": []} for arm in [*rules, "random"]}
        for r, rep in enumerate(reps):
            records = rep["records"]
            full_outcome = {rec.number: None for rec in records}
            full_epochs = arm_epochs(records, full_outcome)
            full_hv = hypervolume(arm_points(records, full_outcome), reference, DIRECTIONS)
            line = []
            for rule in rules:
                outcome = rep["outcomes"][rule]
                shares[rule]["epochs"].append(arm_epochs(records, outcome) / full_epochs)
                shares[rule]["hv"].append(hypervolume(arm_points(records, outcome), reference, DIRECTIONS) / full_hv)
                line.append(f"{rule} {shares[rule]['epochs'][-1]:.0%}/{shares[rule]['hv'][-1]:.1%}")
            randoms = [hypervolume(arm_points(records, replay(records, rungs, plan=plan)), reference, DIRECTIONS)
                       / full_hv for plan in rep["plans"]]
            random_epochs = [arm_epochs(records, replay(records, rungs, plan=plan)) / full_epochs
                             for plan in rep["plans"][:1]]
            shares["random"]["epochs"].append(random_epochs[0])
            shares["random"]["hv"].append(float(np.mean(randoms)))
            trained = sum(1 for rec in records if rec.duplicate_of is None and rec.values is not None)
            live = "" if "live" not in rep else f"; live {args.promotion} arm stops the same trials at the same " \
                                                 f"rungs as the replay: {'yes' if rep['live'] else 'NO'}"
            print(f"repetition {r + 1} (sampler seed {rep['seeds'][0]}, training seed {rep['seeds'][1]}): "
                  f"{trained} trained of {len(records)} trials, {rep['seconds']:.0f} s; Spearman(acc at rung "
                  f"{rungs[0]}, final acc) = {first_rung_spearman(records, rungs[0]):.2f}; {args.promotion} stops "
                  f"{rep['stopped']} per rung; epochs/hv share: {', '.join(line)}, random "
                  f"{shares['random']['epochs'][-1]:.0%}/{shares['random']['hv'][-1]:.1%}{live}")
        print("| arm | epochs share, mean [95%] | hypervolume share, mean [95%] | minus random (paired) |")
        print("|---|---|---|---|")
        for arm in [*rules, "random"]:
            paired = _fmt(paired_interval(shares[arm]["hv"], shares["random"]["hv"])) if arm != "random" else ""
            print(f"| {arm} | {_fmt(t_interval(shares[arm]['epochs']))} | {_fmt(t_interval(shares[arm]['hv']))} "
                  f"| {paired} |")
        for rule in rules:
            if rule != args.promotion:
                print(f"{rule} minus {args.promotion}, hypervolume share (paired): "
                      f"{_fmt(paired_interval(shares[rule]['hv'], shares[args.promotion]['hv']))}")
        head = shares[args.promotion]
        epochs, hv = t_interval(head["epochs"]), t_interval(head["hv"])
        random_hv, diff = t_interval(shares["random"]["hv"]), paired_interval(head["hv"], shares["random"]["hv"])
        met = epochs[0] <= 0.5 and hv[0] >= 0.9 and diff[1] > 0
        print(f"goal ({args.promotion}: mean epochs share <= 50%, mean hypervolume share >= 90%, paired interval "
              f"over random above zero): {'met' if met else 'NOT met'}; {time.perf_counter() - started:.0f} s")
        print(f"search_cost: epochs={_fmt(epochs)} hv={_fmt(hv)} random_hv={_fmt(random_hv)} diff={_fmt(diff)} "
              f"repeats={args.repeats}")


if __name__ == "__main__":
    main()
