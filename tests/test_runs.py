"""The run layout (fvlab.runs): names, finding runs in a tree a real `fvlab fit` wrote, reading and
writing config.yaml and metrics.json, atomic JSON writes, configuration hashes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fvlab import runs

pytestmark = pytest.mark.filterwarnings("ignore")

SYNTHETIC = {"class_path": "fvlab.data.SyntheticDataModule",
             "init_args": {"image_size": 32, "num_classes": 4, "in_chans": 3, "num_samples": 32,
                           "val_samples": 16, "batch_size": 16}}
EXPERIMENT = {"name": "exp", "seed_everything": 0, "seeds": [3],
              "model": {"arch": {"name": "fastervit_micro"}, "lr": 1e-3}, "data": SYNTHETIC,
              "trainer": {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1,
                          "num_sanity_val_steps": 0, "enable_progress_bar": False},
              "ablation": {"a": {}, "b": {"model.lr": 2e-3}}}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/exp`` as a real ``fvlab fit`` of two variants with seed 3 leaves it."""
    from fvlab.cli import main

    tmp = tmp_path_factory.mktemp("fit")
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(EXPERIMENT, sort_keys=False))
    assert main(["fit", str(path), "--runs-dir", str(tmp / "runs")]) == 0
    return tmp / "runs" / "exp"


# ---- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
def test_seed_directory_names_round_trip(seed: int) -> None:
    assert runs.seed_dir_name(seed) == f"seed_{seed}"
    assert runs.seed_of(runs.seed_dir_name(seed)) == seed
    assert runs.seed_of(Path("runs/exp/a") / runs.seed_dir_name(seed)) == seed


@pytest.mark.parametrize("number, name", [(0, "trial_0000"), (7, "trial_0007"), (1234, "trial_1234"),
                                          (12345, "trial_12345")])
def test_trial_directory_names_round_trip(number: int, name: str) -> None:
    assert runs.trial_dir_name(number) == name
    assert runs.trial_number_of(name) == number


@pytest.mark.parametrize("name", ["a", "seed_", "seed_x", "myseed_1", "seed_1a", "trial_", "trial_x", "seed_1.yaml"])
def test_other_names_are_no_seed_and_no_trial(name: str) -> None:
    assert runs.seed_of(name) is None and runs.trial_number_of(name) is None


def test_run_directories_of_variants_seeds_and_confirm_runs(tmp_path: Path) -> None:
    root = tmp_path / "runs" / "exp"
    assert runs.run_dir_for(root, "a", None) == root / "a"
    assert runs.run_dir_for(root, "a", 3) == root / "a" / "seed_3"
    assert runs.variant_dir_of(root / "a" / "seed_3") == runs.variant_dir_of(root / "a") == root / "a"
    study = tmp_path / "runs" / "search"
    assert runs.confirm_dir(study, 12, 5) == study / "confirm" / "trial_0012" / "seed_5"
    assert runs.best_config_path(study, "trial_0012") == study / "best" / "trial_0012.yaml"
    assert runs.confirm_seeds(study) == [] and not runs.has_trial_dirs(study)
    for number, seed in [(12, 5), (12, 1), (3, 5)]:
        runs.confirm_dir(study, number, seed).mkdir(parents=True)
    (study / "confirm" / "trial_0003" / "notes").mkdir()
    (study / "trial_0000").mkdir()
    assert runs.confirm_seeds(study) == [1, 5] and runs.has_trial_dirs(study)
    assert runs.is_confirm_run(runs.confirm_dir(study, 3, 5), study)
    assert not runs.is_confirm_run(study / "trial_0000", study)


# ---- finding and reading runs ----------------------------------------------------------


