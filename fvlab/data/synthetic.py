"""Random but learnable images, for smoke tests and throughput measurements."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fvlab.data.base import ImageDataModule, InMemoryImages, check_image_size, check_positive

__all__ = ["SyntheticDataModule", "class_patterns", "noisy_samples"]

PATTERN_GRID = 4
NOISE_STD = 1.0


def class_patterns(num_classes: int, in_chans: int, image_size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """One smooth random pattern per class, (num_classes, in_chans, image_size, image_size).

    Upsampled from a coarse grid so the pattern survives a network's pooling and striding;
    scaled to unit standard deviation.
    """
    coarse = torch.randn(num_classes, in_chans, PATTERN_GRID, PATTERN_GRID, generator=generator)
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return patterns / patterns.std().clamp_min(1e-6)


def noisy_samples(patterns: torch.Tensor, count: int, generator: torch.Generator) -> InMemoryImages:
    """``count`` images, classes balanced in random order: their class pattern plus Gaussian noise.

    Scaled so the pixels have roughly unit variance, like normalised real images.
    """
    labels = torch.randperm(count, generator=generator) % len(patterns)
    noise = torch.randn(count, *patterns.shape[1:], generator=generator)
    images = (patterns[labels] + NOISE_STD * noise) / math.sqrt(1 + NOISE_STD**2)
    return InMemoryImages(images, labels)


class SyntheticDataModule(ImageDataModule):
    """Gaussian noise around a smooth per-class pattern: a model can fit it, nothing is read from disk.

    The same ``seed`` gives the same images and labels, whatever the global seed.

    Args:
        num_classes: number of classes.
        in_chans: image channels.
        image_size: side of the square images, at least 8.
        num_samples: training images.
        val_samples: validation images.
        test_samples: test images (a third set, drawn like the others).
        batch_size: images per batch.
        num_workers: DataLoader worker processes; 0 is fastest for in-memory tensors.
        seed: seed of the patterns, noise and labels.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, image_size: int = 32,
                 num_samples: int = 256, val_samples: int = 64, test_samples: int = 64, batch_size: int = 32,
                 num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, num_workers)
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("num_samples", num_samples),
                            ("val_samples", val_samples), ("test_samples", test_samples)):
            check_positive(name, value)
        check_image_size(image_size)
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.image_size = image_size
        self.num_samples = num_samples
        self.val_samples = val_samples
        self.test_samples = test_samples
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        """Generate the training, validation and test images (once)."""
        if self.train_set is None:
            generator = torch.Generator().manual_seed(self.seed)
            patterns = class_patterns(self.num_classes, self.in_chans, self.image_size, generator)
            self.train_set = noisy_samples(patterns, self.num_samples, generator)
            self.val_set = noisy_samples(patterns, self.val_samples, generator)
            # Drawn after the others, so adding a test set left train and val as they were.
            self.test_set = noisy_samples(patterns, self.test_samples, generator)
