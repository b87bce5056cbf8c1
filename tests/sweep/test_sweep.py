"""`fvlab sweep` (fvlab.sweep.command, .objective): real sweeps, fronts, constraints, pruning,
one training per distinct model, one throughput scale."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from fvlab.cli import main
from fvlab.sweep import sweep_command
from fvlab.sweep.space import SweepError, parse_param

from helpers import BASE, SWEEP, UNTRAINED, journal_study, run_sweep, write_sweep

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- one real sweep ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_trials(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("sweep")
    sweep = write_sweep(tmp_path)
    assert run_sweep(tmp_path, sweep) == 0
    return tmp_path


@pytest.mark.xdist_group("three_trials")  # one worker computes the module fixture once
def test_three_trial_sweep_storage_runs_and_front(three_trials: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    study_dir = three_trials / "runs" / "tiny"
    study = journal_study(study_dir / "study.journal", "tiny")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert study.metric_names == ["val/acc1_best", "model/throughput"]
    for trial in trials:
        attrs = trial.user_attrs
        for key in ("params_m", "gflops", "throughput", "latency_ms", "val_acc1_best", "run_dir", "seed",
                    "device", "precision"):
            assert attrs.get(key) is not None, key
        run_dir = Path(attrs["run_dir"])
        assert run_dir.name == f"trial_{trial.number:04d}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["variant"] == run_dir.name
        assert trial.values == [metrics["val/acc1_best"], metrics["model/throughput"]]
        assert attrs["test_acc1"] == metrics["test/acc1"] is not None  # measured, never an objective
        assert (run_dir / "config.yaml").is_file()
        # The decoded list, not Optuna's string, reached the model.
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["arch"]["depths"] == [int(d) for d in trial.params["model.arch.depths"].split("-")]
        events = list(run_dir.glob("events.out.tfevents.*"))
        assert len(events) == 1  # one TensorBoard run per trial
        accumulator = EventAccumulator(str(run_dir)).Reload()
        assert {"val/acc1_best", "model/throughput"} <= set(accumulator.Tags()["scalars"])
        hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
        assert {"model.arch.ct_size", "model.arch.depths", "model.lr"} <= set(hparams)
    # Throughput is measured once per architecture: equal architectures share the figure.
    by_arch = {}
    for trial in trials:
        arch = (trial.params["model.arch.ct_size"], trial.params["model.arch.depths"])
        by_arch.setdefault(arch, set()).add(trial.user_attrs["throughput"])
    assert all(len(figures) == 1 for figures in by_arch.values())
    # Pareto front: table, CSV and runnable configs.
    front = (study_dir / "pareto.csv").read_text().splitlines()
    assert front[0].startswith("trial,run,val/acc1_best,model/throughput,test/acc1,model.arch.ct_size,"
                               "model.arch.depths")
    first = trials[int(front[1].split(",")[0])]
    assert float(front[1].split(",")[4]) == first.user_attrs["test_acc1"]
    assert "| test/acc1 |" in (study_dir / "pareto.md").read_text()
    best = sorted((study_dir / "best").glob("trial_*.yaml"))
    assert best and len(best) == len([row for row in front[1:] if "not on the front" not in row])
    # The base experiment's own settings are trial 0, and the table shows it (on the front or below it).
    assert trials[0].user_attrs.get("reference") is True
    assert trials[0].params == {"model.arch.ct_size": 1, "model.arch.depths": "1-1-1-1", "model.lr": 3.0e-3}
    assert not any(t.user_attrs.get("reference") for t in trials[1:])
    import csv

    runs = [row["run"] for row in csv.DictReader((study_dir / "pareto.csv").open())]
    assert sum(run.startswith("trial_0000 (reference") for run in runs) == 1


def test_reference_values_are_normalised_and_must_lie_in_the_space() -> None:
    from fvlab.sweep.space import reference_params

    space = {"model.arch.window_size": parse_param("model.arch.window_size",
                                                   {"choices": [[2, 2, 4, 2], [2, 2, 2, 2]]}),
             "model.arch.hat": parse_param("model.arch.hat", {"choices": [[False, False, True, False], False]}),
             "model.lr": parse_param("model.lr", {"low": 1.0e-4, "high": 1.0e-2, "log": True})}
    base = {"model": {"arch": {"window_size": 2, "hat": [False, False, True, False]}, "lr": 3.0e-3}}
    assert reference_params(space, base) == {"model.arch.window_size": "2-2-2-2",
                                             "model.arch.hat": "false-false-true-false", "model.lr": 3.0e-3}
    with pytest.raises(SweepError, match=r"space.model.arch.window_size: the base experiment's value 4"):
        reference_params(space, {**base, "model": {**base["model"], "arch": {**base["model"]["arch"],
                                                                              "window_size": 4}}})
    with pytest.raises(SweepError, match=r"space.model.lr: .* outside \[0.0001, 0.01\]"):
        reference_params(space, {"model": {**base["model"], "lr": 0.5}})


def test_a_base_value_outside_the_space_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    # fastervit_micro has ct_size 1, which the space leaves out: the reference trial cannot exist.
    sweep = write_sweep(tmp_path, space={**SWEEP["space"], "model.arch.ct_size": {"choices": [2, 3]}})
    assert run_sweep(tmp_path, sweep) == 2
    err = capsys.readouterr().err
    assert "space.model.arch.ct_size: the base experiment's value 1 is not one of the choices" in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


@pytest.mark.xdist_group("three_trials")  # one worker computes the module fixture once
def test_exported_config_runs_with_fvlab_fit(three_trials: Path) -> None:
    study_dir = three_trials / "runs" / "tiny"
    exported = sorted((study_dir / "best").glob("trial_*.yaml"))[0]
    out = three_trials / "refit"
    assert main(["fit", str(exported), "--runs-dir", str(out)]) == 0
    refit = json.loads((out / "tiny_best" / exported.stem / "metrics.json").read_text())
    trial = json.loads((study_dir / exported.stem / "metrics.json").read_text())
    assert refit["status"] == "complete"
    assert refit["config_hash"] == trial["config_hash"]  # the same resolved config, trained again


@pytest.mark.xdist_group("three_trials")  # one worker computes the module fixture once
def test_rerun_resumes_and_changed_space_exits_2(three_trials: Path, capsys) -> None:
    sweep = three_trials / "sweep.yaml"
    journal = three_trials / "runs" / "tiny" / "study.journal"
    size = journal.stat().st_size
    capsys.readouterr()
    assert run_sweep(three_trials, sweep) == 0  # budget met: nothing new
    assert len(journal_study(journal, "tiny").get_trials()) == 3
    assert "3 trial(s) (3 complete)" in capsys.readouterr().out
    changed = write_sweep(three_trials, "changed.yaml",
                          space={**SWEEP["space"], "model.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}})
    size = journal.stat().st_size
    assert run_sweep(three_trials, changed) == 2
    err = capsys.readouterr().err
    assert "different space (model.lr)" in err and "--study-name" in err
    assert journal.stat().st_size == size


@pytest.mark.xdist_group("three_trials")  # one worker computes the module fixture once
def test_changed_base_experiment_or_threads_exit_2(three_trials: Path, capsys) -> None:
    import torch

    journal = three_trials / "runs" / "tiny" / "study.journal"
    edited = three_trials / "edited"
    edited.mkdir(exist_ok=True)

    def rerun(base: dict) -> int:
        sweep = write_sweep(edited, base=base)
        return sweep_command([str(sweep), "--runs-dir", str(three_trials / "runs")])

    capsys.readouterr()
    # The sweep ignores the ablation block and seeds, and model.lr is searched: no change.
    assert rerun({**BASE, "ablation": {"x": {"model.lr": 0.5}}, "seeds": [4], "model": {**BASE["model"], "lr": 5.0e-3}}) == 0
    assert "3 trial(s) (3 complete)" in capsys.readouterr().out
    size = journal.stat().st_size
    changed = {**BASE, "model": {**BASE["model"], "weight_decay": 0.1},
               "trainer": {**BASE["trainer"], "max_epochs": 2}}
    assert rerun(changed) == 2
    err = capsys.readouterr().err
    assert "different base experiment (model.weight_decay, trainer.max_epochs)" in err and "--study-name" in err
    assert len(err.strip().splitlines()) == 1 and journal.stat().st_size == size
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert rerun(BASE) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert f"with {threads} CPU thread(s) per worker, this command would use {threads + 1}" in err
    assert "--workers" in err and "--study-name" in err and journal.stat().st_size == size


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


def test_grid_sampler_order_is_seeded_and_workers_share_the_grid(tmp_path: Path) -> None:
    from fvlab.sweep.storage import open_storage
    from fvlab.sweep.workers import GridSampler

    steps = [0.1 + i * 0.1 for i in range(3)]  # a stepped range as the space lists it: 0.1 + 2 * 0.1 != 0.3
    space = {"b": [1, 2], "a": steps}
    assert GridSampler(space, seed=5).points == GridSampler(space, seed=5).points  # a seed repeats its order
    assert len({str(GridSampler(space, seed=s).points) for s in range(5)}) > 1
    every = [(a, b) for a in steps for b in (1, 2)]
    assert sorted((p["a"], p["b"]) for p in GridSampler(space, seed=5).points) == every
    storage = open_storage(None, tmp_path / "study.journal")
    optuna.create_study(study_name="grid", storage=storage).enqueue_trial({"a": 0.3, "b": 2})  # the reference
    workers = [optuna.load_study(study_name="grid", storage=storage, sampler=GridSampler(space, seed=s))
               for s in (1, 2)]
    for number in range(6):  # as the workers do: queue a point (none waiting), ask, draw its parameters
        study = workers[number % 2]
        if not any(t.state == TrialState.WAITING for t in study.get_trials()):
            study.sampler.enqueue_next(study)
        trial = study.ask()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 0.1 + 2 * 0.1 lies a rounding error above the range
            trial.suggest_float("a", 0.1, 0.3, step=0.1)
        trial.suggest_int("b", 1, 2)
        if number == 2:
            study.tell(trial, 1.0)  # finished or running, a point is held
    points = {(round(t.params["a"], 9), t.params["b"]) for t in workers[0].get_trials()}
    assert len(workers[0].get_trials()) == 6 and len(points) == 6
    with pytest.raises(RuntimeError, match="queued with their point"):
        workers[0].ask().suggest_int("b", 1, 2)


def test_a_grid_is_visited_once_over_reruns(tmp_path: Path, capsys) -> None:
    # Six points, each pruned before training. Every rerun's worker draws another seed (its index in
    # the study), and so another order: it must still take only points that no trial holds.
    space = {"model.arch.ct_size": {"choices": [1, 2]}, "model.lr": {"choices": [1.0e-3, 3.0e-3, 1.0e-2]}}
    sweep = write_sweep(tmp_path, study="grid", n_trials=None,
                        **{**UNTRAINED, "space": space, "sampler": {"name": "grid", "seed": 0}})
    for n_trials in (2, 4, 6):
        assert run_sweep(tmp_path, sweep, "--n-trials", str(n_trials)) == 0
    study = journal_study(tmp_path / "runs" / "grid" / "study.journal", "grid")
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.PRUNED for t in trials)
    assert trials[0].user_attrs["reference"] and trials[0].params["model.lr"] == 3.0e-3
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    assert study.user_attrs["fvlab_workers_started"] == 3
    capsys.readouterr()
    assert run_sweep(tmp_path, sweep, "--n-trials", "8") == 0  # capped at the grid's 6: nothing to run
    assert "[grid] all 6 trial(s) have run; every grid point has run" in capsys.readouterr().out
    assert len(study.get_trials()) == 6 and study.user_attrs["fvlab_workers_started"] == 3


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


def test_configs_with_one_canonical_form_build_the_same_network() -> None:
    import torch

    from fvlab.models import create_model
    from fvlab.sweep.canonical import canonical_arch

    # HAT off: ct_size, propagation and the conv stages' windows change nothing; 2 equals [2, 2, 2, 2].
    a = create_model("fastervit_micro", hat=False, ct_size=1, window_size=2, num_classes=4)
    b = create_model("fastervit_micro", hat=False, ct_size=2, window_size=[4, 4, 2, 2], do_propagation=True,
                     num_classes=4)
    assert canonical_arch(a) == canonical_arch(b)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    # Forms that differ build networks that differ.
    c = create_model("fastervit_micro", ct_size=1, num_classes=4)
    d = create_model("fastervit_micro", ct_size=2, num_classes=4)
    e = create_model("fastervit_micro", ct_size=1, window_size=[2, 2, 1, 2], num_classes=4)
    forms = [canonical_arch(m) for m in (a, c, d, e)]
    assert all(forms[i] != forms[j] for i in range(4) for j in range(i))
    with pytest.raises(RuntimeError):
        a.load_state_dict(c.state_dict())  # carrier-token weights a does not have


def test_canonical_form_at_an_image_size_ignores_carrier_tokens_of_one_window_stages() -> None:
    import types

    import torch

    from fvlab.models import create_model
    from fvlab.sweep.canonical import canonical_arch
    from fvlab.sweep.objective import canonical_key

    # 32 px: stage 3's 2x2 map is one 2x2 window, so no carrier tokens there (the official rule):
    # ct_size 1 or 2, propagation on or off, are one model; HAT off is another (no HAT weights).
    c = create_model("fastervit_micro", ct_size=1, num_classes=4)
    d = create_model("fastervit_micro", ct_size=2, do_propagation=True, num_classes=4)
    off = create_model("fastervit_micro", hat=False, num_classes=4)
    assert canonical_arch(c, 32) == canonical_arch(d, 32) != canonical_arch(off, 32)
    assert {k: v.shape for k, v in c.state_dict().items()} == {k: v.shape for k, v in d.state_dict().items()}
    d.load_state_dict(c.state_dict())
    torch.manual_seed(0)
    small, large = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(c.eval()(small), d.eval()(small))
        # 64 px: 4x4 map, four windows with carrier tokens: different forms, different outputs.
        assert canonical_arch(c, 64) != canonical_arch(d, 64)
        assert not torch.allclose(c(large), d(large), atol=1e-4)
    # A window of 1 at stage 3 gives it four windows at 32 px: carrier tokens count again.
    e = create_model("fastervit_micro", ct_size=1, window_size=[2, 2, 1, 2], num_classes=4)
    f = create_model("fastervit_micro", ct_size=1, window_size=[2, 2, 1, 2], do_propagation=True, num_classes=4)
    assert canonical_arch(e, 32) != canonical_arch(f, 32)
    f.load_state_dict(e.state_dict())
    with torch.no_grad():
        assert not torch.allclose(e.eval()(small), f.eval()(small), atol=1e-4)
    # The sweep's key reads the image size from the data module.
    def spec(network, image_size):
        config = {"model": {"arch": {"name": "fastervit_micro"}}, "data": {"image_size": image_size}}
        return types.SimpleNamespace(config=config, model=types.SimpleNamespace(model=network),
                                     datamodule=types.SimpleNamespace(image_size=image_size))
    assert canonical_key(spec(c, 32)) == canonical_key(spec(d, 32)) != canonical_key(spec(off, 32))
    assert canonical_key(spec(c, 64)) != canonical_key(spec(d, 64))


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

    from fvlab.experiment import apply_overrides, load_experiment
    from fvlab.lit.runner import build_run
    from fvlab.sweep.command import _open_study, prepare_sweep
    from fvlab.sweep.objective import CANONICAL_ATTR, canonical_key
    from fvlab.sweep.storage import process_tag

    sweep_path = write_sweep(tmp_path, study="wait", n_trials=2, space={"model.arch.ct_size": {"choices": [1, 2]}},
                             objectives={"val/acc1_best": "maximize"}, sampler={"name": "grid", "seed": 0},
                             overrides={"model.arch.hat": False})
    runs = tmp_path / "runs"
    args = argparse.Namespace(sweep=str(sweep_path), n_trials=None, timeout=None, workers=1, study_name=None,
                              storage=None, runs_dir=str(runs), confirm=False)
    sweep, _, kind = prepare_sweep(args)
    _, study = _open_study(args, sweep, kind, runs / "wait" / "study.journal")
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


# ---- one throughput scale ----------------------------------------------------------------------


HAT_SPACE = {"model.arch.window_size": {"choices": [[2, 2, 4, 2], [2, 2, 2, 2]]},
             "model.arch.hat": {"choices": [[False, False, True, False], False]}}
# hat left at fastervit_micro's default (on in stage 3): trial 0 names it, and is the same model.
ARCHS_64 = {**BASE, "model": {"arch": {"name": "fastervit_micro", "window_size": [2, 2, 4, 2]}, "lr": 3.0e-3},
            "data": {**BASE["data"], "init_args": {**BASE["data"]["init_args"], "image_size": 64}}}


def test_trial_throughputs_are_on_one_scale(tmp_path: Path) -> None:
    # Window 4 at 64 px makes stage 3 one window (no carrier tokens: hat on and off cost the same);
    # window 2 makes four, with carrier tokens where hat is on. Whether the ratios measured one trial
    # at a time match one side-by-side measurement is timing, checked by benchmarks/sweep_scale.py.
    sweep = write_sweep(tmp_path, base=ARCHS_64, study="scale", space=HAT_SPACE, n_trials=4,
                        sampler={"name": "grid", "seed": 0})
    assert run_sweep(tmp_path, sweep) == 0
    study = journal_study(tmp_path / "runs" / "scale" / "study.journal", "scale")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    scale = study.user_attrs["fvlab_throughput_scale"]
    reference = trials[0]
    assert reference.user_attrs["reference"] and reference.user_attrs["speedup"] == 1.0
    assert reference.user_attrs["throughput"] == scale["throughput"]
    measured = set()
    for trial in trials:
        attrs = trial.user_attrs
        assert attrs["throughput"] == pytest.approx(attrs["speedup"] * scale["throughput"])
        assert attrs["throughput_lo"] <= attrs["throughput"] <= attrs["throughput_hi"]
        assert attrs["throughput_measured"] > 0  # the trial's own moment, kept apart
        measured.add(attrs["throughput_measured"])
        metrics = json.loads((Path(attrs["run_dir"]) / "metrics.json").read_text())
        assert metrics["model/throughput"] == trial.values[1] == attrs["throughput"]
        assert metrics["model/throughput_measured"] == attrs["throughput_measured"]
    assert len(measured) > 1  # each architecture was timed, not copied from the reference
    # After the search the front and the reference were measured again, together (trial 0 is the
    # reference's own network, whatever the spelling of its arch: ratio 1), and pareto.md shows both.
    together = study.user_attrs["fvlab_front_together"]["figures"]
    assert together["0"]["speedup"] == 1.0 and all(figures["throughput"] > 0 for figures in together.values())
    pareto = (tmp_path / "runs" / "scale" / "pareto.md").read_text()
    assert "| model/throughput (together) |" in pareto and "| front (together) |" in pareto


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

    from fvlab.experiment import apply_overrides, load_experiment
    from fvlab.lit.runner import build_run
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