def test_find_runs_in_a_tree_that_fvlab_fit_wrote(fitted: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from fvlab.report.collect import discover

    trained = [fitted / "a" / "seed_3", fitted / "b" / "seed_3"]
    assert runs.find_runs(fitted) == trained
    # A run killed after its first write, someone else's logs and config: only the first is a run.
    started = fitted / "c" / "seed_3"
    started.mkdir(parents=True)
    (started / "config.yaml").write_text(f"{runs.CONFIG_HEADER} of variant 'c'\nname: exp\n")
    SummaryWriter(str(fitted / "tensorboard_only")).close()
    (fitted / "notes").mkdir()
    (fitted / "notes" / "config.yaml").write_text("name: not written by fvlab\n")
    (fitted / ".hidden" / "seed_0").mkdir(parents=True)
    (fitted / ".hidden" / "seed_0" / "metrics.json").write_text("{}")
    try:
        assert runs.find_runs(fitted) == [*trained, started]
        assert runs.find_runs(fitted.parent) == [*trained, started]  # from the runs directory
        assert runs.find_runs(trained[0]) == [trained[0]]  # a run directory is one run
        assert runs.find_runs(fitted, skip=fitted / "b") == [trained[0], started]
        assert discover(fitted) == ([*trained, started], [])
        assert all(not runs.is_run_dir(p) for p in (fitted, fitted / "a", fitted / "notes",
                                                     fitted / "tensorboard_only", trained[0] / "checkpoints"))
    finally:
        for path in (started.parent, fitted / "tensorboard_only", fitted / "notes", fitted / ".hidden"):
            shutil.rmtree(path)


def test_read_config_and_metrics_of_a_fitted_run(fitted: Path) -> None:
    run = fitted / "b" / "seed_3"
    config = runs.read_config(run)
    assert (config["name"], config["variant"], config["seeds"]) == ("exp", "b", [3])
    assert (run / "config.yaml").read_text().startswith(
        f"{runs.CONFIG_HEADER} of variant 'b' of experiment 'exp', seed 3.\n")
    trained = runs.trained_config(run)
    assert not set(runs.RUN_LABELS) & set(trained)
    assert trained["seed_everything"] == 3 and trained["model"]["lr"] == 2e-3
    metrics = runs.read_metrics(run)
    assert metrics["status"] == "complete" and (metrics["variant"], metrics["seed"]) == ("b", 3)
    # The hash stored at training time is the hash of the stored config: a rerun recognises the run.
    assert metrics["config_hash"] == runs.config_hash(trained)
    assert runs.config_hash(runs.trained_config(fitted / "a" / "seed_3")) != metrics["config_hash"]


def test_read_missing_or_broken_files_as_none(tmp_path: Path) -> None:
    assert runs.read_config(tmp_path) is None and runs.read_metrics(tmp_path) is None
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    (tmp_path / "metrics.json").write_text('{"status": "comp')
    assert runs.read_config(tmp_path) is None and runs.read_metrics(tmp_path) is None
    (tmp_path / "config.yaml").write_text("- a list\n")
    (tmp_path / "metrics.json").write_text("[1, 2]")
    assert runs.read_config(tmp_path) is None and runs.read_metrics(tmp_path) is None


def test_written_config_runs_in_place(tmp_path: Path) -> None:
    seeded, plain = tmp_path / "exp" / "v" / "seed_5", tmp_path / "exp" / "w"
    for run_dir, seed in ((seeded, 5), (plain, None)):
        run_dir.mkdir(parents=True)
        runs.write_config(run_dir, {"seed_everything": seed or 0, "model": {"lr": 0.1}}, experiment="exp",
                          variant=run_dir.parent.name if seed else run_dir.name, seed=seed)
        assert runs.is_run_config(run_dir / "config.yaml") and runs.is_run_dir(run_dir)
    assert runs.read_config(seeded) == {"name": "exp", "variant": "v", "seeds": [5], "seed_everything": 5,
                                        "model": {"lr": 0.1}}
    assert runs.read_config(plain) == {"name": "exp", "variant": "w", "seed_everything": 0, "model": {"lr": 0.1}}
    assert "seed" not in (plain / "config.yaml").read_text().splitlines()[0]


def test_seeded_and_unseeded_runs_of_a_variant_never_nest(tmp_path: Path) -> None:
    plain = tmp_path / "v"
    plain.mkdir()
    (plain / "metrics.json").write_text("{}")
    assert "holds a run without seeds" in runs.layout_conflict(plain / "seed_0")
    assert runs.layout_conflict(tmp_path / "w" / "seed_0") == runs.layout_conflict(tmp_path / "w") == ""
    (plain / "metrics.json").unlink()
    (plain / "seed_0").mkdir()
    (plain / "seed_0" / "metrics.json").write_text("{}")
    assert "holds runs with seeds (seed_*/)" in runs.layout_conflict(plain)


# ---- atomic writes and hashes ----------------------------------------------------------


def test_write_json_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    runs.write_json(path, {"b": 1, "a": [1.5, None]})
    assert path.read_text() == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    runs.write_json(path, [{"b": 1, "a": 2}], sort_keys=False)
    assert json.loads(path.read_text()) == [{"b": 1, "a": 2}] and path.read_text().index('"b"') < \
        path.read_text().index('"a"')

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("cannot be shown")

    with pytest.raises(RuntimeError):
        runs.write_json(path, {"status": Unprintable()})
    assert json.loads(path.read_text()) == [{"b": 1, "a": 2}]  # the old file, whole
    # The rename fails (a directory is in the way): the temporary file is removed too.
    blocked = tmp_path / "blocked.json"
    blocked.mkdir()
    with pytest.raises(OSError):
        runs.write_json(blocked, {"status": "complete"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.json", "metrics.json"]
    assert list(blocked.iterdir()) == []


def test_config_hash_is_the_one_existing_run_directories_hold() -> None:
    # Pinned: a changed hash would make every existing run look changed and train it again.
    config = {"seed_everything": 0, "model": {"arch": {"name": "fastervit_micro", "ct_size": None}, "lr": 0.001},
              "trainer": {"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": True},
              "data": {"class_path": "x", "init_args": {"image_size": 32}}, "path": Path("/a/b")}
    assert runs.config_hash(config) == "8deec9cacffd87be"
    display_only = {**config, "trainer": {"max_epochs": 2, "enable_progress_bar": True}}
    assert runs.config_hash(display_only) == runs.config_hash(config)
    assert runs.config_hash({**config, "trainer": {"max_epochs": 3}}) != runs.config_hash(config)
    assert runs.stable_hash({"arch": {"name": "fastervit_micro"}, "image_size": 32}) == "8b2df6720d9e9178"
    assert config["trainer"]["enable_progress_bar"] is False  # the caller's config is left as it was


# ---- continuing a killed attempt's checkpoints -------------------------------------------------


def test_continue_attempt_copies_the_newest_loadable_checkpoint(fitted: Path, tmp_path: Path) -> None:
    # Real checkpoints that `fvlab fit` wrote stand in for two earlier attempts of one trial: the
    # newer one was killed while writing last.ckpt (a truncated file), so the older one is taken.
    import torch

    from fvlab.sweep.objective import continue_attempt

    older, newer = fitted / "a" / "seed_3", tmp_path / "trial_0004"  # the fit's own directory: its paths
    (newer / "checkpoints").mkdir(parents=True)
    (newer / "checkpoints" / "last.ckpt").write_bytes(
        (older / "checkpoints" / "last.ckpt").read_bytes()[:100])
    target = tmp_path / "trial_0007"
    assert continue_attempt([str(tmp_path / "never_started"), str(newer), str(older)], target) == (
        str(target / "checkpoints" / "last.ckpt"), torch.load(older / "checkpoints" / "last.ckpt",
                                                              weights_only=False)["global_step"])
    assert (target / "checkpoints" / "best.ckpt").is_file() == (older / "checkpoints" / "best.ckpt").is_file()
    state = torch.load(target / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # ModelCheckpoint's remembered paths now point into the new attempt's directory.
    paths = [value for key, callback in state["callbacks"].items() if key.startswith("ModelCheckpoint")
             for value in callback.values() if isinstance(value, str) and value.endswith(".ckpt")]
    assert paths and all(p.startswith(str((target / "checkpoints").resolve())) for p in paths)


def test_continue_attempt_without_a_checkpoint_starts_afresh(tmp_path: Path) -> None:
    from fvlab.sweep.objective import continue_attempt

    (tmp_path / "trial_0002" / "checkpoints").mkdir(parents=True)
    assert continue_attempt([str(tmp_path / "trial_0002"), str(tmp_path / "gone")], tmp_path / "trial_0005") is None
    assert not (tmp_path / "trial_0005").exists()
