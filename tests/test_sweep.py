"""`fvlab sweep`: space parsing, bad sweep files, real sweeps on real storages, faults, workers."""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from fvlab.cli import main
from fvlab.sweep import sweep_command
from fvlab.sweep.space import SweepError, load_sweep, parse_param

pytestmark = pytest.mark.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "tiny_base", "seed_everything": 0,
        "model": {"arch": {"name": "fastervit_micro"}, "lr": 3.0e-3},
        "data": {"class_path": "fvlab.data.SyntheticDataModule",
                 "init_args": {"image_size": 32, "num_classes": 4, "num_samples": 64, "val_samples": 32,
                               "batch_size": 32}},
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False},
        "ablation": {"other": {"model.lr": 1.0e-3}}, "seeds": [0, 1]}  # both ignored by sweeps
SWEEP = {"study": "tiny", "experiment": "base.yaml",
         "space": {"model.arch.ct_size": {"choices": [1, 2]},
                   "model.arch.depths": {"choices": [[1, 1, 1, 1], [1, 1, 2, 1]]},
                   "model.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}},
         "objectives": {"val/acc1_best": "maximize", "model/throughput": "maximize"},
         "sampler": {"name": "tpe", "seed": 0}, "n_trials": 3}


def write_sweep(tmp_path: Path, name: str = "sweep.yaml", base: dict | None = None, **changes) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base or BASE, sort_keys=False))
    sweep = {**SWEEP, **changes}
    sweep = {k: v for k, v in sweep.items() if v is not None}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run_sweep(tmp_path: Path, sweep: Path, *extra: str) -> int:
    return sweep_command([str(sweep), "--runs-dir", str(tmp_path / "runs"), *extra])


