"""Shared pieces of the datamodules: the error type, argument checks, loaders, in-memory sets."""

from __future__ import annotations

from typing import Callable, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["DataError", "ImageDataModule", "InMemoryImages", "collate_batch", "check_positive",
           "check_image_size", "check_fraction", "check_channels", "MIN_IMAGE_SIZE"]

MIN_IMAGE_SIZE = 8


class DataError(ValueError):
    """Bad data configuration: the message names the argument or path and the fix."""


def check_positive(name: str, value: int) -> None:
    """Raise DataError unless ``value`` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{name} must be a positive integer, got {value!r}; set {name} to 1 or more")


def check_image_size(value: int) -> None:
    """Raise DataError unless ``value`` is an integer image side of at least MIN_IMAGE_SIZE."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_IMAGE_SIZE:
        raise DataError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {value!r}; "
                        f"set image_size to {MIN_IMAGE_SIZE} or more (e.g. 32, 64, 224)")


def check_fraction(name: str, value: float) -> None:
    """Raise DataError unless ``value`` lies strictly between 0 and 1."""
    if not 0.0 < value < 1.0:
        raise DataError(f"{name} must lie strictly between 0 and 1, got {value!r}; e.g. set {name} to 0.2")


def check_channels(in_chans: int, allowed: Sequence[int] = (1, 3)) -> None:
    """Raise DataError unless ``in_chans`` is one of the supported channel counts."""
    if in_chans not in allowed:
        raise DataError(f"in_chans must be one of {tuple(allowed)}, got {in_chans!r}")


BatchTransform = Callable[[torch.Tensor], torch.Tensor]


class InMemoryImages(Dataset):
    """Image and label tensors that are indexed a whole batch at a time.

    The DataLoader calls ``__getitems__`` with the batch's indices, so a batch costs one
    tensor gather and one batched ``transform`` call instead of B Python-level item calls;
    ``collate_batch`` then passes the ready batch through unchanged.

    Args:
        images: (N, C, H, W) float tensor.
        labels: (N,) int64 tensor.
        transform: maps a (B, C, H, W) batch to the model's input batch (augment, normalise).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        """Number of images."""
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of images (transformed) and labels at ``indices``."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index]
        if self.transform is not None:
            images = self.transform(images)
        return images, self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image and its label."""
        images, labels = self.__getitems__([index])
        return images[0], labels[0]


def collate_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for InMemoryImages: its ``__getitems__`` already returns a stacked batch."""
    return batch


class ImageDataModule(pl.LightningDataModule):
    """Loaders shared by the fvlab datamodules; subclasses fill the sets in ``setup``.

    Subclasses set ``num_classes``, ``in_chans`` and ``image_size`` in ``__init__`` (the CLI
    links them to the model before ``setup`` runs) and ``train_set``/``val_set`` (optionally
    ``test_set``) in ``setup``.
    """

    num_classes: int
    in_chans: int
    image_size: int

    def __init__(self, batch_size: int, num_workers: int):
        super().__init__()
        check_positive("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise DataError(f"num_workers must be an integer >= 0, got {num_workers!r}; "
                            f"0 loads batches in the main process")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        """A DataLoader over ``dataset`` with the shared settings."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            # A set no larger than one batch would otherwise yield no training step at all.
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch if isinstance(dataset, InMemoryImages) else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, augmented where the datamodule augments."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches: the test split if there is one, else the validation set."""
        return self._loader(self.test_set if self.test_set is not None else self.val_set, train=False)
