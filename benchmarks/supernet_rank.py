"""How well a weight-sharing supernet ranks FasterViT architectures, measured like with like.

The space (search_cost.SPACE): fastervit_micro on cluttered digits at 32 px (experiments/cluttered.yaml,
a task on which architectures differ), stage-1 width ``dim`` x stage depths x hierarchical
attention in stage 3 on/off: 40 networks by default. Every architecture is trained stand-alone
with K seeds (three real grid sweeps, rung values recorded), and one supernet (width, depth and
HAT share its weights) is trained over the space and evaluates each architecture (a real one-shot
grid sweep).

Rank quality in the frame of fvlab.sweep.rank_quality: for each seed s the target is the mean of
the other seeds; tau(supernet score, target) and tau(seed s, target), averaged over s, and their
paired difference, each with a bootstrap 95% interval over architectures. The supernet's score is
its validation accuracy, and (printed beside) its validation loss. The same frame scores
``pruner: rungs`` replayed on each seed's sweep: tau of the rung-1 accuracy, and the front it
keeps, against the target without that seed. Hypervolumes are taken on the held-out target's
accuracies and the side-by-side speedups, as a share of the true front's.

Cost, one unit for every arm: wall seconds measured in this run. "Training each architecture once"
is the sum of a stand-alone sweep's trial times (seeds 1.., whose architectures were measured by
seed 0's sweep, so they time training alone); the one-shot search is the supernet's training plus
its evaluation trials (measured alike). Rungs report their epochs share of the full sweep.

The last line:
`supernet_rank: tau=T [lo, hi] one_seed_tau=O [lo, hi] diff=D [lo, hi] search_cost=S hv=H archs=N`.

    python benchmarks/supernet_rank.py               # the full grid: K x 40 stand-alone runs and a supernet
    python benchmarks/supernet_rank.py --dims 8 32 --depths 2 --epochs 2 --supernet-epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_cost  # noqa: E402  (the rung replay and the one-worker sweep runner are shared)

from fvlab.metrics import SPEEDUP, VAL_ACC1_BEST, VAL_LOSS, trial_attr  # noqa: E402

MIN_EPOCHS, REDUCTION_FACTOR = search_cost.MIN_EPOCHS, search_cost.REDUCTION_FACTOR


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


@dataclass
class Ground:
    """The stand-alone ground truth over the architectures both arms evaluated."""

    archs: list[str]
    acc: np.ndarray  # (archs, K): stand-alone val/acc1_best per seed
    speedup: np.ndarray  # side-by-side speedup to the base architecture
    train_s: float  # training every architecture once (a sweep of seeds 1..: measurement excluded)


def ground_truth(studies: Sequence[optuna.Study], evaluated: Mapping[str, Any]) -> Ground:
    """Architectures complete in every stand-alone sweep and evaluated on the supernet."""
    truth = [by_arch(s) for s in studies]
    archs = sorted(a for a in truth[0] if all(a in t for t in truth) and a in evaluated)
    acc = np.array([[float(t[a].values[0]) for t in truth] for a in archs])
    speed = np.array([float(truth[0][a].user_attrs[trial_attr(SPEEDUP)]) for a in archs])
    timed = truth[1:] or truth
    train_s = float(np.mean([sum(seconds(t[a]) for a in archs) for t in timed]))
    return Ground(archs, acc, speed, train_s)


def hv_share(selected: Sequence[bool], ground: Ground) -> float:
    """Mean over seeds s of the hypervolume of ``selected`` scored on target s, as a share of the
    true front's on target s."""
    from fvlab.sweep.rank_quality import front_hypervolume, front_of, held_out_targets

    targets = held_out_targets(ground.acc)
    shares = []
    for s in range(targets.shape[1]):
        true = front_hypervolume(front_of(targets[:, s], ground.speedup), targets[:, s], ground.speedup)
        shares.append(front_hypervolume(selected, targets[:, s], ground.speedup) / true if true else np.nan)
    return float(np.nanmean(shares))


def rungs_arm(studies: Sequence[optuna.Study], ground: Ground, promotion: str, rungs: Sequence[int]) -> str:
    """Successive halving replayed on each seed's sweep, scored in the held-out frame."""
    from fvlab.sweep.rank_quality import front_hypervolume, front_of, held_out_targets, per_seed_rank_quality

    targets = held_out_targets(ground.acc)
    shares, hvs, first = [], [], np.full(ground.acc.shape, np.nan)
    for s, study in enumerate(studies):
        records = search_cost.records_of(study, rungs)
        outcome = search_cost.replay(records, rungs, promotion)
        shares.append(search_cost.arm_epochs(records, outcome) / search_cost.arm_epochs(records, {}))
        trials = by_arch(study)
        number = {a: trials[a].number for a in ground.archs}
        kept = np.array([outcome.get(number[a]) is None for a in ground.archs])
        index = np.flatnonzero(kept)  # the front among the trials it kept, on seed s's accuracies
        picked = np.zeros(len(ground.archs), dtype=bool)
        picked[index[np.array(front_of(ground.acc[index, s], ground.speedup[index]), dtype=bool)]] = True
        true = front_hypervolume(front_of(targets[:, s], ground.speedup), targets[:, s], ground.speedup)
        hvs.append(front_hypervolume(picked, targets[:, s], ground.speedup) / true)
        by_number = {r.number: r for r in records}
        for i, a in enumerate(ground.archs):
            values = by_number[number[a]].rungs.get(rungs[0]) if rungs else None
            first[i, s] = values[0] if values else np.nan
    quality = per_seed_rank_quality(np.nan_to_num(first, nan=0.0), ground.acc, seed=1)
    return (f"pruner: rungs (promotion {promotion}, rungs at {list(rungs)}, replayed on each seed's sweep): "
            f"epochs share {np.mean(shares):.3f}; hypervolume of its front on the held-out target "
            f"{np.mean(hvs):.3f}; rung-1 accuracy: {quality.line().replace('tau=', 'rung1_tau=', 1)}")


