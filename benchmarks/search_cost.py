"""What multi-objective successive halving (`pruner: rungs`) saves, and what it keeps of the front.

The same 18-trial search on the embedded digits (fastervit_tiny at 64 px; width, stage depths
and carrier tokens per window, 32 distinct models; objectives val/acc1_best and model/throughput, both
maximised; `trainer.max_epochs` 9) in three arms, each its own study:

- `full`: every trial trained to the end;
- `rungs`: `pruner: {name: rungs, min_epochs: 1, reduction_factor: 3}` (rungs at epochs 1 and 3);
- `random`: a control that stops as many trials at each rung as `rungs` did, chosen at random.

A `random` sampler with a fixed seed proposes the same configurations in every arm, and the
throughput is measured once (in `full`) and shared by the other arms, so the arms differ only in
which trials train how long. Printed: the epochs each arm trained, and the hypervolume of each
arm's final front against one reference point (the worst value of each objective over all arms).
Goal: `rungs` trains at most 50% of the epochs of `full`, keeps at least 90% of its hypervolume,
and keeps more than `random`.

    python benchmarks/search_cost.py                 # about 20 minutes on 2 CPU cores
    python benchmarks/search_cost.py --trials 9 --epochs 3 --image-size 32   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
# Architecture only, the learning rate fixed at the base experiment's: with the rate in the space,
# accuracy after one epoch ranked the rate, not the architecture (README, "Search cost").
SPACE = {"model.arch.dim": {"choices": [16, 24, 32, 48]},
         "model.arch.depths": {"choices": [[1, 1, 1, 1], [1, 1, 2, 1], [1, 1, 4, 1], [2, 2, 2, 1]]},
         "model.arch.ct_size": {"choices": [1, 2]}}
OBJECTIVES = {"val/acc1_best": "maximize", "model/throughput": "maximize"}
RUNGS = {"name": "rungs", "min_epochs": 1, "reduction_factor": 3}


def write_sweep(folder: Path, arm: str, trials: int, epochs: int, image_size: int) -> Path:
    """The arm's sweep file: the same search, with or without the rungs pruner."""
    sweep = {"study": arm, "experiment": str(ROOT / "experiments" / "baseline.yaml"), "space": SPACE,
             "objectives": OBJECTIVES, "sampler": {"name": "random", "seed": 0}, "n_trials": trials,
             "overrides": {"trainer.max_epochs": epochs, "data.init_args.image_size": image_size}}
    if arm != "full":
        sweep["pruner"] = RUNGS
    path = folder / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run_arm(path: Path, runs: Path, shared: dict[str, Any], pruner: Any = None) -> optuna.Study:
    """Run one arm's study in this process (one worker), its architecture figures taken from ``shared``."""
    from fvlab.sweep import workers
    from fvlab.sweep.command import _open_study, prepare_sweep

    args = argparse.Namespace(sweep=str(path), n_trials=None, timeout=None, workers=1, study_name=None,
                              storage=None, runs_dir=str(runs), confirm=False)
    sweep, _, kind = prepare_sweep(args)
    journal = runs / sweep.study / "study.journal"
    _, study = _open_study(args, sweep, kind, journal)
    for key, value in shared.items():  # measured once, in the first arm
        study.set_user_attr(key, value)
    original = workers.make_pruner
    if pruner is not None:
        workers.make_pruner = lambda _sweep: pruner
    try:
        code = workers.run_workers(workers.WorkerSettings(
            sweep_path=str(path), study_name=sweep.study, n_trials=sweep.n_trials, storage=None,
            journal=str(journal), runs_dir=str(runs)))
    finally:
        workers.make_pruner = original
    if code != 0:
        raise SystemExit(f"{sweep.study}: the workers ended with {code}")
    return study


def epochs_trained(study: optuna.Study) -> int:
    """Epochs every trial's run trained (duplicates and untrained trials: none)."""
    total = 0
    for trial in study.get_trials(deepcopy=False):
        run_dir = trial.user_attrs.get("run_dir")
        metrics = Path(run_dir) / "metrics.json" if run_dir else None
        if trial.user_attrs.get("duplicate_of") is None and metrics is not None and metrics.is_file():
            total += int(json.loads(metrics.read_text()).get("epochs") or 0)
    return total


