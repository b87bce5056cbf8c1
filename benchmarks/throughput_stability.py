"""Does `fvlab profile` rank an experiment's variants the same way every time, quiet or loaded?

Runs `fvlab profile EXPERIMENT --json` several times as separate processes, first on a quiet
machine, then while a second process burns one core in random bursts (0.2-1.5 s on,
0.2-1.5 s off: what a shared machine does). Prints, per run, the variants ordered by measured
throughput and each variant's speedup to the reference, then checks the goals:

- every pair of variants whose 95% intervals do not overlap is ordered the same way in all runs;
- the speedup's spread (max/min - 1) over runs is under 5% quiet and under 10% with bursts.

    python benchmarks/throughput_stability.py                       # ablate_carrier, ct4 vs no_carrier
    python benchmarks/throughput_stability.py --runs 3 --variant ct2
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from fvlab.metrics import SPEEDUP, THROUGHPUT, THROUGHPUT_HI, THROUGHPUT_LO
from fvlab.runtime import cpu_description

ROOT = Path(__file__).resolve().parent.parent


def burn(stop: mp.Event, seed: int) -> None:
    """Busy-loop one core in random bursts until ``stop`` is set."""
    rng = random.Random(seed)
    while not stop.is_set():
        end = time.perf_counter() + rng.uniform(0.2, 1.5)
        while time.perf_counter() < end:
            pass
        stop.wait(rng.uniform(0.2, 1.5))


def profile_once(experiment: str, extra: list[str]) -> list[dict]:
    """One `fvlab profile --json` process; its rows."""
    done = subprocess.run([sys.executable, "-m", "fvlab.cli", "profile", experiment, "--json", *extra],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fvlab profile failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


def check(label: str, runs: list[list[dict]], variant: str, reference: str, limit: float) -> bool:
    """Print the runs and whether the goals hold for them."""
    print(f"\n== {label}: {len(runs)} runs")
    speedups = []
    for i, rows in enumerate(runs, 1):
        by_name = {row["name"]: row for row in rows}
        order = sorted(by_name, key=lambda n: -by_name[n][THROUGHPUT])
        cells = ", ".join(f"{n} {by_name[n][THROUGHPUT]:.0f} "
                          f"[{by_name[n][THROUGHPUT_LO]:.0f}, {by_name[n][THROUGHPUT_HI]:.0f}]"
                          for n in order)
        speedup = by_name[variant][SPEEDUP] / by_name[reference][SPEEDUP]
        speedups.append(speedup)
        print(f"run {i}: {' > '.join(order)}   {variant}/{reference} speedup {speedup:.3f}   ({cells})")
    names = sorted({row["name"] for rows in runs for row in rows})
    contradictions = []
    for a, b in itertools.combinations(names, 2):
        seen = set()
        for rows in runs:
            by = {row["name"]: row for row in rows}
            ra, rb = by[a], by[b]
            if ra[THROUGHPUT_LO] > rb[THROUGHPUT_HI]:
                seen.add(f"{a} > {b}")
            elif rb[THROUGHPUT_LO] > ra[THROUGHPUT_HI]:
                seen.add(f"{b} > {a}")
        if len(seen) > 1:
            contradictions.append(" and ".join(sorted(seen)))
    spread = max(speedups) / min(speedups) - 1
    ok_order, ok_spread = not contradictions, spread < limit
    print(f"pairs separated by their intervals ordered alike in every run: "
          f"{'yes' if ok_order else 'NO: ' + '; '.join(contradictions)}")
    print(f"{variant}/{reference} speedup: min {min(speedups):.3f} max {max(speedups):.3f} "
          f"spread {100 * spread:.1f}% (goal < {100 * limit:.0f}%): {'met' if ok_spread else 'NOT met'}")
    return ok_order and ok_spread


def main() -> int:
    """Quiet runs, then bursty runs; exit 1 when a goal is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/ablate_carrier.yaml")
    parser.add_argument("--variant", default="ct4")
    parser.add_argument("--reference", default="no_carrier")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile-args", default="", help="extra `fvlab profile` options, quoted")
    args = parser.parse_args()
    extra = args.profile_args.split()
    print(f"machine: {cpu_description()[0]}, {os.cpu_count()} cores; torch threads per profile: default")
    quiet = [profile_once(args.experiment, extra) for _ in range(args.runs)]
    stop = mp.Event()
    burner = mp.Process(target=burn, args=(stop, 0), daemon=True)
    burner.start()
    try:
        bursty = [profile_once(args.experiment, extra) for _ in range(args.runs)]
    finally:
        stop.set()
        burner.join()
    ok = check("quiet", quiet, args.variant, args.reference, 0.05)
    ok &= check("one core burnt in random bursts (0.2-1.5 s on, 0.2-1.5 s off)", bursty, args.variant,
                args.reference, 0.10)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
