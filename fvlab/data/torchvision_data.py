"""torchvision's small classification datasets: CIFAR10, CIFAR100, MNIST, FashionMNIST."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Subset
from torchvision import datasets
from torchvision import transforms as T

from fvlab.data.base import (DataError, ImageDataModule, check_channels, check_fraction, check_image_size,
                             stratified_split)

__all__ = ["TorchvisionDataModule", "DatasetSpec", "DATASETS", "build_transform", "channel_stats"]

# ITU-R BT.601 luma weights: what PIL (and torchvision's Grayscale) use for RGB -> 'L'.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class DatasetSpec:
    """What fvlab needs to know about a torchvision dataset before loading it."""

    dataset: type[datasets.VisionDataset]
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    folder: str  # where torchvision keeps the files, relative to root
    crop_flip: bool  # train with random crop (padded) and horizontal flip


DATASETS = {
    "CIFAR10": DatasetSpec(datasets.CIFAR10, 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           "cifar-10-batches-py", crop_flip=True),
    "CIFAR100": DatasetSpec(datasets.CIFAR100, 100, 3, 32, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), "cifar-100-python", crop_flip=True),
    "MNIST": DatasetSpec(datasets.MNIST, 10, 1, 28, (0.1307,), (0.3081,), "MNIST/raw", crop_flip=False),
    "FashionMNIST": DatasetSpec(datasets.FashionMNIST, 10, 1, 28, (0.2860,), (0.3530,), "FashionMNIST/raw",
                                crop_flip=False),
}


def channel_stats(spec: DatasetSpec, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean and std of ``spec``'s images converted to ``in_chans`` channels."""
    if in_chans == spec.channels:
        return spec.mean, spec.std
    if spec.channels == 1:  # grey repeated into each channel
        return spec.mean * in_chans, spec.std * in_chans
    # RGB -> grey: the luma-weighted std is an upper bound, close because colour channels
    # correlate strongly.
    return ((sum(w * m for w, m in zip(LUMA, spec.mean)),),
            (sum(w * s for w, s in zip(LUMA, spec.std)),))


def build_transform(spec: DatasetSpec, image_size: int, in_chans: int, train: bool) -> T.Compose:
    """PIL image -> normalised tensor; training adds crop and flip for the datasets that use them."""
    steps = []
    if train and spec.crop_flip:
        steps += [T.RandomCrop(spec.size, padding=spec.size // 8), T.RandomHorizontalFlip()]
    if image_size != spec.size:
        steps.append(T.Resize((image_size, image_size), antialias=True))
    if in_chans != spec.channels:
        steps.append(T.Grayscale(num_output_channels=in_chans))
    mean, std = channel_stats(spec, in_chans)
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class TorchvisionDataModule(ImageDataModule):
    """A torchvision dataset by name: val held out of its official train split, test its official test split.

    The validation images (``val_fraction`` of the official train split, stratified by class,
    fixed by ``split_seed``) select the model; the official test split is measured once, after
    training.

    Nothing is downloaded unless ``download`` is true; without it the files must already be in
    torchvision's layout under ``root`` (e.g. ``root/cifar-10-batches-py``, ``root/MNIST/raw``).
    CIFAR training adds a random crop (padding 1/8 of the side) and horizontal flip; MNIST-style
    digits and clothes get none. Images are resized when ``image_size`` differs from the native size.

    Args:
        name: dataset: CIFAR10, CIFAR100, MNIST or FashionMNIST (case-insensitive).
        root: folder holding (or receiving) the dataset files.
        download: fetch the files into ``root`` when they are missing (needs network).
        image_size: side of the square images fed to the model, at least 8 (native: 32 CIFAR, 28 MNIST).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        in_chans: 1 or 3; default the dataset's own (CIFAR 3, MNIST 1); conversions go through greyscale.
        val_fraction: share of the official train split held out for validation, in (0, 1).
        split_seed: seed of the train/val split; the same seed gives the same split, whatever
            the global seed.
    """

    def __init__(self, name: str = "CIFAR10", root: str = "data", download: bool = False,
                 image_size: int = 32, batch_size: int = 128, num_workers: int = 4,
                 in_chans: int | None = None, val_fraction: float = 0.1, split_seed: int = 0):
        super().__init__(batch_size, num_workers)
        check_fraction("val_fraction", val_fraction)
        if not 0 <= split_seed < 2**32:
            raise DataError(f"split_seed must lie in [0, 2**32), got {split_seed!r}")
        canonical = {key.lower(): key for key in DATASETS}.get(str(name).lower())
        if canonical is None:
            raise DataError(f"name={name!r} is not a supported torchvision dataset; choose one of "
                            f"{', '.join(DATASETS)}")
        self.spec = DATASETS[canonical]
        check_image_size(image_size)
        in_chans = self.spec.channels if in_chans is None else in_chans
        check_channels(in_chans)
        self.name = canonical
        self.root = Path(root).expanduser()
        self.download = download
        if not download and not self.files.is_dir():
            raise self._missing_files()
        self.save_hyperparameters()
        self.num_classes = self.spec.num_classes
        self.in_chans = in_chans
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    @property
    def files(self) -> Path:
        """The folder where torchvision looks for this dataset's files."""
        return self.root / self.spec.folder

    def _missing_files(self, reason: str = "") -> DataError:
        """The error for a dataset that is not on disk, with both ways to fix it."""
        return DataError(f"{self.name} files not found in {self.files}{reason}; pass "
                         f"--data.init_args.download true to download them into root={str(self.root)!r}, "
                         f"or put torchvision's {self.name} files there")

    def _split(self, train: bool, download: bool = False,
               augment: bool | None = None) -> datasets.VisionDataset:
        """The official train or test split, with missing or broken files reported as DataError."""
        augment = train if augment is None else augment
        transform = build_transform(self.spec, self.image_size, self.in_chans, augment)
        if augment:
            transform = self.augmented(transform)
        try:
            return self.spec.dataset(str(self.root), train=train, transform=transform, download=download)
        except RuntimeError as err:
            if download:
                raise
            raise self._missing_files(f" ({err})") from err

    def prepare_data(self) -> None:
        """Download both splits when ``download`` is true (Lightning runs this on one process only)."""
        if self.download:
            for train in (True, False):
                self._split(train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Load the official splits from ``root`` and hold the validation images out of train (once)."""
        if self.train_set is None:
            official_train = self._split(train=True)
            labels = [int(label) for label in official_train.targets]
            n_val = math.ceil(self.val_fraction * len(labels))
            if min(n_val, len(labels) - n_val) < self.num_classes:
                raise DataError(f"val_fraction={self.val_fraction} holds out {n_val} of {len(labels)} "
                                f"training images: a stratified split needs at least {self.num_classes} "
                                f"on each side; use e.g. 0.1")
            train, val = stratified_split(labels, n_val, self.split_seed)
            self.train_set = Subset(official_train, train.tolist())
            # The same files without augmentation: validation images are only resized and normalised.
            self.val_set = Subset(self._split(train=True, augment=False), val.tolist())
            self.test_set = self._split(train=False)
