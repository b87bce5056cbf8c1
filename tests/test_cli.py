"""LightningCLI parses every command's config arguments: --config files, --key value, +=, --print_config;
variants as config fragments; `fvlab sweep --set` as part of the study's identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fvlab.cli import main
from fvlab.experiment import ExperimentError
from fvlab.lit.build import apply_overrides
from fvlab.lit.build import BadConfig, build_run, merge_config
from fvlab.sweep.command import parse_sets
from fvlab.sweep.space import SweepError
from helpers import FAST_TRAINER, run_fit, write_experiment
from helpers import BASE, SWEEP, run_sweep, write_sweep

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- merging fragments ---------------------------------------------------------------------


def test_dotted_fragments_reach_subclass_init_args_and_a_new_class_keeps_what_it_accepts() -> None:
    base = {"model": {"arch": {"name": "fastervit_micro"}},
            "data": {"class_path": "fvlab.data.SyntheticDataModule",
                     "init_args": {"image_size": 32, "num_classes": 4, "num_samples": 64}}}
    merged = merge_config(base, {"data.batch_size": 8, "model.arch.ct_size": 0})
    assert merged["data"]["init_args"] == {"image_size": 32, "num_classes": 4, "num_samples": 64, "batch_size": 8}
    assert merged["model"]["arch"] == {"name": "fastervit_micro", "ct_size": 0}
    switched = apply_overrides(base, {"data.class_path": "fvlab.data.DigitsDataModule"})
    assert switched["data"] == {"class_path": "fvlab.data.DigitsDataModule", "init_args": {"image_size": 32}}
    nested = merge_config(base, {"model": {"arch": {"depths": [1, 1, 2, 1]}}})
    assert nested["model"]["arch"] == {"name": "fastervit_micro", "depths": [1, 1, 2, 1]}


@pytest.mark.parametrize("fragment, message", [
    ({"model.arch.foo": 1}, "foo"),
    ({"trainer.max_epochs": "x"}, "trainer.max_epochs"),
    ({"modle.lr": 0.1}, "modle"),
])
def test_a_bad_fragment_is_one_line_naming_the_key(fragment, message) -> None:
    with pytest.raises(ExperimentError) as info:
        apply_overrides({"model": {"arch": {"name": "fastervit_micro"}}}, fragment)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_arguments_merge_in_order_after_the_fragments(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  lr: 0.05\ntrainer:\n  max_epochs: 3\n")
    layers = [{"model": {"arch": {"name": "fastervit_micro"}, "lr": 1e-3}}, {"model.lr": 2e-3}]
    spec = build_run(layers, None, ["--data.image_size=32", "--config", str(extra), "--trainer.max_epochs", "5"])
    assert spec.config["model"]["lr"] == 0.05 and spec.config["trainer"]["max_epochs"] == 5
    spec = build_run(layers, None, ["--data.image_size=32", "--trainer.max_epochs=5", "--config", str(extra)])
    assert spec.config["trainer"]["max_epochs"] == 3
    with pytest.raises(BadConfig) as info:
        build_run(layers, None, ["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in str(info.value) and "\n" not in str(info.value)


# ---- the commands ----------------------------------------------------------------------------


def test_config_files_merge_in_order_after_the_experiment_and_its_variant(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={"ct0": {"model": {"arch": {"ct_size": 0}}}})
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("model:\n  lr: 0.05\n  arch:\n    ct_size: 1\ntrainer:\n  max_epochs: 3\n")
    second.write_text("trainer:\n  max_epochs: 7\n")
    assert run_fit(tmp_path, experiment, "--config", str(first), "--config", str(second),
                   "--model.weight_decay=0.2", "--print_config=skip_null") == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert out.startswith("name: exp\n") and printed["variant"] == "ct0"
    assert printed["model"]["lr"] == 0.05 and printed["model"]["arch"]["ct_size"] == 1  # after the variant
    assert printed["trainer"]["max_epochs"] == 7 and printed["model"]["weight_decay"] == 0.2
    assert "null" not in out  # skip_null
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, message", [
    (["--config", "/no/such/extra.yaml"], "/no/such/extra.yaml"),
    (["--trainer.callbacks+=no.such.Callback"], "no.such.Callback"),
    (["--config"], "--config"),
])
def test_bad_config_arguments_exit_2_in_one_line_writing_nothing(tmp_path: Path, capsys, extra, message) -> None:
    assert run_fit(tmp_path, write_experiment(tmp_path / "exp.yaml"), *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_an_added_callback_runs_and_is_saved_in_the_runs_config(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    experiment = write_experiment(tmp_path / "exp.yaml", trainer={**FAST_TRAINER, "limit_val_batches": 1})
    assert run_fit(tmp_path, experiment, "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
                   "--trainer.callbacks.logging_interval=step") == 0
    run = tmp_path / "runs" / "exp" / "default"
    config = (run / "config.yaml").read_text()
    assert config.startswith("# fvlab: resolved config of variant 'default' of experiment 'exp'.\n")
    saved = yaml.safe_load(config)
    assert saved["name"] == "exp" and saved["variant"] == "default"
    assert [c["class_path"] for c in saved["trainer"]["callbacks"]] == [
        "lightning.pytorch.callbacks.LearningRateMonitor"]
    assert saved["trainer"]["callbacks"][0]["init_args"]["logging_interval"] == "step"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    lr_tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("lr-")]
    assert lr_tags, events.Tags()["scalars"]
    assert len(events.Scalars(lr_tags[0])) == FAST_TRAINER["limit_train_batches"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "complete"


def test_export_takes_seeds_like_the_other_commands(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", seeds=[3])
    assert main(["export", str(experiment), "--seeds", "4", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "--seed 4" in capsys.readouterr().err  # parsed as the run's seed, then checked


# ---- fvlab sweep --set -------------------------------------------------------------------------


def test_set_values_parse_as_yaml() -> None:
    assert parse_sets(["trainer.max_epochs=1", "model.arch.depths=[1,1,2,1]", "model.arch.hat=false",
                       "data.init_args.root=/data/x"]) == {
        "trainer.max_epochs": 1, "model.arch.depths": [1, 1, 2, 1], "model.arch.hat": False,
        "data.init_args.root": "/data/x"}
    for bad in ("trainer.max_epochs", "max_epochs=1", "=1", "model.lr=[1,"):
        with pytest.raises(SweepError) as info:
            parse_sets([bad])
        assert "--set" in str(info.value)


def test_set_overrides_the_sweep_and_is_part_of_the_study_identity(tmp_path: Path, capsys) -> None:
    sweep = write_sweep(tmp_path, n_trials=1, objectives={"val/acc1_best": "maximize"},
                        space={"model.arch.ct_size": {"choices": [1, 2]}}, overrides={"model.weight_decay": 0.3})
    assert run_sweep(tmp_path, sweep, "--set", "model.weight_decay=0.1", "--set", "trainer.max_epochs=1") == 0
    capsys.readouterr()
    trial = next((tmp_path / "runs" / "tiny").glob("trial_*/config.yaml"))
    assert yaml.safe_load(trial.read_text())["model"]["weight_decay"] == 0.1
    journal = tmp_path / "runs" / "tiny" / "study.journal"
    size = journal.stat().st_size
    assert run_sweep(tmp_path, sweep, "--set", "trainer.max_epochs=1") == 2  # --set model.weight_decay dropped
    err = capsys.readouterr().err
    assert "overrides (model.weight_decay)" in err and "--study-name" in err, err
    assert len(err.strip().splitlines()) == 1 and journal.stat().st_size == size
    assert run_sweep(tmp_path, sweep, "--set", "model.arch.ct_size=1") == 2
    assert "--set model.arch.ct_size: also in space" in capsys.readouterr().err
    assert BASE["trainer"]["max_epochs"] == 1 and SWEEP["n_trials"] == 3  # the shared templates are untouched
