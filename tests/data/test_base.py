"""``fvlab.data.base``: what every datamodule shares: the data's random stream resumes from a
checkpointed state, and each datamodule parses from a LightningCLI-style config, its DataError kept."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser

from fvlab.data import DataError, DigitsDataModule

from helpers import make_tree

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_data_streams_resume_from_a_checkpointed_state(tmp_path: Path) -> None:
    """What a resumed run needs: the next epoch's order and augmentation from the saved state."""
    def epoch(dm: DigitsDataModule) -> list[torch.Tensor]:
        return [images for images, _ in dm.train_dataloader()][:3]

    unbroken = DigitsDataModule(image_size=16, batch_size=64)
    unbroken.setup()
    unbroken.seed_data(5)
    epoch(unbroken)
    torch.save(unbroken.state_dict(), tmp_path / "state.pt")
    expected = epoch(unbroken)

    resumed = DigitsDataModule(image_size=16, batch_size=64)
    resumed.setup()
    resumed.seed_data(5)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # as checkpoints load
    for got, want in zip(epoch(resumed), expected, strict=True):
        assert torch.equal(got, want)


# --- config parsing --------------------------------------------------------------------------


def data_parser() -> ArgumentParser:
    """A parser with a LightningCLI-style ``data`` subclass argument."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data")
    return parser


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(("class_name", "init_args"), [
    ("DigitsDataModule", {"image_size": 32, "in_chans": 3}),
    ("SyntheticDataModule", {"num_classes": 3, "image_size": 16}),
    ("TorchvisionDataModule", {"name": "MNIST", "download": True, "image_size": 32}),
    ("ImageFolderDataModule", {"image_size": 32, "in_chans": 1, "auto_augment": None, "mean": [0.4]}),
])
def test_config_parses_and_instantiates(tmp_path: Path, class_name: str, init_args: dict) -> None:
    if class_name in ("TorchvisionDataModule", "ImageFolderDataModule"):
        init_args = {**init_args, "root": str(make_tree(tmp_path, per_class=1))}
    parser = data_parser()
    cfg = parser.parse_object({"data": {"class_path": f"fvlab.data.{class_name}", "init_args": init_args}})
    dm = parser.instantiate_classes(cfg).data
    assert type(dm).__name__ == class_name
    for key, value in init_args.items():
        assert dm.hparams[key] == (tuple(value) if isinstance(value, list) else value)
    assert dm.image_size == init_args["image_size"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_config_error_keeps_the_data_error() -> None:
    parser = data_parser()
    cfg = parser.parse_object({"data": {"class_path": "DigitsDataModule", "init_args": {"image_size": 4}}})
    # jsonargparse re-raises as a plain ValueError; the DataError stays reachable as its cause.
    with pytest.raises(ValueError, match="image_size must be") as err:
        parser.instantiate_classes(cfg)
    assert isinstance(err.value, DataError) or isinstance(err.value.__cause__, DataError)
