"""One-shot search in `fvlab sweep`: the supernet trained once into
runs/<study>/supernet/, trials that evaluate its subnets, the confirm table's Kendall tau."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState


from helpers import journal_study, run_sweep

pytestmark = pytest.mark.filterwarnings("ignore")

HAT2 = [False, False, True, False]
# fastervit_micro at 32 px: stage 2 is 2x2 tokens, so window 1 there gives four windows with
# carrier tokens and window 2 one window without: with the two depths, four distinct subnets.
BASE = {"name": "tiny_base", "seed_everything": 0,
        "model": {"arch": {"name": "fastervit_micro", "hat": HAT2, "window_size": [2, 2, 2, 1]}, "lr": 3.0e-3},
        "data": {"class_path": "fvlab.data.SyntheticDataModule",
                 "init_args": {"image_size": 32, "num_classes": 4, "num_samples": 64, "val_samples": 32,
                               "batch_size": 32}},
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False}}
SPACE = {"model.arch.depths": {"choices": [[1, 1, 1, 1], [1, 1, 2, 1]]},
         "model.arch.window_size": {"choices": [[2, 2, 1, 1], [2, 2, 2, 1]]}}
SWEEP = {"study": "oneshot", "experiment": "base.yaml", "space": SPACE,
         "objectives": {"val/acc1_best": "maximize", "model/throughput": "maximize"},
         "sampler": {"name": "grid", "seed": 0},
         "supernet": {"epochs": 1, "sandwich": 1, "bn_batches": 2}}


def write_sweep(tmp_path: Path, **changes) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, **changes}, sort_keys=False))
    return path


def assert_extracted_subnets_validate_as_their_trials(tmp_path: Path, sweep_path: Path, trials: list) -> None:
    """Each trial's extracted checkpoint, loaded stand-alone, validates within one image of the trial."""
    from fvlab.lit.build import apply_overrides
    from fvlab.experiment import load_experiment
    from fvlab.lit.build import build_run
    from fvlab.sweep.oneshot import extract_trial_subnet
    from fvlab.sweep.space import load_sweep

    sweep = load_sweep(sweep_path)
    base = load_experiment(sweep.experiment).base_config()
    study_dir = tmp_path / "runs" / "oneshot"
    images = BASE["data"]["init_args"]["val_samples"]
    for trial in trials:
        path = extract_trial_subnet(sweep, base, study_dir, trial, tmp_path / "extracted" / f"{trial.number}.pt")
        config = apply_overrides(base, {**sweep.overrides, **sweep.decode(trial.params),
                                        "model.arch.checkpoint_path": str(path)})
        spec = build_run(config, None, {"trainer.logger": False})
        measured = spec.trainer.validate(spec.model, datamodule=spec.datamodule, verbose=False)[0]
        assert abs(measured["val/acc1"] - trial.user_attrs["val_acc1_best"]) <= 1 / images + 1e-6, trial.number