def journal_study(path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


# ---- the space ---------------------------------------------------------------------------


def test_space_distributions_and_list_choices_round_trip() -> None:
    depths = parse_param("model.arch.depths", {"choices": [[1, 1, 2, 1], [1, 1, 4, 1]]})
    assert depths.distribution == CategoricalDistribution(["1-1-2-1", "1-1-4-1"])
    assert depths.decode("1-1-4-1") == [1, 1, 4, 1]
    mixed = parse_param("model.arch.window_size", {"choices": [2, [2, 2, 4, 2]]})
    assert [mixed.decode(c) for c in mixed.distribution.choices] == [2, [2, 2, 4, 2]]
    hat = parse_param("model.arch.hat", {"choices": [True, [False, False, True, False]]})
    assert hat.distribution.choices == ("true", "false-false-true-false")
    assert hat.decode("true") is True
    scalar = parse_param("model.arch.ct_size", {"choices": [0, 1, 2]})
    assert scalar.distribution == CategoricalDistribution([0, 1, 2]) and scalar.decoded is None
    assert parse_param("k", {"low": 2, "high": 4, "step": 1}).distribution == IntDistribution(2, 4, step=1)
    assert parse_param("k", {"low": 1.0e-4, "high": 1.0e-2, "log": True}).distribution == \
        FloatDistribution(1e-4, 1e-2, log=True)
    stepped = parse_param("k", {"low": 0.0, "high": 0.5, "step": 0.25})
    assert stepped.distribution == FloatDistribution(0.0, 0.5, step=0.25)
    assert stepped.discrete_values == [0.0, 0.25, 0.5]
    assert parse_param("k", {"low": 0.0, "high": 1.0}).discrete_values is None
    # A real trial gets the decoded list.
    study = optuna.create_study()
    trial = study.ask()
    assert depths.suggest(trial) in ([1, 1, 2, 1], [1, 1, 4, 1])
    assert isinstance(trial.params["model.arch.depths"], str)


@pytest.mark.parametrize("spec, message", [
    ({"choices": []}, "non-empty"),
    ({"low": 3, "high": 1}, "low 3 > high 1"),
    ({"low": 0.0, "high": 1.0, "log": True}, "log needs low > 0"),
    ({"low": 1, "high": 4, "spacing": 1}, "unknown key 'spacing'"),
    ({"choices": [1, 1]}, "repeat"),
    ({"low": 1.0e-3, "high": 1.0e-1, "log": True, "step": 0.1}, "step or log"),
])
def test_bad_distributions(spec: dict, message: str) -> None:
    with pytest.raises(SweepError, match="space.k: .*" + message.replace("(", r"\(")):
        parse_param("k", spec)


SUPERNET_SPACE = {"model.arch.ct_size": {"choices": [1, 2]},
                  "model.arch.depths": {"choices": [[1, 1, 1, 1], [1, 1, 2, 1]]}}
BAD_SWEEPS = [
    ({"objectives": {"val/top1": "maximize"}}, "objectives: unknown metric 'val/top1'"),
    ({"objectives": {"val/acc1_best": "up"}}, "objectives.val/acc1_best"),
    ({"space": {"model.arch.windowsize": {"choices": [1, 2]}}}, "space.model.arch.windowsize: not a key"),
    ({"space": {"model.arch.ct_size": {"choices": []}}}, "space.model.arch.ct_size: choices must be a non-empty"),
    ({"space": {"model.lr": {"low": 0.1, "high": 0.01}}}, "space.model.lr: low 0.1 > high 0.01"),
    ({"space": {"model.lr": {"low": 0.0, "high": 0.01, "log": True}}}, "space.model.lr: log needs low > 0"),
    ({"sampler": "bayes"}, "sampler: unknown sampler 'bayes'"),
    ({"sampler": {"name": "tpe", "n_startup": 3}}, "sampler.n_startup: not an option"),
    ({"pruner": "early"}, "pruner: unknown pruner 'early'"),
    ({"sampler": "grid"}, "space.model.lr: the grid sampler needs discrete values"),
    ({"pruner": "median"}, "Optuna cannot prune multi-objective studies"),
    ({"experiment": "missing.yaml"}, "experiment: file not found: missing.yaml"),
    ({"constraints": {"max_watts": 3}}, "constraints: unknown constraint 'max_watts'"),
    ({"n_trials": 0}, "n_trials: must be a positive integer"),
    ({"overrides": {"trainer.max_epoch": 2}}, "cannot be built"),
    ({"stuff": 1}, "unknown key 'stuff'"),
    ({"confirm": {"seeds": [3, 0]}}, "confirm.seeds: 0 is the seed every trial trains with"),
    ({"confirm": {"seeds": []}}, "confirm.seeds: a non-empty list of integers"),
    ({"confirm": {"seeds": [1, 1]}}, "confirm.seeds: [1, 1] repeats a seed"),
    ({"confirm": [1, 2]}, "confirm: give the seeds to re-train the front with"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 0}}, "supernet.epochs: must be a positive integer"),
    ({"space": SUPERNET_SPACE, "supernet": {"sandwich": 2}}, "supernet.epochs: missing"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2, "sandwich": -1}}, "supernet.sandwich: random subnets"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2, "sandwich": 1.5}}, "supernet.sandwich: random subnets"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2, "distill": "yes"}}, "supernet.distill: must be true or false"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2, "bn_batches": 0}}, "supernet.bn_batches: train batches"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2, "teacher": "big"}}, "supernet.teacher: not a supernet setting"),
    ({"space": SUPERNET_SPACE, "supernet": 8}, "supernet: give its settings"),
    ({"supernet": {"epochs": 2}}, "space.model.lr: a supernet shares weights over model.arch.depths"),
    ({"space": {**SUPERNET_SPACE, "model.arch.mlp_ratio": {"choices": [2.0, 4.0]}}, "supernet": {"epochs": 2}},
     "space.model.arch.mlp_ratio: a supernet shares weights"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2}, "pruner": "rungs"}, "pruner: the trials of a supernet"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2}, "overrides": {"model.ema": True}},
     "supernet: the base experiment cannot train a supernet: model.ema"),
]


