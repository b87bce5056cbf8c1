"""How well a weight-sharing supernet ranks FasterViT architectures, against stand-alone training.

The space (SPACE below): fastervit_tiny on the embedded digits at 32 px, stage depths (twelve
choices, 1-4 blocks in the conv stages and 1-4 in the HAT stage) x hierarchical attention in
stage 3 on/off: 24 distinct networks. Every architecture is trained stand-alone with three
seeds (the ground truth: three real grid sweeps), and one supernet is trained over the space
and evaluates each architecture (a real one-shot sweep: `supernet:` block, grid sampler).

Printed:

- supernet training wall time / one stand-alone training of the largest subnet;
- the whole one-shot search (supernet training + every evaluation trial) / every stand-alone
  training once (seed 0's sweep: its trials' wall times, side-by-side measurement excluded
  from both: the architectures are measured once, before either, and shared by every study);
- Kendall's tau between the supernet's accuracy and the stand-alone mean of three seeds, with
  a percentile bootstrap 95% interval over the architectures;
- the noise ceiling: tau between stand-alone seed 0 and the mean of seeds 1-2 (how well a
  perfect ranker of one training could agree with the others);
- the hypervolume of the supernet's front (the architectures it puts on the front of
  (supernet accuracy, speedup), scored by their stand-alone mean accuracy and side-by-side
  speedup) / the hypervolume of the true stand-alone front, reference point the worst of each;
- `pruner: rungs` on seed 0's sweep (replayed from the rung values the full sweep recorded, as
  benchmarks/search_cost.py does): its epochs share (the budget it needs: rungs cannot be given
  less than every trial's first rung), its front's hypervolume scored the same way, and tau
  between the accuracy at its first rung and the stand-alone mean.

The last line:
`supernet_rank: tau=T [lo, hi] ceiling=C search_cost=S hv=H archs=N`.

    python benchmarks/supernet_rank.py               # about 21 minutes on 2 quiet CPU cores
    python benchmarks/supernet_rank.py --archs 8 --epochs 2 --supernet-epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_cost  # noqa: E402  (the rung replay and the one-worker sweep runner are shared)

DEPTHS = [[1, 1, 1, 1], [1, 1, 2, 1], [1, 1, 4, 1], [2, 1, 1, 1], [1, 2, 1, 1], [2, 2, 1, 1],
          [2, 2, 2, 1], [2, 2, 4, 1], [1, 2, 4, 1], [2, 1, 2, 1], [4, 1, 1, 1], [1, 4, 1, 1]]
HAT = [[False, False, True, False], False]
OBJECTIVES = {"val/acc1_best": "maximize", "model/throughput": "maximize"}
DIRECTIONS = list(OBJECTIVES.values())
MIN_EPOCHS, REDUCTION_FACTOR = 1, 3
# At 32 px stage 3 is a 2x2 map: windows of 1 token make four windows, so carrier tokens (HAT on)
# are its only path between them; a 2x2 window would make HAT a no-op.
WINDOW = [2, 2, 1, 1]
# 539 validation images instead of 270: one image is 0.19% of accuracy, not 0.37%.
VAL_FRACTION, TEST_FRACTION = 0.3, 0.05


def space(archs: int) -> dict[str, Any]:
    """The first ``archs`` architectures' space: depth choices x HAT on/off (two per depth)."""
    depths = DEPTHS[:max(1, archs // 2)]
    return {"model.arch.depths": {"choices": depths}, "model.arch.hat": {"choices": HAT}}


def write_sweep(folder: Path, study: str, args: argparse.Namespace, seed: int,
                supernet: Mapping[str, Any] | None = None) -> Path:
    """A grid sweep over the space: stand-alone (rung values recorded) or one-shot (``supernet``)."""
    grid = space(args.archs)
    n = len(grid["model.arch.depths"]["choices"]) * len(HAT)
    sweep: dict[str, Any] = {
        "study": study, "experiment": str(ROOT / "experiments" / "baseline.yaml"), "space": grid,
        "objectives": OBJECTIVES, "sampler": {"name": "grid", "seed": 0}, "n_trials": n,
        "overrides": {"trainer.max_epochs": args.epochs, "data.init_args.image_size": args.image_size,
                      "data.init_args.batch_size": args.batch_size, "model.warmup_epochs": 0,
                      "data.init_args.val_fraction": VAL_FRACTION, "data.init_args.test_fraction": TEST_FRACTION,
                      "model.arch.window_size": WINDOW,
                      "trainer.limit_train_batches": args.train_batches, "seed_everything": seed}}
    if supernet is None:
        sweep["pruner"] = {"name": "rungs", "min_epochs": MIN_EPOCHS, "reduction_factor": REDUCTION_FACTOR}
    else:
        sweep["supernet"] = dict(supernet)
    path = folder / f"{study}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def train_supernet(path: Path, runs: Path) -> float:
    """Train the one-shot sweep's supernet (as `fvlab sweep` does before its trials); wall seconds."""
    from fvlab.sweep.command import prepare_sweep
    from fvlab.sweep.oneshot import train_supernet as train

    args = argparse.Namespace(sweep=str(path), n_trials=None, timeout=None, workers=1, study_name=None,
                              storage=None, runs_dir=str(runs), confirm=False)
    sweep, base, _ = prepare_sweep(args)
    begun = time.perf_counter()
    train(sweep, base, runs / sweep.study, log=lambda *a, **k: None)
    return time.perf_counter() - begun


def by_arch(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """Complete trials by their point of the space (every study here is a grid over the same space)."""
    return {json.dumps(t.params, sort_keys=True): t for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE}


def seconds(trial: optuna.trial.FrozenTrial) -> float:
    """A trial's wall time."""
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def front_hv(chosen: Sequence[str], acc: Mapping[str, float], speed: Mapping[str, float],
             reference: Sequence[float]) -> float:
    """Hypervolume of ``chosen`` architectures scored by (stand-alone accuracy, speedup)."""
    from fvlab.sweep.front import hypervolume

    return hypervolume([[acc[a], speed[a]] for a in chosen], reference, DIRECTIONS)


def front_of(points: Mapping[str, Sequence[float]]) -> list[str]:
    """The architectures on the first non-dominated front of ``points``."""
    from fvlab.sweep.front import losses, non_dominated_fronts

    keys = list(points)
    first = non_dominated_fronts(losses([points[k] for k in keys], DIRECTIONS))[0]
    return [keys[i] for i in first]


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> None:
    """Train the ground truth and the supernet, print the figures and the one-line summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=int, default=24, help="architectures (even, 4 to 24)")
    parser.add_argument("--epochs", type=int, default=6, help="stand-alone epochs")
    parser.add_argument("--supernet-epochs", type=int, default=6)
    parser.add_argument("--sandwich", type=int, default=1, help="random subnets per step besides the extremes")
    parser.add_argument("--bn-batches", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-batches", type=int, default=32, help="trainer.limit_train_batches")
    parser.add_argument("--profile-rounds", type=int, default=10)
    parser.add_argument("--promotion", default="first_front", help="promotion rule of the replayed rungs arm")
    parser.add_argument("--runs-dir", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    if not 4 <= args.archs <= 2 * len(DEPTHS) or args.archs % 2:  # 4: the base experiment's 1-1-2-1 among them
        parser.error(f"--archs: an even number from 4 to {2 * len(DEPTHS)}")
    cpu = search_cost.quiet_setup(args.profile_rounds)
    from fvlab.sweep.confirm import rank_agreement
    from fvlab.sweep.objective import ARCH_ATTR
    from fvlab.sweep.pareto import SCALE_ATTR
    from fvlab.sweep.space import rung_epochs

    import torch

    supernet = {"epochs": args.supernet_epochs, "sandwich": args.sandwich, "distill": True,
                "bn_batches": args.bn_batches}
    print(f"# {args.archs} architectures (fastervit_tiny, depths x HAT in stage 3), digits at {args.image_size} px, "
          f"batch {args.batch_size} x {args.train_batches} per epoch; stand-alone {args.epochs} epochs x 3 seeds; "
          f"supernet {supernet}; {cpu}, {torch.get_num_threads()} threads", flush=True)
    rungs = rung_epochs(MIN_EPOCHS, REDUCTION_FACTOR, args.epochs)
    started = time.perf_counter()
    shared: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp)
        folder = runs / "sweeps"
        folder.mkdir(parents=True, exist_ok=True)
        studies = {}
        for seed in range(3):
            studies[seed] = search_cost.run_arm(write_sweep(folder, f"standalone_s{seed}", args, seed),
                                                runs, shared, record_only=True)
            shared.update({k: v for k, v in studies[seed].user_attrs.items()
                           if k.startswith(ARCH_ATTR) or k == SCALE_ATTR})
            print(f"stand-alone seed {seed}: {time.perf_counter() - started:.0f} s so far", flush=True)
        path = write_sweep(folder, "oneshot", args, 0, supernet)
        supernet_s = train_supernet(path, runs)
        oneshot = search_cost.run_arm(path, runs, shared, record_only=False)
        total = time.perf_counter() - started

        truth = [by_arch(studies[s]) for s in range(3)]
        evals = by_arch(oneshot)
        archs = [a for a in truth[0] if all(a in t for t in truth) and a in evals]
        acc = {a: [float(t[a].values[0]) for t in truth] for a in archs}
        mean = {a: statistics.fmean(v) for a, v in acc.items()}
        speed = {a: float(truth[0][a].user_attrs["speedup"]) for a in archs}
        one = {a: float(evals[a].values[0]) for a in archs}
        # Seed 1's sweep: its architectures were measured by seed 0's, so its trials time training alone.
        train_s = {a: seconds(truth[1][a]) for a in archs}
        largest = max(archs, key=lambda a: (sum(int(d) for d in json.loads(a)["model.arch.depths"].split("-")),
                                            json.loads(a)["model.arch.hat"] != "false"))
        eval_s = sum(seconds(evals[a]) for a in archs)
        tau, lo, hi = rank_agreement([one[a] for a in archs], [mean[a] for a in archs])
        ceiling = rank_agreement([acc[a][0] for a in archs],
                                 [statistics.fmean(acc[a][1:]) for a in archs])[0]
        worst = [min(mean.values()), min(speed.values())]
        true_hv = front_hv(front_of({a: (mean[a], speed[a]) for a in archs}), mean, speed, worst)
        picked = front_of({a: (one[a], speed[a]) for a in archs})
        hv = front_hv(picked, mean, speed, worst) / true_hv if true_hv else float("nan")
        cost = (supernet_s + eval_s) / sum(train_s.values())

        print("\n| architecture | stand-alone acc (s0, s1, s2) | mean | supernet acc | speedup | train s |")
        print("|---|---|---|---|---|---|")
        for a in sorted(archs, key=lambda a: -mean[a]):
            print(f"| {a} | {', '.join(f'{v:.4f}' for v in acc[a])} | {mean[a]:.4f} | {one[a]:.4f} | "
                  f"{speed[a]:.3f} | {train_s[a]:.1f} |")
        print(f"\nsupernet training {supernet_s:.0f} s / one stand-alone training of the largest subnet "
              f"({train_s[largest]:.1f} s): {supernet_s / train_s[largest]:.2f}")
        print(f"one-shot search (supernet {supernet_s:.0f} s + {len(archs)} evaluations {eval_s:.0f} s) / every "
              f"stand-alone training once ({sum(train_s.values()):.0f} s): {cost:.3f}")
        print(f"Kendall tau (supernet acc vs stand-alone mean of 3 seeds): {tau:.2f} "
              f"[{_f(lo)}, {_f(hi)}] (bootstrap 95% over {len(archs)} architectures); noise ceiling "
              f"(seed 0 vs mean of seeds 1-2): {ceiling:.2f}; tau / ceiling: {tau / ceiling:.2f}")
        print(f"hypervolume of the supernet's front ({len(picked)} architectures, scored stand-alone) / true "
              f"front: {hv:.3f}")

        records = search_cost.records_of(studies[0], rungs)
        outcome = search_cost.replay(records, rungs, args.promotion)
        kept = {r.number for r in records if r.values is not None and outcome.get(r.number) is None}
        rung_archs = [a for a in archs if truth[0][a].number in kept]
        rung_hv = front_hv(front_of({a: (acc[a][0], speed[a]) for a in rung_archs}), mean, speed, worst)
        share = search_cost.arm_epochs(records, outcome) / search_cost.arm_epochs(records, {})
        first = {r.number: r.rungs[rungs[0]][0] for r in records if rungs and rungs[0] in r.rungs}
        early = [a for a in archs if truth[0][a].number in first]
        rung_tau = rank_agreement([first[truth[0][a].number] for a in early], [mean[a] for a in early])
        print(f"pruner: rungs (promotion {args.promotion}, rungs at {rungs}, replayed on seed 0's sweep): epochs share {share:.3f} "
              f"(the one-shot search: {cost:.3f}); hypervolume {rung_hv / true_hv:.3f}; tau of the accuracy at "
              f"epoch {rungs[0] if rungs else '-'} vs stand-alone mean: {rung_tau[0]:.2f} "
              f"[{_f(rung_tau[1])}, {_f(rung_tau[2])}]")
        print(f"total {total / 60:.1f} min")
        print(f"supernet_rank: tau={tau:.2f} [{_f(lo)}, {_f(hi)}] ceiling={ceiling:.2f} search_cost={cost:.2f} "
              f"hv={hv:.2f} archs={len(archs)}")


if __name__ == "__main__":
    main()
