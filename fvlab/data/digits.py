"""scikit-learn's bundled handwritten digits: the embedded default dataset, no download."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fvlab.data.base import (DataError, ImageDataModule, InMemoryImages, check_channels, check_fraction,
                             check_image_size, stratified_split)

__all__ = ["DigitsDataModule", "DigitsBatchTransform", "random_affine", "split_indices", "split_sizes"]

# Fixed by the file that ships with scikit-learn; known here so __init__ can check the split
# sizes without loading anything.
NUM_IMAGES = 1797
NUM_CLASSES = 10
MAX_PIXEL = 16.0


def random_affine(images: torch.Tensor, max_translate: float = 0.125, max_rotate: float = 10.0,
                  scale_range: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Rotate, scale and shift each image of a (B, C, H, W) batch at random; zeros fill the border.

    ``max_translate`` is a fraction of the image side, ``max_rotate`` in degrees. Random numbers
    come from torch's global generator (the datamodule's augmentation stream during training,
    see :class:`~fvlab.data.base.SeededTransform`).
    """
    n = images.shape[0]
    kw = dict(device=images.device, dtype=images.dtype)
    angle = torch.empty(n, **kw).uniform_(-max_rotate, max_rotate).deg2rad_()
    scale = torch.empty(n, **kw).uniform_(*scale_range)
    # affine_grid coordinates span 2 units per image side.
    shift = torch.empty(n, 2, **kw).uniform_(-2 * max_translate, 2 * max_translate)
    # theta maps output to input coordinates, hence the inverse scale.
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DigitsBatchTransform:
    """Augment (optionally), normalise and replicate the channel of a batch of [0, 1] digit images."""

    def __init__(self, mean: float, std: float, in_chans: int, augment: bool):
        self.mean = mean
        self.std = std
        self.in_chans = in_chans
        self.augment = augment

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The model-ready batch: (B, in_chans, H, W), normalised."""
        # Augment before normalising, so the zero fill matches the digits' blank background.
        if self.augment:
            images = random_affine(images)
        images = (images - self.mean) / self.std
        # Replicating per batch keeps the stored set single-channel (a third of the memory).
        return images.expand(-1, self.in_chans, -1, -1).contiguous()


def split_sizes(total: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Train, val and test image counts of a split of ``total`` images."""
    n_val, n_test = math.ceil(val_fraction * total), math.ceil(test_fraction * total)
    return total - n_val - n_test, n_val, n_test


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted train, val and test indices of a stratified three-way split that depends only on ``seed``."""
    _, n_val, n_test = split_sizes(len(labels), val_fraction, test_fraction)
    rest, test = stratified_split(labels, n_test, seed)
    train, val = stratified_split(labels[rest], n_val, seed)
    return rest[train], rest[val], test


class DigitsDataModule(ImageDataModule):
    """The 1,797 8x8 greyscale handwritten digits that ship with scikit-learn (10 classes).

    The images are upscaled once to ``image_size`` (bilinear) and kept in memory as tensors,
    normalised with the training set's mean and std. Training batches get a light random
    rotation, scale and shift (never a flip: a mirrored 2 is not a 2), drawn from the
    datamodule's augmentation stream (seeded with the run's seed). Train, validation and test
    are three disjoint stratified splits, fixed by ``split_seed``.

    Args:
        image_size: side of the square images fed to the model (upscaled from 8 px), at least 8.
        batch_size: images per batch.
        num_workers: DataLoader worker processes; 0 is fastest here since batches are tensor slices.
        val_fraction: share of the images held out for validation (model selection), in (0, 1).
        test_fraction: share of the images held out for the test, measured once after training,
            in (0, 1).
        split_seed: seed of the train/val/test split; the same seed gives the same split,
            whatever the global seed.
        in_chans: 1 for greyscale, 3 to repeat the grey channel (for models built for RGB).
        augment: random rotation (up to 10 degrees), scale (0.9-1.1) and shift (up to 1/8 of the
            side) of the training images.
    """

    def __init__(self, image_size: int = 64, batch_size: int = 64, num_workers: int = 0,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0,
                 in_chans: int = 1, augment: bool = True):
        super().__init__(batch_size, num_workers)
        check_image_size(image_size)
        check_fraction("val_fraction", val_fraction)
        check_fraction("test_fraction", test_fraction)
        check_channels(in_chans)
        if not 0 <= split_seed < 2**32:
            raise DataError(f"split_seed must lie in [0, 2**32), got {split_seed!r}")
        sizes = split_sizes(NUM_IMAGES, val_fraction, test_fraction)
        if min(sizes) < NUM_CLASSES:
            raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} split the "
                            f"{NUM_IMAGES} images into {sizes[0]} train, {sizes[1]} val and {sizes[2]} test: "
                            f"a stratified split needs at least {NUM_CLASSES} in each; use e.g. 0.15 and 0.15")
        self.save_hyperparameters()
        self.num_classes = NUM_CLASSES
        self.in_chans = in_chans
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.augment = augment
        self.mean: float | None = None
        self.std: float | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load, upscale, split and wrap the digits (once; later calls reuse them)."""
        if self.train_set is not None:
            return
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div_(MAX_PIXEL).unsqueeze(1)
        images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                               align_corners=False)
        labels = torch.from_numpy(digits.target).long()
        train, val, test = map(torch.from_numpy, split_indices(digits.target, self.val_fraction,
                                                               self.test_fraction, self.split_seed))
        self.mean = images[train].mean().item()
        self.std = images[train].std().item()
        train_transform = DigitsBatchTransform(self.mean, self.std, self.in_chans, self.augment)
        eval_transform = DigitsBatchTransform(self.mean, self.std, self.in_chans, augment=False)
        self.train_set = InMemoryImages(images[train], labels[train], self.augmented(train_transform))
        self.val_set = InMemoryImages(images[val], labels[val], eval_transform)
        self.test_set = InMemoryImages(images[test], labels[test], eval_transform)