@pytest.mark.parametrize("changes, message", BAD_SWEEPS, ids=[m.split(":")[0][:30] for _, m in BAD_SWEEPS])
def test_bad_sweep_file_exits_2_and_writes_nothing(tmp_path: Path, capsys, changes: dict, message: str) -> None:
    sweep = write_sweep(tmp_path, **changes)
    assert run_sweep(tmp_path, sweep) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_supernet_block_parsed_with_defaults_and_part_of_the_identity(tmp_path: Path) -> None:
    from fvlab.models.supernet import SUBNET_KEYS
    from fvlab.sweep.space import SUPERNET_SPACE_KEYS

    assert SUPERNET_SPACE_KEYS == tuple(f"model.arch.{k}" for k in SUBNET_KEYS)
    plain = load_sweep(write_sweep(tmp_path, space=SUPERNET_SPACE))
    assert plain.supernet is None and "supernet" not in plain.identity()  # older studies keep their hash
    sweep = load_sweep(write_sweep(tmp_path, space=SUPERNET_SPACE, supernet={"epochs": 3, "distill": False}))
    assert sweep.supernet == {"epochs": 3, "sandwich": 2, "distill": False, "bn_batches": 20}
    other = load_sweep(write_sweep(tmp_path, space=SUPERNET_SPACE, supernet={"epochs": 4, "distill": False}))
    assert sweep.identity_hash() != other.identity_hash() != plain.identity_hash()


def test_unreachable_storage_error_hides_the_password(tmp_path: Path, capsys) -> None:
    sweep = write_sweep(tmp_path)
    assert run_sweep(tmp_path, sweep, "--storage", "postgresql://fvlab:pw-xyz@127.0.0.1:1/sweeps") == 2
    err = capsys.readouterr().err
    assert "--storage postgresql://fvlab:***@127.0.0.1:1/sweeps: OperationalError" in err and "pw-xyz" not in err


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


def test_a_grid_is_visited_once_over_reruns(tmp_path: Path) -> None:
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


# ---- faults and workers, on the journal file and on PostgreSQL --------------------------------


@pytest.fixture(params=["journal", "postgresql"])
def storage(request) -> str | None:
    """None (the default journal file) or the URL of a fresh PostgreSQL database."""
    if request.param == "journal":
        return None
    return request.getfixturevalue("postgres_url")


def load_study(tmp_path: Path, name: str, storage: str | None) -> optuna.Study:
    if storage is None:
        return journal_study(tmp_path / "runs" / name / "study.journal", name)
    return optuna.load_study(study_name=name, storage=storage)