def random_control(rungs_study: optuna.Study, seed: int = 0) -> Any:
    """A RungsPruner that stops as many trials at each rung as the rungs arm did, chosen at random."""
    from fvlab.sweep.rungs import RungDecision, RungsPruner

    trials = [t for t in rungs_study.get_trials(deepcopy=False) if t.user_attrs.get("duplicate_of") is None]
    stopped: dict[int, int] = {}
    for trial in trials:
        if trial.state == TrialState.PRUNED and trial.user_attrs.get("pruned_rung") is not None:
            rung = int(trial.user_attrs["pruned_rung"])
            stopped[rung] = stopped.get(rung, 0) + 1
    rng = random.Random(seed)
    candidates = [t.number for t in trials]
    plan: dict[int, int] = {}
    for rung in sorted(stopped):
        chosen = rng.sample([n for n in candidates if n not in plan], stopped[rung])
        plan.update(dict.fromkeys(chosen, rung))

    class RandomStops(RungsPruner):
        """Stops the planned trials at their planned rung, whatever their values."""

        def decide(self, study: optuna.Study, number: int, epochs: int) -> RungDecision:
            go_on = plan.get(number) != epochs
            return RungDecision(epochs=epochs, go_on=go_on, rank=0, trials=0, keep=0, front=0)

    return RandomStops(RUNGS["min_epochs"], RUNGS["reduction_factor"]), stopped


def front_values(study: optuna.Study) -> list[list[float]]:
    """Objective values of the complete trials (the front is computed by the hypervolume)."""
    return [list(t.values) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def main() -> None:
    """Run the three arms and print epochs, hypervolumes and whether the goal holds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=18)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--runs-dir", help="keep the arms' runs here (default: a temporary directory)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from fvlab.runtime import quiet_lightning, tune_allocator
    from fvlab.sweep.front import hypervolume
    from fvlab.sweep.objective import ARCH_ATTR

    quiet_lightning()
    tune_allocator()
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    print(f"# {args.trials} trials, max_epochs {args.epochs}, digits at {args.image_size} px, fastervit_tiny; "
          f"{cpu}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp)
        folder = runs / "sweeps"
        folder.mkdir(parents=True, exist_ok=True)
        studies, seconds = {}, {}
        start = time.perf_counter()
        studies["full"] = run_arm(write_sweep(folder, "full", args.trials, args.epochs, args.image_size), runs, {})
        seconds["full"] = time.perf_counter() - start
        shared = {k: v for k, v in studies["full"].user_attrs.items() if k.startswith(ARCH_ATTR)}
        start = time.perf_counter()
        studies["rungs"] = run_arm(write_sweep(folder, "rungs", args.trials, args.epochs, args.image_size),
                                   runs, shared)
        seconds["rungs"] = time.perf_counter() - start
        control, stopped = random_control(studies["rungs"])
        start = time.perf_counter()
        studies["random"] = run_arm(write_sweep(folder, "random", args.trials, args.epochs, args.image_size),
                                    runs, shared, pruner=control)
        seconds["random"] = time.perf_counter() - start
        params = {arm: [t.params for t in s.get_trials(deepcopy=False)] for arm, s in studies.items()}
        same = params["full"] == params["rungs"] == params["random"]
        values = {arm: front_values(s) for arm, s in studies.items()}
        everything = [v for vs in values.values() for v in vs]
        reference = [min(v[i] for v in everything) for i in range(len(OBJECTIVES))]
        epochs = {arm: epochs_trained(s) for arm, s in studies.items()}
        volumes = {arm: hypervolume(vs, reference, list(OBJECTIVES.values())) for arm, vs in values.items()}
        print(f"same configurations proposed in every arm: {'yes' if same else 'NO'}")
        print(f"trials stopped by rungs, per rung (epoch): {dict(sorted(stopped.items()))}; the random "
              f"control stops as many at each rung")
        print(f"reference point (worst over all arms): val/acc1_best {reference[0]:.4f}, "
              f"model/throughput {reference[1]:.1f}")
        print("| arm | epochs trained | share of full | hypervolume | share of full | complete trials | wall s |")
        print("|---|---|---|---|---|---|---|")
        for arm in studies:
            complete = len(values[arm])
            print(f"| {arm} | {epochs[arm]} | {epochs[arm] / epochs['full']:.0%} | {volumes[arm]:.4g} | "
                  f"{volumes[arm] / volumes['full']:.1%} | {complete} | {seconds[arm]:.0f} |")
        met = (epochs["rungs"] <= 0.5 * epochs["full"] and volumes["rungs"] >= 0.9 * volumes["full"]
               and volumes["rungs"] > volumes["random"])
        print(f"goal (rungs <= 50% of the epochs, >= 90% of the hypervolume, more than random): "
              f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
