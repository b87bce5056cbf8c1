"""fvlab/adapters.py: what fvlab takes from its libraries' unpublished parts still behaves as fvlab relies on."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from fvlab.adapters import (CHECKPOINT_PATH_KEYS, MATCH_PREV_GROUP, feature_take_indices, relocate_checkpoint_state,
                            tensorboard_adds_hp_metric, tensorboard_writer_started)


def test_timm_feature_indices_and_group_sentinel() -> None:
    # forward_intermediates(indices=2) of a 4-stage model takes the last two stages.
    assert feature_take_indices(4, 2) == ([2, 3], 3)
    assert feature_take_indices(4, [0, -1]) == ([0, 3], 3)
    assert isinstance(MATCH_PREV_GROUP, tuple) and MATCH_PREV_GROUP[0] > 1000


def test_a_relocated_model_checkpoint_state_restores_its_best_score(tmp_path: Path) -> None:
    old, new = tmp_path / "trial_0002" / "checkpoints", tmp_path / "trial_0005" / "checkpoints"
    saved = ModelCheckpoint(dirpath=old, filename="best", monitor="val/acc1", mode="max")
    saved.best_model_score = torch.tensor(0.75)
    saved.best_model_path = saved.kth_best_model_path = str(old / "best.ckpt")
    saved.last_model_path = str(old / "last.ckpt")
    saved.best_k_models = {str(old / "best.ckpt"): torch.tensor(0.75)}
    state = saved.state_dict()
    assert set(CHECKPOINT_PATH_KEYS) <= set(state) and "best_k_models" in state  # the keys relocated
    callbacks = {"ModelCheckpoint{'monitor': 'val/acc1'}": state, "Other": {"dirpath": str(old)}}
    assert relocate_checkpoint_state(callbacks, old, new) == 1
    assert callbacks["Other"] == {"dirpath": str(old)}
    resumed = ModelCheckpoint(dirpath=new.resolve(), filename="best", monitor="val/acc1", mode="max")
    resumed.load_state_dict(state)
    # Lightning restores the best score only for its own dirpath: relocated, it is kept.
    assert resumed.best_model_score == torch.tensor(0.75)
    assert resumed.best_model_path == str(new.resolve() / "best.ckpt")
    assert list(resumed.best_k_models) == [str(new.resolve() / "best.ckpt")]
    assert resumed.last_model_path == str(new.resolve() / "last.ckpt")


def test_tensorboard_logger_state_read_without_starting_a_writer(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", version="", default_hp_metric=False)
    assert not tensorboard_writer_started(logger) and not tensorboard_adds_hp_metric(logger)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))  # asking started nothing
    logger.experiment.add_scalar("x", 1.0, 0)
    assert tensorboard_writer_started(logger)
    assert tensorboard_adds_hp_metric(TensorBoardLogger(tmp_path, name="other", default_hp_metric=True))
