"""What several test modules share: a tiny experiment and a tiny sweep, and how to run them; the
checks of a datamodule's batches and a tiny image folder (tests/data); a model's parameter count.

``pyproject.toml`` puts this directory on ``sys.path`` (pytest's ``pythonpath``), so any test
module can ``from helpers import ...``.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import optuna
import torch
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from PIL import Image

from fvlab.cli import main
from fvlab.sweep import sweep_command

ROOT = Path(__file__).resolve().parents[1]

# ---- a tiny experiment for `fvlab fit` ----------------------------------------------------

MICRO = {"name": "fastervit_micro"}
SYNTHETIC = {"class_path": "fvlab.data.SyntheticDataModule",
             "init_args": {"image_size": 32, "num_classes": 4, "in_chans": 3, "num_samples": 64,
                           "val_samples": 32, "batch_size": 16}}
FAST_TRAINER = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
                "num_sanity_val_steps": 0}


def write_experiment(path: Path, **sections) -> Path:
    """An experiment file at ``path``: fastervit_micro on synthetic 32 px images, 2 batches, ``sections`` on top."""
    config = {"name": "exp", "seed_everything": 0, "model": {"arch": dict(MICRO), "lr": 1e-3},
              "data": SYNTHETIC, "trainer": FAST_TRAINER}
    config.update(sections)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_fit(tmp_path: Path, experiment: Path, *extra: str) -> int:
    """``fvlab fit EXPERIMENT --runs-dir tmp_path/runs ...``, in this process; the exit code."""
    return main(["fit", str(experiment), "--runs-dir", str(tmp_path / "runs"), *extra])


def subprocess_env(test_file: str) -> dict[str, str]:
    """The environment for `fvlab` in a subprocess: ``test_file``'s classes importable (by the
    module's name, as in a config's class_path; it imports this module), and PYTHONPATH kept, so
    that the subprocess runs the fvlab under test, not another installed one."""
    paths = [str(Path(test_file).parent), str(Path(__file__).parent), str(ROOT),
             *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


# ---- a tiny sweep for `fvlab sweep` ------------------------------------------------------

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
    """A sweep file (SWEEP with ``changes``) over the base experiment (BASE, or ``base``) in ``tmp_path``."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base or BASE, sort_keys=False))
    sweep = {**SWEEP, **changes}
    sweep = {k: v for k, v in sweep.items() if v is not None}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run_sweep(tmp_path: Path, sweep: Path, *extra: str) -> int:
    """``fvlab sweep SWEEP --runs-dir tmp_path/runs ...``, in this process; the exit code."""
    return sweep_command([str(sweep), "--runs-dir", str(tmp_path / "runs"), *extra])


def journal_study(path: Path, name: str) -> optuna.Study:
    """The study ``name`` in the journal file at ``path``."""
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


# Every trial infeasible: pruned after its GFLOPs count, never trained (races without training time).
UNTRAINED = dict(space={"model.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                        "model.arch.ct_size": {"choices": [1, 2]}},
                 objectives={"val/acc1_best": "maximize"}, constraints={"max_gflops": 1.0e-6},
                 sampler={"name": "random", "seed": 0})


# ---- datamodules: their batches, a tiny image folder -------------------------------------


def check_batch(batch: tuple[torch.Tensor, torch.Tensor], dm: pl.LightningDataModule, size: int,
                bound: float = 4.0) -> None:
    """A batch of ``size`` normalised float images and int64 labels that fit ``dm``'s attributes."""
    images, labels = batch
    assert images.shape == (size, dm.in_chans, dm.image_size, dm.image_size)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.shape == (size,)
    assert 0 <= labels.min() and labels.max() < dm.num_classes
    assert torch.isfinite(images).all() and images.abs().max() <= bound


def first(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch of a loader."""
    return next(iter(loader))


CLASSES = ("ant", "bee", "cat")


def make_tree(root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = 4) -> Path:
    """root/{train,val}/<class>/ with RGB JPEGs and greyscale PNGs of varied sizes."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                shape = (18 + 3 * i, 24 - 2 * i) + ((3,) if i % 2 == 0 else ())
                image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
                image.save(folder / (f"{i}.jpg" if i % 2 == 0 else f"{i}.png"))
    return root


# ---- models ------------------------------------------------------------------------------


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
