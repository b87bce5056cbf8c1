"""Shared pieces of the datamodules: the error type, argument checks, loaders, in-memory sets,
and the random streams of data order and augmentation."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

__all__ = ["DataError", "DataRandom", "ImageDataModule", "InMemoryImages", "NormaliseGrey", "SeededTransform", "collate_batch",
           "check_positive", "check_image_size", "check_fraction", "check_channels", "check_noise", "check_split_seed", "stratified_split",
           "MIN_IMAGE_SIZE"]

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


def check_noise(value: float, example: float = 0.1) -> None:
    """Raise DataError unless ``value`` is a finite number >= 0 (a pixel-noise standard deviation)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")):
        raise DataError(f"noise must be a number >= 0 (pixel noise std), got {value!r}; e.g. {example}")


def check_split_seed(value: int) -> None:
    """Raise DataError unless ``value`` is an integer seed in [0, 2**32)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise DataError(f"split_seed must be an integer in [0, 2**32), got {value!r}")


def check_channels(in_chans: int, allowed: Sequence[int] = (1, 3)) -> None:
    """Raise DataError unless ``in_chans`` is one of the supported channel counts."""
    if in_chans not in allowed:
        raise DataError(f"in_chans must be one of {tuple(allowed)}, got {in_chans!r}")


def stratified_split(labels: Sequence[int] | np.ndarray, holdout: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the rest and of ``holdout`` items drawn stratified by label; fixed by ``seed``."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    rest, held = train_test_split(np.arange(len(labels)), test_size=holdout, stratify=labels,
                                  random_state=seed)
    return np.sort(rest), np.sort(held)


class DataRandom:
    """The random streams of data order and augmentation, seeded from the run's seed alone.

    The model draws from the global generators while it is built, a different amount for each
    architecture; drawing the shuffle and the augmentation from these streams instead gives two
    variants with one seed the same batches, in the same order, augmented the same way.
    ``order`` shuffles (the DataLoader's generator, which also seeds worker processes);
    ``augment`` holds the torch, Python and NumPy states that augmentation in the main process
    draws from (:class:`SeededTransform`).
    """

    def __init__(self, seed: int = 0):
        self.order = torch.Generator()
        self.seed(seed)

    def seed(self, seed: int) -> None:
        """Restart both streams from ``seed``."""
        self.order.manual_seed(seed)
        # Different from the order stream, so a shuffle and an augmentation never share numbers.
        child = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
        self.torch = torch.Generator().manual_seed(child).get_state()
        self.python = random.Random(child).getstate()
        self.numpy = np.random.RandomState(child).get_state()

    def state_dict(self) -> dict[str, Any]:
        """Both streams' states, as tensors and plain lists (checkpoints load with weights_only=True)."""
        name, keys, pos, has_gauss, cached = self.numpy
        version, internal, gauss = self.python
        return {"order": self.order.get_state(), "torch": self.torch.clone(),
                "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                          float(cached)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue both streams where :meth:`state_dict` left them."""
        self.order.set_state(state["order"])
        self.torch = state["torch"].clone()
        version, internal, gauss = state["python"]
        self.python = (version, tuple(int(v) for v in internal.tolist()), gauss)
        name, keys, pos, has_gauss, cached = state["numpy"]
        self.numpy = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


class SeededTransform:
    """Runs ``transform`` on the augmentation stream of a :class:`DataRandom` instead of the global one.

    In the main process the global torch, Python and NumPy states are swapped for the stream's
    around each call, so transforms written for the global generators (timm's, torchvision's,
    :func:`random_affine`) draw from the stream and the model's generators never move. Worker
    processes use their own global generators, which torch seeds from the DataLoader's
    generator: the order stream.
    """

    def __init__(self, transform: Callable, stream: DataRandom):
        self.transform = transform
        self.stream = stream

    def __call__(self, inputs: Any) -> Any:
        """``transform(inputs)``, drawing from the augmentation stream."""
        if get_worker_info() is not None:
            return self.transform(inputs)
        stream = self.stream
        outer = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.set_rng_state(stream.torch)
        random.setstate(stream.python)
        np.random.set_state(stream.numpy)
        try:
            return self.transform(inputs)
        finally:
            stream.torch, stream.python = torch.get_rng_state(), random.getstate()
            stream.numpy = np.random.get_state()
            torch.set_rng_state(outer[0])
            random.setstate(outer[1])
            np.random.set_state(outer[2])

    def __repr__(self) -> str:
        return f"SeededTransform({self.transform!r})"


BatchTransform = Callable[[torch.Tensor], torch.Tensor]


class InMemoryImages(Dataset):
    """Image and label tensors that are indexed a whole batch at a time.

    The DataLoader calls ``__getitems__`` with the batch's indices, so a batch costs one
    tensor gather and one batched ``transform`` call instead of B Python-level item calls;
    ``collate_batch`` then passes the ready batch through unchanged.

    Args:
        images: (N, C, H, W) float tensor.
        labels: (N,) class labels or (N, H, W) per-pixel classes, any integer dtype (a batch's are int64:
            masks can be stored as uint8, an eighth of the memory).
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
        return images, self.labels[index].long()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image and its label."""
        images, labels = self.__getitems__([index])
        return images[0], labels[0]


def collate_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for InMemoryImages: its ``__getitems__`` already returns a stacked batch."""
    return batch


class NormaliseGrey:
    """Normalise a batch of single-channel images and repeat the channel to ``in_chans``."""

    def __init__(self, mean: float, std: float, in_chans: int):
        self.mean, self.std, self.in_chans = mean, std, in_chans

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The model-ready (B, in_chans, H, W) batch."""
        images = (images - self.mean) / self.std
        # Replicating per batch keeps the stored set single-channel (a third of the memory).
        return images.expand(-1, self.in_chans, -1, -1).contiguous()


class ImageDataModule(pl.LightningDataModule):
    """Loaders shared by the fvlab datamodules; subclasses fill the sets in ``setup``.

    Subclasses set ``num_classes``, ``in_chans`` and ``image_size`` in ``__init__`` (the CLI
    links them to the model before ``setup`` runs) and ``train_set``, ``val_set`` and
    ``test_set`` in ``setup``: three disjoint splits. ``val`` selects (best checkpoint, early
    stop, pruning, sweep objectives); ``test`` is measured once, after training. A datamodule
    without a test split says why in ``no_test_split`` and leaves ``test_set`` None: its test
    metrics are null, never the validation figures.

    Training batches are shuffled and augmented from ``data_random``, seeded with the run's seed
    (:meth:`seed_data`; by default the seed ``seed_everything`` set before the datamodule was
    built), so variants with one seed see the same batches whatever their models drew; its
    state is checkpointed with the datamodule, so a resumed run continues the same streams.
    """

    num_classes: int
    in_chans: int
    image_size: int
    no_test_split: str = ""  # why there is no test split, when there is none

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
        # torch.initial_seed() is the seed seed_everything set, however much was drawn since.
        self.data_random = DataRandom(torch.initial_seed() % 2**32)

    def seed_data(self, seed: int) -> None:
        """Restart the data order and augmentation streams from ``seed`` (the run's seed)."""
        self.data_random.seed(seed)

    def augmented(self, transform: Callable) -> SeededTransform:
        """``transform`` drawing from this datamodule's augmentation stream (for training sets)."""
        return SeededTransform(transform, self.data_random)

    def state_dict(self) -> dict[str, Any]:
        """The data streams' state, saved in checkpoints by Lightning."""
        return {"data_random": self.data_random.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the data streams of a checkpoint (a resumed run matches an unbroken one)."""
        if "data_random" in state_dict:
            self.data_random.load_state_dict(state_dict["data_random"])

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        """A DataLoader over ``dataset`` with the shared settings."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            generator=self.data_random.order if train else None,
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
        """Test batches in a fixed order; DataError when the datamodule has no test split."""
        if self.no_test_split:
            raise DataError(f"{type(self).__name__} has no test split: {self.no_test_split}")
        return self._loader(self.test_set, train=False)
