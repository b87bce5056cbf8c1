"""`fvlab sweep` end to end (fvlab.sweep.command): one real sweep, its storage, runs and front, the
exported config, reruns and changed studies; trial throughputs on one scale and the front measured
together. The trial objective: tests/sweep/test_objective.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from fvlab.cli import main
from fvlab.sweep import sweep_command

from helpers import BASE, SWEEP, journal_study, run_sweep, write_sweep

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
