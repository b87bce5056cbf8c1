"""Cluttered digits: scikit-learn's digits placed at random among fragments of other digits. No download.

A task on which architectures differ. On plain digits every architecture of a small search space
reaches 96-98% and the order of two architectures changes from seed to seed: there is no ranking
for a search to find. Here each image is a canvas of ``image_size`` px holding one digit (its
8x8 image upscaled to ``digit_size``) at a random place, ``distractors`` fragments of other
digits (random ``fragment_size`` crops, so they look like strokes, not like whole digits) and
Gaussian pixel noise; the label is the digit's class. Finding the digit among strokes and noise
takes capacity, so within a short training wider and deeper networks reach visibly higher
accuracy, and seeds of one architecture agree on it. docs/supernet.md gives the calibration.

The 1,797 digits are split three ways (stratified, ``split_seed``) before anything is drawn, so
a test image's digit and its fragments never occur in training. Each split is rendered
``copies`` times with fresh places, fragments and noise (more images from the same digits, and
a validation set large enough that one image is a small step). The whole dataset is generated
once, from ``split_seed``: the same seed gives the same images, whatever the run's seed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fvlab.data.base import (DataError, ImageDataModule, InMemoryImages, NormaliseGrey, check_channels,
                             check_fraction, check_image_size, check_noise, check_positive, check_split_seed)
from fvlab.data.digits import MAX_PIXEL, NUM_CLASSES, NUM_IMAGES, split_indices, split_sizes

__all__ = ["ClutteredDigitsDataModule", "render_cluttered"]


def render_cluttered(digits: np.ndarray, image_size: int, distractors: int, fragment_size: int,
                     noise: float, rng: np.random.Generator) -> np.ndarray:
    """One image per digit of ``digits`` (N, D, D in [0, 1]): each at a random place on a blank
    ``image_size`` canvas with ``distractors`` fragments of the other digits and pixel noise."""
    n, size = len(digits), digits.shape[-1]
    canvas = np.zeros((n, image_size, image_size), dtype=np.float32)
    # Fragments come from the other digits of the split (an offset past the image's own).
    others = rng.integers(0, max(n - 1, 1), (n, distractors))
    others += (others >= np.arange(n)[:, None]) & (n > 1)
    crop = rng.integers(0, size - fragment_size + 1, (n, distractors, 2))
    place = rng.integers(0, image_size - fragment_size + 1, (n, distractors, 2))
    where = rng.integers(0, image_size - size + 1, (n, 2))
    f = fragment_size
    for index in range(n):
        for (cy, cx), (y, x), other in zip(crop[index], place[index], others[index]):
            patch = canvas[index, y:y + f, x:x + f]
            np.maximum(patch, digits[other, cy:cy + f, cx:cx + f], out=patch)
        y, x = where[index]
        patch = canvas[index, y:y + size, x:x + size]
        np.maximum(patch, digits[index], out=patch)  # drawn last: strokes never hide the digit
    canvas += rng.normal(0.0, noise, canvas.shape).astype(np.float32)
    return canvas


@functools.lru_cache(maxsize=4)
def _generate(image_size: int, digit_size: int, distractors: int, fragment_size: int, noise: float,
              copies: int, val_fraction: float, test_fraction: float,
              split_seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(images, labels) of train, val and test; cached per process and settings (a few seconds)."""
    data = load_digits()
    small = torch.from_numpy(data.images).float().div_(MAX_PIXEL).unsqueeze(1)
    digits = F.interpolate(small, size=(digit_size, digit_size), mode="bilinear",
                           align_corners=False).squeeze(1).clamp_(0, 1).numpy()
    rng = np.random.default_rng(split_seed)
    splits = []
    for indices in split_indices(data.target, val_fraction, test_fraction, split_seed):
        images = [render_cluttered(digits[indices], image_size, distractors, fragment_size, noise, rng)
                  for _ in range(copies)]
        splits.append((np.concatenate(images), np.tile(data.target[indices], copies).astype(np.int64)))
    return tuple(splits)


class ClutteredDigitsDataModule(ImageDataModule):
    """Digits at random places among fragments of other digits, with pixel noise (10 classes).

    See the module docstring for why. Difficulty: ``digit_size`` against ``image_size`` (how much
    canvas to search), ``distractors`` and ``fragment_size`` (how much digit-like clutter),
    ``noise``. No augmentation: every copy of a digit is placed and cluttered afresh.

    Args:
        image_size: side of the square canvas, at least ``digit_size``.
        digit_size: side the 8x8 digit is upscaled to, at least 8.
        distractors: fragments of other digits per image, 0 or more.
        fragment_size: side of each fragment (a crop of an upscaled digit), 1 to ``digit_size``.
        noise: standard deviation of the Gaussian pixel noise on [0, 1] images.
        copies: renderings of each digit of a split (train, val and test alike), at least 1.
        batch_size: images per batch.
        num_workers: DataLoader worker processes; 0 is fastest for in-memory tensors.
        val_fraction: share of the digits held out for validation (model selection), in (0, 1).
        test_fraction: share of the digits held out for the test, in (0, 1).
        split_seed: seed of the split and of every image; the same seed gives the same data.
        in_chans: 1 for greyscale, 3 to repeat the grey channel.
    """

    def __init__(self, image_size: int = 32, digit_size: int = 16, distractors: int = 4,
                 fragment_size: int = 8, noise: float = 0.2, copies: int = 2, batch_size: int = 64,
                 num_workers: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 split_seed: int = 0, in_chans: int = 1):
        super().__init__(batch_size, num_workers)
        check_image_size(image_size)
        check_positive("copies", copies)
        if isinstance(digit_size, bool) or not isinstance(digit_size, int) or not 8 <= digit_size <= image_size:
            raise DataError(f"digit_size must be an integer from 8 to image_size ({image_size}), got "
                            f"{digit_size!r}; e.g. half the image_size")
        if isinstance(fragment_size, bool) or not isinstance(fragment_size, int) or \
                not 1 <= fragment_size <= digit_size:
            raise DataError(f"fragment_size must be an integer from 1 to digit_size ({digit_size}), got "
                            f"{fragment_size!r}; e.g. half the digit_size")
        if isinstance(distractors, bool) or not isinstance(distractors, int) or distractors < 0:
            raise DataError(f"distractors must be an integer >= 0, got {distractors!r}; e.g. 4")
        check_noise(noise, 0.2)
        check_fraction("val_fraction", val_fraction)
        check_fraction("test_fraction", test_fraction)
        check_channels(in_chans)
        check_split_seed(split_seed)
        if min(split_sizes(NUM_IMAGES, val_fraction, test_fraction)) < NUM_CLASSES:
            raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave a split with "
                            f"fewer than {NUM_CLASSES} digits; use e.g. 0.2 and 0.2")
        self.save_hyperparameters()
        self.num_classes = NUM_CLASSES
        self.in_chans = in_chans
        self.image_size = image_size
        self.settings = (image_size, digit_size, distractors, fragment_size, float(noise), copies,
                         float(val_fraction), float(test_fraction), split_seed)

    def setup(self, stage: str | None = None) -> None:
        """Generate (or reuse this process's copy of) the three splits."""
        if self.train_set is not None:
            return
        splits = [(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.copy()))
                  for x, y in _generate(*self.settings)]
        train = splits[0][0]
        transform = NormaliseGrey(train.mean().item(), train.std().item(), self.in_chans)
        self.train_set, self.val_set, self.test_set = (InMemoryImages(x, y, transform) for x, y in splits)