def test_one_shot_sweep_trains_the_supernet_once_and_evaluates_every_subnet(tmp_path: Path, capsys) -> None:
    sweep = write_sweep(tmp_path, confirm={"seeds": [1]})
    assert run_sweep(tmp_path, sweep) == 0
    out = capsys.readouterr().out
    study_dir = tmp_path / "runs" / "oneshot"
    supernet = study_dir / "supernet"
    metrics = json.loads((supernet / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs"] == 1 and metrics["variant"] == "supernet"
    assert (supernet / "checkpoints" / "last.ckpt").is_file() and (supernet / "checkpoints" / "best.ckpt").is_file()
    assert list(supernet.glob("events.out.tfevents.*"))
    config = yaml.safe_load((supernet / "config.yaml").read_text())
    assert config["model"]["space"] == {"depths": [[1, 1, 1, 1], [1, 1, 2, 1]],
                                        "window_size": [[2, 2, 1, 1], [2, 2, 2, 1]]}
    assert config["model"]["sandwich"] == 1 and config["trainer"]["max_epochs"] == 1

    study = journal_study(study_dir / "study.journal", "oneshot")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # the whole grid
    scale = study.user_attrs["fvlab_throughput_scale"]
    for trial in trials:
        attrs = trial.user_attrs
        assert attrs["evaluated_on"] == str(supernet) and attrs["bn_batches"] == 2
        assert trial.values[0] == attrs["val_acc1_best"] and 0.0 <= trial.values[0] <= 1.0
        # Measured as the stand-alone FasterViT of the subnet, on the study's one scale.
        assert attrs["throughput"] == pytest.approx(attrs["speedup"] * scale["throughput"])
        assert attrs["params_m"] > 0 and attrs["gflops"] > 0
    params = {(t.params["model.arch.depths"], t.params["model.arch.window_size"]): t.user_attrs["params_m"]
              for t in trials}
    for window in ("2-2-1-1", "2-2-2-1"):
        assert params["1-1-2-1", window] > params["1-1-1-1", window]
    assert params["1-1-1-1", "2-2-1-1"] > params["1-1-1-1", "2-2-2-1"]  # carrier tokens in use
    assert not list(study_dir.glob("trial_*"))  # evaluations train nothing
    assert "supernet: training 1 epoch(s)" in out
    # confirm re-trains the front stand-alone; the table puts the supernet's accuracy beside it.
    confirmed = sorted(p.parent.parent.name for p in (study_dir / "confirm").glob("trial_*/seed_1/metrics.json"))
    assert confirmed and all((study_dir / "best" / f"{name}.yaml").is_file() or name == "trial_0000"
                             for name in confirmed)
    pareto = (study_dir / "pareto.md").read_text()
    assert "val/acc1_best (supernet)" in pareto
    assert f"cannot be judged from {len(confirmed)} confirmed trial(s); it needs at least 4" in pareto
    assert_extracted_subnets_validate_as_their_trials(tmp_path, sweep, trials)

    # A rerun finds the complete supernet and does not train it again.
    last = supernet / "checkpoints" / "last.ckpt"
    stamp = last.stat().st_mtime_ns
    assert run_sweep(tmp_path, sweep) == 0
    assert "supernet: complete" in capsys.readouterr().out
    assert last.stat().st_mtime_ns == stamp

    # Another supernet config: the study says which setting changed ...
    changed = write_sweep(tmp_path, supernet={**SWEEP["supernet"], "epochs": 2})
    assert run_sweep(tmp_path, changed) == 2
    assert "supernet (epochs)" in capsys.readouterr().err
    # ... and a new study in another storage never replaces the trained supernet.
    assert run_sweep(tmp_path, changed, "--storage", str(tmp_path / "other.journal")) == 2
    err = capsys.readouterr().err
    assert "holds a supernet trained with a different config (changed: trainer.max_epochs)" in err
    assert last.stat().st_mtime_ns == stamp


def test_interrupted_supernet_training_resumes_from_last_ckpt(tmp_path: Path, capsys, monkeypatch) -> None:
    # The sweep's own training step (train_supernet, as fvlab sweep calls it), without the trials
    # that the test above runs: a real Trainer stopped in its second epoch, then resumed.
    from fvlab.experiment import load_experiment
    from fvlab.lit import SupernetClassifier
    from fvlab.sweep.oneshot import train_supernet
    from fvlab.sweep.space import load_sweep

    def stop_in_second_epoch(self) -> None:
        if self.current_epoch == 1:
            raise KeyboardInterrupt

    sweep = load_sweep(write_sweep(tmp_path, supernet={**SWEEP["supernet"], "epochs": 2},
                                   space={"model.arch.depths": SPACE["model.arch.depths"]}))
    base = load_experiment(tmp_path / "base.yaml").base_config()
    study_dir = tmp_path / "runs" / "oneshot"
    with monkeypatch.context() as patch:
        patch.setattr(SupernetClassifier, "on_train_epoch_start", stop_in_second_epoch, raising=False)
        with pytest.raises(KeyboardInterrupt):
            train_supernet(sweep, base, study_dir)
    supernet = study_dir / "supernet"
    assert (supernet / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((supernet / "metrics.json").read_text())["status"] == "failed"
    # What a kill -9 leaves: checkpoints and config.yaml, no metrics.json.
    (supernet / "metrics.json").unlink()
    metrics = train_supernet(sweep, base, study_dir)
    assert "resuming" in capsys.readouterr().out
    assert metrics["status"] == "complete" and metrics["epochs"] == 2
    state = torch.load(supernet / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 4  # 2 epochs of 2 batches, none repeated


def test_supernet_killed_by_sigkill_resumes_on_rerun_and_its_trials_run(tmp_path: Path, capsys) -> None:
    # A real `fvlab sweep` process killed with SIGKILL while it trains the supernet; the rerun
    # resumes from the last.ckpt the kill left (no epoch trained twice) and evaluates the grid.
    epochs = 5
    sweep = write_sweep(tmp_path, supernet={**SWEEP["supernet"], "epochs": epochs},
                        space={"model.arch.depths": SPACE["model.arch.depths"]})
    code = "import sys; from fvlab.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, "sweep", str(sweep), "--runs-dir", str(tmp_path / "runs")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    supernet = tmp_path / "runs" / "oneshot" / "supernet"
    last = supernet / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (supernet / "metrics.json").exists()  # killed, not finished
    assert run_sweep(tmp_path, sweep) == 0
    assert "resuming" in capsys.readouterr().out
    metrics = json.loads((supernet / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs"] == epochs
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 * epochs  # two batches an epoch, none trained twice
    trials = journal_study(supernet.parent / "study.journal", "oneshot").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2


def test_kendall_tau_of_supernet_against_stand_alone_with_a_bootstrap_interval(tmp_path: Path) -> None:
    from scipy.stats import kendalltau

    from fvlab.runs import confirm_dir
    from fvlab.sweep.confirm import confirmed_table, rank_agreement

    # A real journal study as a one-shot sweep leaves it, confirm runs' metrics.json as fit_run writes them.
    study = optuna.create_study(study_name="ranked", directions=["maximize", "minimize"],
                                storage=JournalStorage(JournalFileBackend(str(tmp_path / "study.journal"))))
    study.set_user_attr("fvlab_spec", {"supernet": SWEEP["supernet"]})
    supernet = [0.50, 0.60, 0.55, 0.70, 0.80]
    standalone = {1: [0.61, 0.70, 0.72, 0.75, 0.90], 2: [0.59, 0.62, 0.68, 0.79, 0.88]}
    for number, accuracy in enumerate(supernet):
        trial = study.ask()
        trial.set_user_attr("val_acc1_best", accuracy)
        trial.set_user_attr("run_name", f"trial_{number:04d}")
        study.tell(trial, [accuracy, 1.0 + accuracy])  # accurate costs more: all five on the front
        for seed, values in standalone.items():
            run_dir = confirm_dir(tmp_path, number, seed)
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.json").write_text(json.dumps({"status": "complete", "val/acc1_best": values[number]}))
    means = [(a + b) / 2 for a, b in zip(*standalone.values())]
    tau, low, high = rank_agreement(supernet, means)
    assert tau == pytest.approx(kendalltau(supernet, means).statistic) == pytest.approx(0.8)
    assert -1.0 <= low <= tau <= high <= 1.0 and low < high
    table = confirmed_table(study, ["val/acc1_best", "model/params_m"], [1, 2], tmp_path)
    assert "val/acc1_best (supernet)" in table
    assert f"over 5 confirmed trials: τ = 0.80, bootstrap 95% interval [{low:.2f}, {high:.2f}]" in table
    # Three confirmed trials are too few to judge.
    for number in (3, 4):
        for seed in standalone:
            (confirm_dir(tmp_path, number, seed) / "metrics.json").unlink()
    assert "cannot be judged from 3 confirmed trial(s)" in confirmed_table(
        study, ["val/acc1_best", "model/params_m"], [1, 2], tmp_path)


def test_only_an_evaluated_one_shot_trial_can_be_extracted(tmp_path: Path) -> None:
    from optuna.trial import create_trial

    from fvlab.sweep.oneshot import extract_trial_subnet
    from fvlab.sweep.space import SweepError, load_sweep

    one_shot = load_sweep(write_sweep(tmp_path))
    standalone = load_sweep(write_sweep(tmp_path, supernet=None))
    failed = create_trial(state=TrialState.FAIL)
    evaluated = create_trial(state=TrialState.COMPLETE, values=[0.5, 100.0], user_attrs={"bn_batches": 2})
    with pytest.raises(SweepError, match="not a one-shot sweep"):
        extract_trial_subnet(standalone, {}, tmp_path, evaluated, tmp_path / "x.pt")
    with pytest.raises(SweepError, match="is fail: only an evaluated"):
        extract_trial_subnet(one_shot, {}, tmp_path, failed, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
