"""What the sweep machinery costs: wall time of one `fvlab sweep` trial against `fvlab fit` of the same config.

Both run as the command a user types (a fresh process each), alternating, and the median
ratio is printed (goal: under 1.05). Also the cost of an infeasible trial, which is checked
on the built model and never trained (goal: about a second).

    .venv/bin/python benchmarks/sweep_overhead.py [--rounds 3] [--epochs 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

from fvlab.metrics import VAL_ACC1_BEST

ROOT = Path(__file__).resolve().parents[1]
FVLAB = [sys.executable, "-c", "import sys; from fvlab.cli import main; sys.exit(main(sys.argv[1:]))"]


def timed(args: list[str]) -> float:
    """Wall seconds of one `fvlab` command in a fresh process, as a user runs it."""
    start = time.perf_counter()
    subprocess.run([*FVLAB, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    """Alternate sweep and fit rounds; print per-round times, the median ratio and the infeasible cost."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fvlab-sweep-bench-"))
    experiment = yaml.safe_load((ROOT / "experiments" / "baseline.yaml").read_text())
    experiment["trainer"] = {**experiment["trainer"], "max_epochs": args.epochs}
    (tmp / "base.yaml").write_text(yaml.safe_dump(experiment, sort_keys=False))
    lr = experiment["model"]["lr"]
    sweep = {"study": "bench", "experiment": str(tmp / "base.yaml"),
             "space": {"model.lr": {"choices": [lr]}},  # one trial: the base config itself
             "objectives": {VAL_ACC1_BEST: "maximize"}, "sampler": "grid", "n_trials": 1}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    ratios = []
    for round_ in range(args.rounds):
        sweep_s = timed(["sweep", str(tmp / "sweep.yaml"), "--runs-dir", str(tmp / "sweeps"),
                         "--study-name", f"bench_{round_}"])
        fit_s = timed(["fit", str(tmp / "base.yaml"), "--runs-dir", str(tmp / "fits"), "--force"])
        ratios.append(sweep_s / fit_s)
        print(f"round {round_ + 1}: sweep {sweep_s:.1f} s, fit {fit_s:.1f} s, ratio {ratios[-1]:.3f}", flush=True)
    print(f"sweep/fit wall time, median of {args.rounds}: {statistics.median(ratios):.3f} (goal < 1.05)")

    infeasible = {**sweep, "study": "infeasible", "constraints": {"max_params_m": 0.01}}
    (tmp / "infeasible.yaml").write_text(yaml.safe_dump(infeasible))
    timed(["sweep", str(tmp / "infeasible.yaml"), "--runs-dir", str(tmp / "sweeps")])
    journal = tmp / "sweeps" / "infeasible" / "study.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trial = optuna.load_study(study_name="infeasible", storage=storage).trials[0]
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    print(f"infeasible trial: {trial.state.name}, {seconds:.2f} s ({trial.user_attrs.get('pruned_reason')})")
    print(f"(runs in {tmp})")


if __name__ == "__main__":
    main()
