"""``fvlab.lit.build``: a run's config parsed, merged, checked and built by LightningCLI: bad input
exits 2 with one line and writes nothing (``fvlab profile`` too), --print_config, every shipped
experiment builds, model.arch as a name or full arguments, data overrides, seeded batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fvlab.cli import main
from fvlab.lit.module import ImageClassifier

from helpers import MICRO, ROOT, run_fit, write_experiment

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("extra, sections, message", [
    (["--variant", "nope"], {}, "unknown variant 'nope'"),
    (["--model.arch.foo", "1"], {}, "model.arch.foo"),
    (["--model.arch.ct_size", "abc"], {}, "model.arch.ct_size"),
    (["--trainer.max_epochs", "x"], {}, "trainer.max_epochs"),
    ([], {"model": {"arch": {"name": "fastervit_micro", "window_size": 4}, "lr": 1e-3}},
     "window_size[2]=4 does not fit"),
    ([], {"model": {"arch": {"name": "fastervit_micro", "ct_size": 3}, "lr": 1e-3}}, "ct_size[2]=3"),
    ([], {"data": {"class_path": "fvlab.data.ImageFolderDataModule",
                   "init_args": {"root": "/no/such/imagenet"}}}, "/no/such/imagenet"),
    ([], {"model": {"arch": {"name": "fastervit_99"}}}, "fastervit_99"),
    ([], {"modle": {"lr": 0.1}}, "modle"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, capsys, extra, sections, message) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={"a": {}}, **sections)
    assert run_fit(tmp_path, experiment, *extra) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_bad_input_is_the_only_line_on_stderr(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml")
    done = subprocess.run([sys.executable, "-m", "fvlab.cli", "fit", str(experiment), "--runs-dir",
                           str(tmp_path / "runs"), "--model.optimizer", "adamww"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no "Seed set to 0" first
    assert "model.optimizer" in done.stderr and "adamw" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_print_config_shows_the_resolved_variant(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={"ct0": {"model.arch.ct_size": 0}})
    assert run_fit(tmp_path, experiment, "--print_config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["arch"]["ct_size"] == 0
    assert not (tmp_path / "runs").exists()


SHIPPED = sorted((ROOT / "experiments").glob("*.yaml"))
SMALL = {"ablate_carrier", "ablate_window", "ablate_propagation", "baseline"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_experiment_parses_builds_and_runs(path: Path, tmp_path: Path) -> None:
    from fvlab.experiment import load_experiment
    from fvlab.lit.build import build_run

    experiment = load_experiment(path)
    overrides = ["--trainer.accelerator", "cpu", "--trainer.precision", "32"]
    if path.stem.startswith("imagenet"):
        from PIL import Image
        for split in ("train", "val"):
            for cls in ("a", "b"):
                (tmp_path / "tree" / split / cls).mkdir(parents=True)
                Image.new("RGB", (40, 40)).save(tmp_path / "tree" / split / cls / "0.png")
        overrides += ["--data.init_args.root", str(tmp_path / "tree")]
    if path.stem.startswith("cifar"):
        overrides += ["--data.class_path", "fvlab.data.SyntheticDataModule",
                      "--data.init_args.num_classes", "100"]
    for variant in experiment.variant_names():
        spec = build_run(experiment.layers(variant), tmp_path / "runs" / variant, overrides,
                         experiment=experiment.name, variant=variant)
        assert isinstance(spec.model, ImageClassifier)
    if experiment.name in SMALL:
        # Every variant runs; one seed is enough (seeds change the seed, not the code path).
        seeds = experiment.seeds[:1] if experiment.seeds else None
        assert main(["fit", str(path), "--runs-dir", str(tmp_path / "runs"), "--trainer.fast_dev_run", "1",
                     *(["--seeds", str(seeds[0])] if seeds else [])]) == 0
        from fvlab.runs import run_dir_for
        for variant in experiment.variant_names():
            for seed in seeds or [None]:
                run = run_dir_for(tmp_path / "runs" / experiment.name, variant, seed)
                assert json.loads((run / "metrics.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("arch, ct_size", [
    ("fastervit_micro", [0, 0, 1, 0]),                        # short form: a variant name
    ({"name": None, "dim": 16, "in_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 4],
      "window_size": 2, "ct_size": [0, 0, 2, 0], "mlp_ratio": 2.0}, [0, 0, 2, 0]),  # full arguments
])
def test_arch_as_variant_name_or_full_arguments(tmp_path: Path, arch, ct_size) -> None:
    from fvlab.experiment import load_experiment
    from fvlab.lit.build import build_run

    path = write_experiment(tmp_path / "exp.yaml", model={"arch": arch, "lr": 1e-3})
    experiment = load_experiment(path)
    spec = build_run(experiment.layers("default"), None, experiment=experiment.name, variant="default")
    assert spec.model.model.ct_size == ct_size
    assert spec.model.model.num_classes == 4 and spec.model.model.in_chans == 3  # from the data


def test_data_overrides_work_without_a_data_section(tmp_path: Path) -> None:
    from fvlab.lit.build import build_run
    spec = build_run({"model": {"arch": dict(MICRO)}}, None, ["--data.batch_size", "8",
                                                              "--data.image_size", "32"])
    assert spec.datamodule.batch_size == 8 and type(spec.datamodule).__name__ == "DigitsDataModule"


# ---- fvlab profile checks what fit checks -------------------------------------------------


@pytest.mark.parametrize("extra, sections, message", [
    (["--device", "foo"], {}, "--device 'foo'"),
    (["--device", "cuda:3"], {}, "--device cuda:3"),
    ([], {"model": {"arch": {"name": "fastervit_micro", "checkpoint_path": "/no/such.ckpt"}}}, "/no/such.ckpt"),
    ([], {"model": {"arch": {"name": "fastervit_micro", "window_size": 4}}}, "window_size[2]=4"),
])
def test_profile_rejects_what_fit_rejects(tmp_path: Path, capsys, extra, sections, message) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", **sections)
    assert main(["profile", str(experiment), "--no-throughput", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    if not extra:
        assert run_fit(tmp_path, experiment) == 2  # the same file, the same verdict


# ---- seeds ---------------------------------------------------------------------------------


def _first_batches(config: dict, seed: int, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first training batches of a run as ``fvlab fit`` builds it (the model built first)."""
    from fvlab.lit.build import build_run
    spec = build_run(config, None, seed=seed)
    spec.datamodule.setup("fit")
    batches = []
    for images, labels in spec.datamodule.train_dataloader():
        batches.append((images, labels))
        if len(batches) == count:
            return batches
    return batches


def test_variants_with_one_seed_see_the_same_batches() -> None:
    # Digits: shuffled and augmented. The two architectures draw different amounts from the global
    # generator while they are built (no carrier tokens, fewer weights to initialise).
    data = {"class_path": "fvlab.data.DigitsDataModule", "init_args": {"image_size": 32, "batch_size": 8}}
    with_hat = {"model": {"arch": {"name": "fastervit_micro", "ct_size": 2}}, "data": data}
    without = {"model": {"arch": {"name": "fastervit_micro", "hat": False}}, "data": data}
    a, b = _first_batches(with_hat, seed=3), _first_batches(without, seed=3)
    for (images_a, labels_a), (images_b, labels_b) in zip(a, b, strict=True):
        assert torch.equal(labels_a, labels_b) and torch.equal(images_a, images_b)
    other = _first_batches(with_hat, seed=4)
    assert not torch.equal(a[0][1], other[0][1])  # another seed, another order
