"""One trial of `fvlab sweep` (fvlab.sweep.objective): constraints, impossible geometry, pruning,
one training per distinct model (duplicates), one measurement per network."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from fvlab.cli import main

from helpers import BASE, UNTRAINED, journal_study, run_sweep, write_sweep

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- constraints, impossible geometry, pruning ------------------------------------------------


def test_infeasible_trial_is_never_trained_and_unbuildable_is_pruned(tmp_path: Path) -> None:
    # 32 px: stage 3 sees 2x2 tokens, so window 4 cannot be built; dim 32 costs ~0.0064 GFLOPs.
    sweep = write_sweep(tmp_path, study="constrained", sampler={"name": "grid", "seed": 0},
                        space={"model.arch.window_size": {"choices": [2, 4]},
                               "model.arch.dim": {"choices": [16, 32]}},
                        objectives={"val/acc1_best": "maximize"}, constraints={"max_gflops": 0.004},
                        n_trials=10)
    assert run_sweep(tmp_path, sweep) == 0
    study_dir = tmp_path / "runs" / "constrained"
    trials = journal_study(study_dir / "study.journal", "constrained").get_trials()
    assert len(trials) == 4  # the grid, each combination once (n_trials capped)
    by_params = {(t.params["model.arch.window_size"], t.params["model.arch.dim"]): t for t in trials}
    feasible, infeasible = by_params[(2, 16)], by_params[(2, 32)]
    assert feasible.state == TrialState.COMPLETE and feasible.constraints["max_gflops"] <= 0
    assert infeasible.state == TrialState.PRUNED
    assert infeasible.user_attrs["pruned_reason"].startswith("infeasible, not trained: model/gflops=")
    assert infeasible.user_attrs["gflops"] > 0.004 and infeasible.constraints["max_gflops"] > 0
    assert not Path(infeasible.user_attrs["run_dir"]).exists()  # never trained
    assert (infeasible.datetime_complete - infeasible.datetime_start).total_seconds() < 15
    for dim in (16, 32):
        unbuildable = by_params[(4, dim)]
        assert unbuildable.state == TrialState.PRUNED
        assert "cannot be built: window_size[2]=4 does not fit stage 3" in unbuildable.user_attrs["pruned_reason"]
    assert [row.split(",")[0] for row in (study_dir / "pareto.csv").read_text().splitlines()[1:]] == \
        [str(feasible.number)]


def _seed_training_first(choices: list, first) -> int:
    """A sampler seed whose grid order (as the worker derives it) proposes ``first`` first."""
    from fvlab.sweep.workers import GridSampler, worker_seed

    for seed in range(100):
        if GridSampler({"model.lr": choices}, seed=worker_seed(seed, 0)).points[0]["model.lr"] == first:
            return seed
    raise AssertionError("no seed found")


def test_pruning_stops_a_bad_trial_early(tmp_path: Path) -> None:
    choices = [3.0e-3, 1.0e-9]  # the second learns nothing: its validation loss stays where it starts
    seed = _seed_training_first(choices, 3.0e-3)
    base = {**BASE, "data": {**BASE["data"], "init_args": {**BASE["data"]["init_args"], "num_samples": 128}}}
    sweep = write_sweep(tmp_path, base=base, study="pruned", space={"model.lr": {"choices": choices}},
                        objectives={"val/loss": "minimize"}, sampler={"name": "grid", "seed": seed},
                        pruner={"name": "median", "n_startup_trials": 1}, n_trials=2,
                        overrides={"trainer.max_epochs": 3, "trainer.limit_train_batches": 4})
    assert run_sweep(tmp_path, sweep) == 0
    good, bad = journal_study(tmp_path / "runs" / "pruned" / "study.journal", "pruned").get_trials()
    assert good.params["model.lr"] == 3.0e-3 and good.state == TrialState.COMPLETE
    assert bad.state == TrialState.PRUNED
    assert bad.user_attrs["pruned_reason"].startswith("pruned at epoch 1: val/loss=")
    metrics = json.loads((Path(bad.user_attrs["run_dir"]) / "metrics.json").read_text())
    assert metrics["status"] == "pruned" and metrics["epochs"] < 3  # stopped after its first epoch
    assert list(bad.intermediate_values) == [0]


# ---- one training per distinct model -------------------------------------------------------


def test_duplicates_are_trained_once(tmp_path: Path, capsys) -> None:
    # A grid over ct_size with HAT off: one model, trained once (trial 0, the reference, is ct_size 1).
    sweep = write_sweep(tmp_path, study="dups", n_trials=2, space={"model.arch.ct_size": {"choices": [1, 2]}},
                        objectives={"val/acc1_best": "maximize"}, sampler={"name": "grid", "seed": 0},
                        overrides={"model.arch.hat": False})
    capsys.readouterr()
    assert run_sweep(tmp_path, sweep) == 0
    study_dir = tmp_path / "runs" / "dups"
    trials = journal_study(study_dir / "study.journal", "dups").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[1].user_attrs["duplicate_of"] == 0 and trials[1].values == trials[0].values
    assert trials[1].user_attrs["gflops"] == trials[0].user_attrs["gflops"]  # the figures come along
    assert len(list(study_dir.glob("trial_*/metrics.json"))) == 1
    out = capsys.readouterr().out
    assert "trial 1 (trial_0001): val/acc1_best=" in out and "(duplicate of trial 0, not trained)" in out
    assert "trial_0001" not in (study_dir / "pareto.md").read_text()  # the original stands for it
    assert main(["report", str(study_dir), "--out", str(tmp_path / "report")]) == 0
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
            if line.startswith("| #")}
    assert "duplicate of trial 0, not trained" in rows["#1"] and "reference" in rows["#0"]


def test_a_duplicate_of_a_pruned_trial_is_pruned_with_its_reason(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, study="pruned_dups", n_trials=3, **{
        **UNTRAINED, "space": {"model.arch.ct_size": {"choices": [1, 2]}},
        "overrides": {"model.arch.hat": False}})
    assert run_sweep(tmp_path, sweep) == 0
    trials = journal_study(tmp_path / "runs" / "pruned_dups" / "study.journal", "pruned_dups").get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    assert trials[0].user_attrs["pruned_reason"].startswith("infeasible, not trained")
    for trial in trials[1:]:
        assert trial.user_attrs["duplicate_of"] == 0
        assert trial.user_attrs["pruned_reason"] == f"duplicate of trial 0: {trials[0].user_attrs['pruned_reason']}"


def test_a_duplicate_of_a_running_trial_waits_for_it(tmp_path: Path) -> None:
    # This process holds trial 0 RUNNING, as a second worker would; the sweep's worker process draws
    # trial 1, the same model (HAT off: ct_size counts for nothing), and must wait, never train beside it.
    import argparse

    from fvlab.lit.build import apply_overrides
    from fvlab.experiment import load_experiment
    from fvlab.lit.build import build_run
    from fvlab.sweep.command import open_study, prepare_sweep
    from fvlab.sweep.attrs import CANONICAL_ATTR
    from fvlab.sweep.objective import canonical_key
    from fvlab.sweep.storage import process_tag

    sweep_path = write_sweep(tmp_path, study="wait", n_trials=2, space={"model.arch.ct_size": {"choices": [1, 2]}},
                             objectives={"val/acc1_best": "maximize"}, sampler={"name": "grid", "seed": 0},
                             overrides={"model.arch.hat": False})
    runs = tmp_path / "runs"
    args = argparse.Namespace(sweep=str(sweep_path), n_trials=None, timeout=None, workers=1, study_name=None,
                              storage=None, runs_dir=str(runs), confirm=False)
    sweep, _, kind = prepare_sweep(args)
    _, study = open_study(args, sweep, kind, runs / "wait" / "study.journal")
    held = study.ask()  # the reference, queued as trial 0
    params = {key: param.suggest(held) for key, param in sweep.space.items()}
    assert held.number == 0 and params == {"model.arch.ct_size": 1}
    config = apply_overrides(load_experiment(sweep.experiment).base_config(), {**sweep.overrides, **params})
    held.set_user_attr("fvlab_process", process_tag())  # alive: not recovered as dead
    held.set_user_attr(CANONICAL_ATTR, canonical_key(build_run(config, tmp_path / "held", experiment="wait",
                                                               variant="trial_0000")))
    worker = subprocess.Popen([sys.executable, "-c", "import sys; from fvlab.cli import main; sys.exit(main(sys.argv[1:]))",
                               "sweep", str(sweep_path), "--runs-dir", str(runs)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # a reader thread, so that a silent worker cannot hang the test
        for line in worker.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("waiting for it" in line for line in seen):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                break
            seen.append(line)
        assert "trial 1: the same configuration as running trial 0; waiting for it" in "".join(seen), "".join(seen)
        assert worker.poll() is None and not (runs / "wait" / "trial_0001").exists()  # not training meanwhile
        study.tell(held, [0.75])
        worker.wait(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    rest = ""
    while (line := lines.get(timeout=10)) is not None:
        rest += line
    assert worker.returncode == 0, "".join(seen) + rest
    trials = journal_study(runs / "wait" / "study.journal", "wait").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[1].user_attrs["duplicate_of"] == 0 and trials[1].values == [0.75]
    assert not list(runs.glob("wait/trial_*/metrics.json"))  # nothing trained: the original was this process's
    assert "(duplicate of trial 0, not trained)" in rest


def test_hat_swin_space_trains_each_distinct_model_once(tmp_path: Path) -> None:
    # timm's Swin with HAT at 16 px: stage 1 a 4x4 map (four 2x2 windows), stage 2 one 2x2 window.
    # HAT on stage 2 only: ct_size 1 and 2 are one model (no carrier tokens live there).
    arch = {"name": "hat_swin_tiny_patch4_window7_224", "embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2],
            "window_size": 2, "hat": [False, True], "ct_size": 1}
    base = {**BASE, "model": {"arch": arch, "lr": 3.0e-3},
            "data": {**BASE["data"], "init_args": {**BASE["data"]["init_args"], "image_size": 16}}}
    sweep = write_sweep(tmp_path, base=base, study="swin", n_trials=4, **{
        **UNTRAINED, "sampler": {"name": "grid", "seed": 0},
        "space": {"model.arch.hat": {"choices": [[False, True], [True, True]]},
                  "model.arch.ct_size": {"choices": [1, 2]}}})
    assert run_sweep(tmp_path, sweep) == 0
    trials = journal_study(tmp_path / "runs" / "swin" / "study.journal", "swin").get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.PRUNED for t in trials)  # over the GFLOPs bound
    from fvlab.sweep.space import encode_choice

    by_params = {(t.params["model.arch.hat"], t.params["model.arch.ct_size"]): t for t in trials}
    one_window = [by_params[(encode_choice([False, True]), c)] for c in (1, 2)]
    copy = max(one_window, key=lambda t: t.number)
    assert copy.user_attrs["duplicate_of"] == min(t.number for t in one_window)
    assert [t for t in trials if "duplicate_of" in t.user_attrs] == [copy]  # ct_size counts on stage 1
    live = by_params[(encode_choice([True, True]), 1)].user_attrs
    assert live["params_m"] < live["params_built_m"]  # stage 2's carrier weights idle at 16 px
    assert by_params[(encode_choice([True, True]), 2)].user_attrs["gflops"] > live["gflops"]


# ---- one measurement per network -------------------------------------------------------------


def count_measurements(monkeypatch) -> list[list[str]]:
    """Record each side-by-side measurement a sweep's profiler makes (the names it measured)."""
    from fvlab.sweep import objective

    calls: list[list[str]] = []
    real = objective.measure_specs

    def counted(specs, *args, **kwargs):
        calls.append(sorted(specs))
        time.sleep(0.3)  # a measurement takes a while: two workers that race really overlap
        return real(specs, *args, **kwargs)

    monkeypatch.setattr(objective, "measure_specs", counted)
    return calls