def fvlab_process(*args: str, stdout: Path | None = None) -> subprocess.Popen:
    code = "import sys; from fvlab.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT,
                            stdout=stdout.open("w") if stdout else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def assert_budget_spent(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    from fvlab.sweep.workers import count_budget

    trials = study.get_trials()
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == n_trials and count_budget(study) == (n_trials, 0)
    runs = [t.user_attrs["run_name"] for t in finished]
    assert len(set(runs)) == n_trials  # no trial ran twice
    return trials


# One architecture: its model metrics are measured once and shared through the study.
LR_ONLY = {"model.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}


PASSWORD = "s3cret-pw"  # the test server trusts local connections: accepted and ignored


def test_kill_9_then_rerun_resumes_in_its_own_run_directory(tmp_path: Path, storage: str | None, capsys) -> None:
    if storage is not None:
        storage = storage.replace("://fvlab@", f"://fvlab:{PASSWORD}@")
    sweep = write_sweep(tmp_path, study="killed", n_trials=3, space=LR_ONLY,
                        objectives={"val/acc1_best": "maximize"},
                        overrides={"trainer.limit_train_batches": 4, "trainer.max_epochs": 4})
    extra = ["--storage", storage] if storage else []
    log = tmp_path / "killed.out"
    process = fvlab_process("sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"), *extra, stdout=log)
    victim = tmp_path / "runs" / "killed" / "trial_0001" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not victim.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGKILL)  # in the middle of trial 1's fit, after its first epoch
    _, killed_err = process.communicate()
    running = [t.number for t in load_study(tmp_path, "killed", storage).get_trials()
               if t.state == TrialState.RUNNING]
    assert running == [1]
    assert run_sweep(tmp_path, sweep, *extra) == 0
    trials = assert_budget_spent(load_study(tmp_path, "killed", storage), 3)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [1] and "ended while running it" in failed[0].user_attrs["fail_reason"]
    retry = next(t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 1)
    assert retry.state == TrialState.COMPLETE and retry.params == failed[0].params
    # Its own directory, continued from the killed attempt's last.ckpt (not started over).
    assert retry.user_attrs["run_name"] == f"trial_{retry.number:04d}" != "trial_0001"
    assert retry.user_attrs["resumed"]["global_step"] >= 2  # at least the first epoch (64 images, batch 32)
    study_dir = tmp_path / "runs" / "killed"
    assert not (study_dir / "trial_0001" / "metrics.json").exists()  # what the killed attempt left
    assert json.loads((study_dir / retry.user_attrs["run_name"] / "metrics.json").read_text())["status"] \
        == "complete"
    # The report's row of the killed attempt shows what it wrote (no accuracy), not the retry's.
    report = ["report", str(study_dir), "--out", str(tmp_path / "report")]
    assert main(report + (["--storage", storage, "--study-name", "killed"] if storage else [])) == 0
    import csv

    from fvlab.report.collect import read_run

    rows = {int(r["trial"]): r for r in csv.DictReader((tmp_path / "report" / "report.csv").open())
            if r["kind"] == "trial"}
    own = read_run(study_dir / "trial_0001").metrics.get("val/acc1_best")  # from its events
    assert rows[1]["status"] == "failed" and rows[1]["wall_s"] == ""  # no final figures: it was killed
    assert rows[1]["val/acc1_best"] == ("" if own is None else str(own))
    assert rows[retry.number]["wall_s"] and float(rows[retry.number]["val/acc1_best"]) >= 0
    if storage is not None:  # the password is never printed or written
        out = capsys.readouterr()
        assert "fvlab:***@" in out.out
        written = [f.read_text(errors="ignore") for f in tmp_path.rglob("*")
                   if f.is_file() and f.suffix in (".md", ".json", ".csv", ".yaml", ".txt")]
        assert any("***" in text for text in written)  # report.md names its masked source
        for text in (out.out, out.err, killed_err, log.read_text(), *written):
            assert PASSWORD not in text


def test_retry_gets_its_own_tag_and_a_trial_killed_4_times_is_given_up(tmp_path: Path) -> None:
    import socket

    from fvlab.sweep.storage import MAX_RETRIES, recover_dead_trials, open_storage
    from fvlab.sweep.workers import count_budget

    storage = open_storage(None, tmp_path / "study.journal")
    study = optuna.create_study(study_name="s", storage=storage)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = {"host": socket.gethostname(), "pid": gone.pid, "start": "gone"}
    trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
    for attempt in range(MAX_RETRIES + 1):
        trial.set_user_attr("fvlab_process", dead)  # the worker running it was killed
        trial.set_user_attr("run_dir", f"runs/s/trial_{trial.number:04d}")
        assert recover_dead_trials(study, storage) == [(trial.number, attempt < MAX_RETRIES)]
        if attempt == MAX_RETRIES:
            break
        trial = study.ask()  # the queued retry, RUNNING before its worker tags it
        assert "fvlab_process" not in trial.user_attrs  # not the dead worker's tag
        assert recover_dead_trials(study, storage) == []  # so no other worker fails the live retry
        assert trial.user_attrs["resume_from"][0] == f"runs/s/trial_{trial.number - 1:04d}"
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * (MAX_RETRIES + 1)
    assert "not retried: killed 4 times" in trials[-1].user_attrs["fail_reason"]
    assert count_budget(study) == (1, 0)  # the given-up trial counts once


def test_two_workers_finish_exactly_n_trials(tmp_path: Path, storage: str | None, capsys) -> None:
    sweep = write_sweep(tmp_path, study="parallel", n_trials=4, space=LR_ONLY,
                        objectives={"val/acc1_best": "maximize"})
    extra = ["--storage", storage] if storage else []
    assert run_sweep(tmp_path, sweep, "--workers", "2", *extra) == 0
    trials = assert_budget_spent(load_study(tmp_path, "parallel", storage), 4)
    assert len(trials) == 4
    assert len({t.user_attrs["fvlab_process"]["pid"] for t in trials}) == 2  # both workers trained
    capsys.readouterr()
    # A rerun with its budget met starts nothing: not even a worker process.
    assert run_sweep(tmp_path, sweep, "--workers", "2", *extra) == 0
    out = capsys.readouterr().out
    assert "[parallel] all 4 trial(s) have run" in out and "worker(s)" not in out
    assert len(load_study(tmp_path, "parallel", storage).get_trials()) == 4


