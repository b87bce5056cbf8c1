"""Dense pointer: a generated segmentation task whose labels lie outside every local receptive field. No download.

Each ``image_size`` canvas has two side bands, ``band`` px wide. One band holds a column of
``tiles`` grey squares (``digit_size`` px), the pixels to label; they take the class of one
glyph (1 + its class: a texture, or a digit of scikit-learn's set). Every other pixel is
background (class 0). Where the glyph is drawn is the difference:

- ``rule: far`` (the long-range task): the tiles are blank and the glyph lies on the black
  background of the *other* band, at any height. Nothing near a tile says its class.
- ``rule: near`` (the local control): the glyph is drawn on every tile. Same labels, same
  layout, but every label is decidable from the pixel's own neighbourhood.

Why it separates local from global mixing: with the all-MLP decoder, a FasterViT whose stage-3
and stage-4 windows are 2x2 tokens has, at 192 px, a receptive field that ends at column 87 for
the pixels of the left 40 columns and starts at column 57 for those from column 152 on
(measured by :func:`fvlab.models.segmenter.receptive_field`, docs/dense.md). The bands are
40 px, so a tile never sees the other band's glyph through convolutions, downsamplers, windows
or decoder: only carrier tokens (or global attention) can carry it across.

The 1,797 digits are split three ways (stratified, ``split_seed``) before anything is drawn, so
no test digit occurs in training; each split is rendered ``copies`` times. The whole dataset is
generated once, from ``split_seed``, whatever the run's seed. Images and masks are stored as
uint8 (a 192 px training set is 40 MB).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fvlab.data.base import (DataError, ImageDataModule, InMemoryImages, NormaliseGrey, check_channels,
                             check_fraction, check_image_size, check_noise, check_positive, check_split_seed)
from fvlab.data.digits import MAX_PIXEL, NUM_CLASSES, split_indices

__all__ = ["DensePointerDataModule", "render_pointer", "render_patterns", "RULES", "GLYPHS", "BACKGROUND"]

RULES = ("far", "near")
BACKGROUND = 0
TILE_GREY = 0.5  # a tile's level: between the black background and a digit's strokes


def _column(rng: np.random.Generator, image_size: int, size: int, count: int) -> int:
    """The top row of a column of ``count`` squares of ``size``, one gap of 2 px apart."""
    return int(rng.integers(0, image_size - count * (size + 2) + 3))


def render_pointer(digits: np.ndarray, labels: np.ndarray, image_size: int, band: int, tiles: int, rule: str,
                   noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(images in [0, 1], masks) of one split: one image per glyph of ``digits`` (N, D, D), drawn on the
    black background in the band opposite the tiles (``far``) or on every tile (``near``)."""
    n, size = len(digits), digits.shape[-1]
    images = np.zeros((n, image_size, image_size), dtype=np.float32)
    masks = np.full((n, image_size, image_size), BACKGROUND, dtype=np.uint8)
    margin = (band - size) // 2
    for index in range(n):
        tiles_left = bool(rng.integers(0, 2))
        tile_x = margin if tiles_left else image_size - band + margin
        top = _column(rng, image_size, size, tiles)
        for row in range(top, top + tiles * (size + 2), size + 2):
            tile = images[index, row:row + size, tile_x:tile_x + size]
            tile[...] = TILE_GREY
            if rule == "near":
                np.maximum(tile, digits[index], out=tile)
            masks[index, row:row + size, tile_x:tile_x + size] = 1 + labels[index]
        if rule == "far":  # repeated down the whole other band, from a random offset
            x = image_size - band + margin if tiles_left else margin
            for row in range(int(rng.integers(0, size + 2)), image_size - size + 1, size + 2):
                images[index, row:row + size, x:x + size] = digits[index]
    images += rng.normal(0.0, noise, images.shape).astype(np.float32)
    return images, masks


GLYPHS = ("patterns", "digits")
# Ten textures, each decidable from a few pixels by a 3x3 conv: the task is to carry the class, not to read it.
PATTERNS = 10