def test_trials_of_one_network_carry_one_measurement(tmp_path: Path, monkeypatch) -> None:
    # HAT off: ct_size 1 and 2 (and the base's own ct_size) build one network; other learning rates
    # make them other configurations, each its own trial. An impossible min_throughput prunes each
    # trial right after its measurement, so nothing trains.
    calls = count_measurements(monkeypatch)
    sweep = write_sweep(tmp_path, study="once", n_trials=4, sampler={"name": "random", "seed": 0},
                        space={"model.arch.ct_size": {"choices": [1, 2]},
                               "model.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}},
                        overrides={"model.arch.hat": False}, constraints={"min_throughput": 1.0e12})
    assert run_sweep(tmp_path, sweep) == 0
    trials = journal_study(tmp_path / "runs" / "once" / "study.journal", "once").get_trials()
    assert len(trials) == 4 and not any(t.user_attrs.get("duplicate_of") is not None for t in trials)
    assert {t.params["model.arch.ct_size"] for t in trials} == {1, 2}
    assert all("infeasible, not trained" in t.user_attrs["pruned_reason"] for t in trials)
    assert len(calls) == 1  # one network, one measurement
    assert len({t.user_attrs["measurement"] for t in trials}) == 1
    for name in ("throughput", "throughput_lo", "throughput_hi", "latency_ms", "throughput_measured"):
        assert len({t.user_attrs[name] for t in trials}) == 1, name


def test_two_workers_starting_one_new_network_measure_it_once(tmp_path: Path, monkeypatch) -> None:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from fvlab.lit.build import apply_overrides
    from fvlab.experiment import load_experiment
    from fvlab.lit.build import build_run
    from fvlab.sweep.objective import ArchitectureProfiler
    from fvlab.sweep.storage import budget_lock

    calls = count_measurements(monkeypatch)
    write_sweep(tmp_path)
    base = load_experiment(tmp_path / "base.yaml").base_config()
    journal = tmp_path / "study.journal"
    optuna.create_study(study_name="race", storage=JournalStorage(JournalFileBackend(str(journal))))
    results: dict[int, dict] = {}
    start = threading.Barrier(2)

    def worker(index: int) -> None:
        # Each "worker" its own storage connection, profiler and lock handle, as two processes have.
        storage = JournalStorage(JournalFileBackend(str(journal)))
        study = optuna.load_study(study_name="race", storage=storage)
        profiler = ArchitectureProfiler(study, base, locked=lambda: budget_lock(storage, None, journal, "race"))
        spec = build_run(apply_overrides(base, {"model.arch.depths": [1, 1, 2, 1]}), None, {"trainer.logger": False})
        start.wait()
        results[index] = profiler.measure(spec)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 2 and results[0] == results[1]
    assert calls == [["candidate", "reference"]]  # measured once, beside the reference