# Every trial infeasible: pruned after its GFLOPs count, never trained (races without training time).
UNTRAINED = dict(space={"model.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                        "model.arch.ct_size": {"choices": [1, 2]}},
                 objectives={"val/acc1_best": "maximize"}, constraints={"max_gflops": 1.0e-6},
                 sampler={"name": "random", "seed": 0})


def test_two_sweeps_started_together_share_the_budget_and_propose_differently(tmp_path: Path,
                                                                               storage: str | None) -> None:
    from fvlab.sweep.workers import WORKERS_ATTR, count_budget

    sweep = write_sweep(tmp_path, study="together", n_trials=4, **UNTRAINED)
    extra = ["--storage", storage] if storage else []
    processes = [fvlab_process("sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"), *extra)
                 for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    assert not any("Traceback" in e for e in errors), errors
    study = load_study(tmp_path, "together", storage)
    trials = study.get_trials()
    assert len(trials) == 4 and count_budget(study) == (4, 0)
    assert all(t.state == TrialState.PRUNED for t in trials)
    assert study.user_attrs[WORKERS_ATTR] == 2
    first: dict[int, dict] = {}
    for t in trials:
        first.setdefault(t.user_attrs["fvlab_process"]["pid"], t.params)
    assert len(first) == 2  # both took trials
    one, two = first.values()
    assert one != two  # distinct sampler seeds


def test_a_single_fixed_seed_worker_reproduces_its_search(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, n_trials=2, **UNTRAINED)
    searches = []
    for name in ("first", "again"):
        assert run_sweep(tmp_path, sweep, "--study-name", name) == 0
        searches.append([t.params for t in load_study(tmp_path, name, None).get_trials()])
    assert searches[0] == searches[1] and len({str(p) for p in searches[0]}) == 2


def test_a_worker_beats_while_its_trial_runs_and_a_silent_one_is_retried(tmp_path: Path, postgres_url: str,
                                                                      monkeypatch) -> None:
    # Another machine's view: only the heartbeat (1 s, 2 s grace here) tells a live trial from a dead one.
    from fvlab.sweep import storage as storages

    for name, value in (("HEARTBEAT_INTERVAL", 1), ("GRACE_PERIOD", 2)):
        monkeypatch.setattr(storages, name, value)
    sweep = write_sweep(tmp_path, study="beats", n_trials=2, space=LR_ONLY, objectives={"val/acc1_best": "maximize"},
                        overrides={"trainer.max_epochs": 1000, "trainer.limit_train_batches": 2})  # killed long before
    code = ("import sys; from fvlab.sweep import storage; storage.HEARTBEAT_INTERVAL, storage.GRACE_PERIOD = 1, 2; "
            "from fvlab.cli import main; sys.exit(main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", code, "sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"),
                                "--storage", postgres_url], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        checkpoint = tmp_path / "runs" / "beats" / "trial_0000" / "checkpoints" / "last.ckpt"
        deadline = time.time() + 240
        while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read()
        study = optuna.load_study(study_name="beats", storage=storages.open_storage(postgres_url, tmp_path / "x"))
        time.sleep(3)  # longer than the grace period: only its heartbeat keeps the trial alive
        optuna.storages.fail_stale_trials(study)
        assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
    finally:
        process.kill()  # no Ctrl-C, no goodbye: a machine that went away
        process.communicate()
    time.sleep(3)
    optuna.storages.fail_stale_trials(study)  # as another machine's worker does before each trial
    dead, retry = study.get_trials()
    assert dead.state == TrialState.FAIL and retry.state == TrialState.WAITING and retry.params == dead.params
    assert retry.user_attrs["resume_from"] == [dead.user_attrs["run_dir"]]  # continues from its checkpoint
    assert "fvlab_process" not in retry.user_attrs