def render_patterns(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size`` px square texture per label in [0, PATTERNS), at a random phase and contrast."""
    y, x = np.mgrid[0:size, 0:size]
    out = np.empty((len(labels), size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        p = int(rng.integers(0, 6))
        y_, x_ = y + p, x + p
        ring = np.maximum(abs(2 * y - size + 1), abs(2 * x - size + 1)) // 2
        texture = [(y_ // 3) % 2, (x_ // 3) % 2, (y_ // 4 + x_ // 4) % 2, ((x + y_) // 3) % 2,
                   ((x - y_) // 3) % 2, (ring // 3) % 2, ((y_ % 4) < 2) & ((x_ % 4) < 2),
                   (abs(2 * y - size + 1) < 5) | (abs(2 * x - size + 1) < 5), (ring >= size // 2 - 3),
                   np.ones_like(y)][int(label)]
        out[i] = texture * rng.uniform(0.6, 1.0)
    return out


def _glyph_set(glyphs: str, classes: int, digit_size: int, split_seed: int, val_fraction: float,
               test_fraction: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(glyph images, labels) of train, val and test: scikit-learn's digits split three ways, or as
    many random textures per split."""
    data = load_digits(n_class=NUM_CLASSES if glyphs == "patterns" else classes)
    splits = split_indices(data.target, val_fraction, test_fraction, split_seed)
    if glyphs == "patterns":  # as many as the digit splits hold, whatever the classes
        rng = np.random.default_rng([split_seed, 1])
        labels = [rng.integers(0, classes, len(indices)) for indices in splits]
        return [(render_patterns(lab, digit_size, rng), lab) for lab in labels]
    small = torch.from_numpy(data.images).float().div_(MAX_PIXEL).unsqueeze(1)
    digits = F.interpolate(small, size=(digit_size, digit_size), mode="bilinear",
                           align_corners=False).squeeze(1).clamp_(0, 1).numpy()
    return [(digits[indices], data.target[indices]) for indices in splits]


@functools.lru_cache(maxsize=2)
def _generate(image_size: int, digit_size: int, band: int, tiles: int, rule: str, glyphs: str, classes: int,
              noise: float, copies: int, val_fraction: float, test_fraction: float,
              split_seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(uint8 images, uint8 masks) of train, val and test; cached per process and settings."""
    rng = np.random.default_rng(split_seed)
    splits = []
    for shapes, labels in _glyph_set(glyphs, classes, digit_size, split_seed, val_fraction, test_fraction):
        rendered = [render_pointer(shapes, labels, image_size, band, tiles, rule, noise, rng) for _ in range(copies)]
        images = np.concatenate([r[0] for r in rendered])
        # uint8 on [-0.5, 1.5]: noise around the black background and the strokes survives.
        images = np.clip((images + 0.5) * 127.5, 0, 255).round().astype(np.uint8)
        splits.append((images, np.concatenate([r[1] for r in rendered])))
    return tuple(splits)


class DensePointerDataModule(ImageDataModule):
    """Tiles to segment whose class is a glyph in the far band (``far``) or on the tiles (``near``).

    See the module docstring for the task and its receptive-field argument. ``1 + classes``
    classes: background and the digits 0 to ``classes - 1``. No augmentation: every copy is
    drawn afresh.

    Args:
        image_size: side of the square canvas.
        rule: ``far`` (the long-range task) or ``near`` (its local control).
        band: width of each side band that holds the tiles or the digit, at least ``digit_size``;
            the two bands are apart (2 x band < image_size).
        digit_size: side of a tile and of the upscaled 8x8 digit, at least 8.
        tiles: tiles per image, 1 or more (they must fit one above another).
        glyphs: what carries a tile's class: ``patterns`` (ten textures a 3x3 conv tells apart,
            so the task is carrying the class, not reading it) or ``digits`` (scikit-learn's,
            split three ways so no test digit is seen in training).
        classes: how many glyph classes occur (0 to classes - 1), 2 to 10.
        noise: standard deviation of the Gaussian pixel noise on [0, 1] images.
        copies: renderings of each digit of a split, at least 1.
        batch_size: images per batch.
        num_workers: DataLoader worker processes; 0 is fastest for in-memory tensors.
        val_fraction: share of the digits held out for validation (model selection), in (0, 1).
        test_fraction: share of the digits held out for the test, in (0, 1).
        split_seed: seed of the split and of every image; the same seed gives the same data.
        in_chans: 1 for greyscale, 3 to repeat the grey channel.
    """

    def __init__(self, image_size: int = 192, rule: str = "far", band: int = 40, digit_size: int = 24,
                 tiles: int = 2, glyphs: str = "patterns", classes: int = 4, noise: float = 0.1, copies: int = 1, batch_size: int = 32, num_workers: int = 0,
                 val_fraction: float = 0.2, test_fraction: float = 0.2, split_seed: int = 0, in_chans: int = 1):
        super().__init__(batch_size, num_workers)
        check_image_size(image_size)
        check_positive("copies", copies)
        check_positive("tiles", tiles)
        if rule not in RULES:
            raise DataError(f"rule must be one of {', '.join(RULES)}, got {rule!r}; far is the long-range task, "
                            f"near its local control")
        if isinstance(digit_size, bool) or not isinstance(digit_size, int) or digit_size < 8:
            raise DataError(f"digit_size must be an integer >= 8, got {digit_size!r}; e.g. 24")
        if isinstance(band, bool) or not isinstance(band, int) or not digit_size <= band < image_size / 2:
            raise DataError(f"band must be an integer from digit_size ({digit_size}) to below half the "
                            f"image_size ({image_size}), got {band!r}; e.g. 40 at 192 px")
        if tiles * (digit_size + 2) > image_size + 2:
            raise DataError(f"{tiles} tiles of {digit_size} px do not fit one above another in {image_size} px; "
                            f"use fewer tiles or a smaller digit_size")
        if glyphs not in GLYPHS:
            raise DataError(f"glyphs must be one of {', '.join(GLYPHS)}, got {glyphs!r}")
        if isinstance(classes, bool) or not isinstance(classes, int) or not 2 <= classes <= NUM_CLASSES:
            raise DataError(f"classes must be an integer from 2 to {NUM_CLASSES}, got {classes!r}")
        check_noise(noise, 0.1)
        check_fraction("val_fraction", val_fraction)
        check_fraction("test_fraction", test_fraction)
        check_channels(in_chans)
        check_split_seed(split_seed)
        self.save_hyperparameters()
        self.num_classes = 1 + classes
        self.in_chans = in_chans
        self.image_size = image_size
        self.settings = (image_size, digit_size, band, tiles, rule, glyphs, classes, float(noise), copies, float(val_fraction),
                         float(test_fraction), split_seed)

    def setup(self, stage: str | None = None) -> None:
        """Generate (or reuse this process's copy of) the three splits."""
        if self.train_set is not None:
            return
        splits = [(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)) for x, y in _generate(*self.settings)]
        train = splits[0][0]
        # On the stored uint8 scale: the transform normalises each batch as it is drawn.
        mean, std = train.float().mean().item(), train.float().std().item()
        transform = NormaliseGrey(mean, std, self.in_chans)
        self.train_set, self.val_set, self.test_set = (InMemoryImages(x, y, transform) for x, y in splits)