def print_table(ground: Ground, score: Mapping[str, float]) -> None:
    """One row per architecture, best stand-alone mean first."""
    print(f"\n| architecture | stand-alone {VAL_ACC1_BEST} per seed | mean | supernet acc | speedup |")
    print("|---|---|---|---|---|")
    for i in np.argsort(-ground.acc.mean(axis=1)):
        a = ground.archs[i]
        print(f"| {a} | {', '.join(f'{v:.4f}' for v in ground.acc[i])} | {ground.acc[i].mean():.4f} | "
              f"{score[a]:.4f} | {ground.speedup[i]:.3f} |")


def run_all(args: argparse.Namespace, runs: Path) -> tuple[list[optuna.Study], optuna.Study, float]:
    """The K stand-alone grid sweeps, the supernet and its one-shot sweep."""
    grid = {"epochs": args.epochs, "train_batches": args.train_batches, "dims": args.dims, "depths": args.depths}
    started = time.perf_counter()
    studies, shared = search_cost.train_grid(runs, args.seeds, **grid)
    supernet = {"epochs": args.supernet_epochs, "sandwich": args.sandwich, "distill": True,
                "bn_batches": args.bn_batches}
    path = search_cost.write_sweep(runs / "sweeps", "oneshot", 0, supernet=supernet, **grid)
    supernet_s = train_supernet(path, runs)
    oneshot = search_cost.run_arm(path, runs, shared, record_only=False)
    print(f"supernet and its evaluations: {time.perf_counter() - started:.0f} s so far", flush=True)
    return studies, oneshot, supernet_s


def report(args: argparse.Namespace, studies: list[optuna.Study], oneshot: optuna.Study,
           supernet_s: float) -> str:
    """Print every figure; the last line."""
    from fvlab.sweep.rank_quality import front_of, rank_quality
    from fvlab.sweep.space import rung_epochs

    evals = by_arch(oneshot)
    ground = ground_truth(studies, evals)
    acc = {a: float(evals[a].values[0]) for a in ground.archs}
    loss = [float(evals[a].user_attrs.get(trial_attr(VAL_LOSS), np.nan)) for a in ground.archs]
    print_table(ground, acc)
    eval_s = sum(seconds(evals[a]) for a in ground.archs)
    cost = (supernet_s + eval_s) / ground.train_s
    by_acc = rank_quality([acc[a] for a in ground.archs], ground.acc)
    print(f"\nsupernet score {VAL_ACC1_BEST}: {by_acc.line()} (K={args.seeds} seeds, {len(ground.archs)} architectures)")
    if np.isfinite(loss).all():
        print(f"supernet score {VAL_LOSS}: {rank_quality(loss, ground.acc, higher_is_better=False).line()}")
    hv = hv_share(front_of([acc[a] for a in ground.archs], ground.speedup), ground)
    print(f"one-shot search (supernet {supernet_s:.0f} s + {len(ground.archs)} evaluations {eval_s:.0f} s) / every "
          f"stand-alone training once ({ground.train_s:.0f} s): {cost:.3f}; hypervolume of its front on the "
          f"held-out target: {hv:.3f}")
    print(rungs_arm(studies, ground, args.promotion, rung_epochs(MIN_EPOCHS, REDUCTION_FACTOR, args.epochs)))
    return (f"supernet_rank: {by_acc.line()} search_cost={cost:.2f} hv={hv:.2f} archs={len(ground.archs)}")


def main() -> None:
    """Train the ground truth and the supernet, print the figures and the one-line summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=search_cost.DIMS, help="stage-1 widths")
    parser.add_argument("--depths", type=int, default=len(search_cost.DEPTHS),
                        help=f"depth choices, 1 to {len(search_cost.DEPTHS)}")
    parser.add_argument("--seeds", type=int, default=3, help="stand-alone seeds per architecture (K >= 3)")
    parser.add_argument("--epochs", type=int, default=4, help="stand-alone epochs")
    parser.add_argument("--supernet-epochs", type=int, default=6)
    parser.add_argument("--sandwich", type=int, default=1, help="random subnets per step besides the extremes")
    parser.add_argument("--bn-batches", type=int, default=4)
    parser.add_argument("--train-batches", type=int, default=0, help="trainer.limit_train_batches (0: all)")
    parser.add_argument("--profile-rounds", type=int, default=10)
    parser.add_argument("--promotion", default="first_front", help="promotion rule of the replayed rungs arm")
    parser.add_argument("--runs-dir", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    if not 1 <= args.depths <= len(search_cost.DEPTHS) or args.seeds < 3:
        parser.error(f"--depths: 1 to {len(search_cost.DEPTHS)}; --seeds: at least 3 (held-out targets)")
    cpu = search_cost.quiet_setup(args.profile_rounds)
    import torch

    n = len(args.dims) * args.depths * len(search_cost.HAT)
    print(f"# {n} architectures (fastervit_micro: dim {args.dims} x {args.depths} depths x HAT in stage 3), "
          f"cluttered digits at 32 px; stand-alone {args.epochs} epochs x {args.seeds} seeds; supernet "
          f"{args.supernet_epochs} epochs, sandwich {args.sandwich}; {cpu}, {torch.get_num_threads()} threads",
          flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        studies, oneshot, supernet_s = run_all(args, Path(args.runs_dir or tmp))
        line = report(args, studies, oneshot, supernet_s)
    print(f"total {(time.perf_counter() - started) / 60:.1f} min")
    print(line)


if __name__ == "__main__":
    main()