def test_sigterm_records_the_running_trial_as_interrupted(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, study="stopped", n_trials=2, space=LR_ONLY,
                        objectives={"val/acc1_best": "maximize"},
                        overrides={"trainer.max_epochs": 1000, "trainer.limit_train_batches": 2})  # killed long before
    process = fvlab_process("sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"))
    checkpoint = tmp_path / "runs" / "stopped" / "trial_0000" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGTERM)  # Lightning turns it into SystemExit inside fit
    assert process.wait(timeout=120) == 1
    assert "interrupted" in process.stderr.read()
    trials = load_study(tmp_path, "stopped", None).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["fail_reason"] == "interrupted"
    assert trials[1].params == trials[0].params  # queued again: a rerun resumes it
    metrics = json.loads((checkpoint.parent.parent / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"].startswith("interrupted")


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_are_valid(path: Path, monkeypatch) -> None:
    import argparse

    from fvlab.sweep.command import prepare_sweep
    from fvlab.sweep.space import load_sweep

    monkeypatch.chdir(ROOT)
    sweep = load_sweep(path.relative_to(ROOT))
    assert sweep.n_trials and sweep.study == path.stem
    if "imagenet" not in path.name:  # needs an ImageNet folder
        args = argparse.Namespace(sweep=str(path.relative_to(ROOT)), n_trials=None, timeout=None, workers=1,
                                  study_name=None, storage=None, runs_dir="runs")
        prepare_sweep(args)  # every space key exists in the resolved base config


def test_confirm_reports_fresh_seeds_beside_the_selecting_run(tmp_path: Path, capsys) -> None:
    slow = {**BASE, "model": {**BASE["model"], "lr": 1.0e-4}}  # a reference that a sampled lr beats
    sweep = write_sweep(tmp_path, study="confirmed", n_trials=2, space=LR_ONLY, sampler={"name": "random", "seed": 1},
                        objectives={"val/acc1_best": "maximize"}, confirm={"seeds": [5]}, base=slow)
    capsys.readouterr()
    assert run_sweep(tmp_path, sweep, "--confirm") == 2  # no search yet: nothing to confirm
    assert "--confirm: no study at" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert run_sweep(tmp_path, sweep) == 0
    study_dir = tmp_path / "runs" / "confirmed"
    study = journal_study(study_dir / "study.journal", "confirmed")
    best, reference = study.best_trial, study.get_trials()[0]
    assert best.number != reference.number  # so the reference is confirmed too, and compared with

    def confirmed(trial) -> dict:
        run = study_dir / "confirm" / f"trial_{trial.number:04d}" / "seed_5"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["seed"] == 5
        assert yaml.safe_load((run / "config.yaml").read_text())["model"] == \
            yaml.safe_load((study_dir / trial.user_attrs["run_name"] / "config.yaml").read_text())["model"]
        return metrics

    fresh, base = confirmed(best)["val/acc1_best"], confirmed(reference)["val/acc1_best"]
    # The fresh seed alone (one sample: n/a spread), the selecting run beside it, never averaged in.
    row = f"| {best.number} | 5 | {fresh:.4g} ± n/a | {best.values[0]:.4g} | {fresh - base:+.4f} [n/a] (n=1) |"
    reference_row = f"| 0 (reference) | 5 | {base:.4g} ± n/a | {reference.values[0]:.4g} | reference |"
    table = (study_dir / "pareto.md").read_text()
    assert "Confirmed over fresh seeds" in table and row in table and reference_row in table
    assert "not averaged in" in table and "Holm" in table
    # fvlab report shows the same table (read from the runs on disk, without the sweep file).
    assert main(["report", str(study_dir), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Front of study confirmed confirmed over seeds" in report
    assert row in report and reference_row in report
    assert "Variants of confirmed_confirm" not in report  # the confirm runs are not an experiment
    # A rerun (or --confirm) trains nothing again: the confirm runs are complete.
    run = study_dir / "confirm" / f"trial_{best.number:04d}" / "seed_5"
    stamp = (run / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run_sweep(tmp_path, sweep, "--confirm") == 0
    assert "complete, skipped" in capsys.readouterr().out
    assert (run / "metrics.json").stat().st_mtime_ns == stamp
    assert len(journal_study(study_dir / "study.journal", "confirmed").get_trials()) == 2


def test_confirmed_throughput_shows_its_interval() -> None:
    from optuna.distributions import FloatDistribution
    from fvlab.sweep.confirm import _architecture_cell

    trial = optuna.trial.create_trial(value=0.5, params={"model.lr": 1e-3},
                                      distributions={"model.lr": FloatDistribution(1e-4, 1e-2)},
                                      user_attrs={"throughput": 1234.5, "throughput_lo": 1200.0,
                                                  "throughput_hi": 1250.0, "gflops": 0.05})
    assert _architecture_cell(trial, "model/throughput") == "1234 [1200, 1250]"  # not ± 0
    assert _architecture_cell(trial, "model/gflops") == "0.05"


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


def test_trial_throughputs_are_on_one_scale(tmp_path: Path, monkeypatch, request) -> None:
    # Window 4 at 64 px makes stage 3 one window (no carrier tokens: hat on and off cost the same);
    # window 2 makes four, with carrier tokens where hat is on. Measured one trial at a time, their
    # ratios must match one side-by-side measurement of the four.
    monkeypatch.setenv("FVLAB_PROFILE_ROUNDS", "30")
    monkeypatch.setenv("FVLAB_PROFILE_ROUND_S", "0.05")
    # One thread, as under `make test`: threads that spin while another process holds the core
    # make every round a lottery, side by side or not.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
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
    for trial in trials:
        attrs = trial.user_attrs
        assert attrs["throughput"] == pytest.approx(attrs["speedup"] * scale["throughput"])
        assert attrs["throughput_lo"] <= attrs["throughput"] <= attrs["throughput_hi"]
        assert attrs["throughput_measured"] > 0  # the trial's own moment, kept apart
        metrics = json.loads((Path(attrs["run_dir"]) / "metrics.json").read_text())
        assert metrics["model/throughput"] == trial.values[1] == attrs["throughput"]
        assert metrics["model/throughput_measured"] == attrs["throughput_measured"]
    # After the search the front and the reference were measured again, together (trial 0 is the
    # reference's own network, whatever the spelling of its arch: ratio 1), and pareto.md shows both.
    together = study.user_attrs["fvlab_front_together"]["figures"]
    assert together["0"]["speedup"] == 1.0 and all(figures["throughput"] > 0 for figures in together.values())
    pareto = (tmp_path / "runs" / "scale" / "pareto.md").read_text()
    assert "| model/throughput (together) |" in pareto and "| front (together) |" in pareto
    # One side-by-side measurement of the same four architectures.
    space = load_sweep(sweep).space
    variants = {f"t{t.number}": {k: space[k].decode(v) for k, v in t.params.items()} for t in trials}
    experiment = tmp_path / "four.yaml"
    experiment.write_text(yaml.safe_dump({**ARCHS_64, "name": "four", "seeds": None, "ablation": variants}))
    # Three independent profiles, each pair's ratio their median: one burst of load on a shared
    # machine (the parallel suite's DDP tests) must not decide the comparison.
    ratios: dict[tuple[int, int], list[float]] = {}
    for _ in range(3):
        assert main(["profile", str(experiment), "--json", "--rounds", "30", "--runs-dir", str(tmp_path / "runs")]) == 0
        rows = {row["name"]: row for row in json.loads((tmp_path / "runs" / "four" / "profile.json").read_text())}
        for a in trials:
            for b in trials:
                if a.number < b.number:
                    ratios.setdefault((a.number, b.number), []).append(
                        rows[f"t{a.number}"]["model/throughput"] / rows[f"t{b.number}"]["model/throughput"])
    for a in trials:
        for b in trials:
            if a.number < b.number:
                searched = a.user_attrs["throughput"] / b.user_attrs["throughput"]
                together = statistics.median(ratios[(a.number, b.number)])
                assert searched == pytest.approx(together, rel=0.10), (a.params, b.params)


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
