"""Class-per-folder images (``root/train/<class>/*``, ``root/val/<class>/*``, optionally
``root/test/<class>/*``) with timm's transforms."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torchvision.datasets import ImageFolder

from fvlab.data.base import DataError, ImageDataModule, check_channels, check_image_size

__all__ = ["ImageFolderDataModule", "class_folders", "clamp_posterize_bits", "load_image", "posterize"]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
GREY_MEAN, GREY_STD = (0.5,), (0.5,)


def class_folders(path: Path) -> list[str]:
    """Sorted names of the sub-folders of ``path``: the classes, in ImageFolder's label order."""
    return sorted(entry.name for entry in path.iterdir() if entry.is_dir())


def load_image(path: str, mode: str = "RGB") -> Image.Image:
    """Open an image file and convert it to the PIL ``mode`` ('RGB' or 'L')."""
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize with ``bits_to_keep`` clamped to 1..8, the range every Pillow accepts."""
    # timm's level functions ask for 0 bits at the strong end of 'Posterize' and 'PosterizeIncreasing'
    # (below 0 with mmax > 10); Pillow >= 13 raises on that. 1 bit is the strongest valid posterize.
    return auto_augment.posterize(img, min(max(int(bits_to_keep), 1), 8), **kwargs)


def _augment_ops(transform: Any) -> Iterator[auto_augment.AugmentOp]:
    """The timm AugmentOps inside ``transform``: Compose, RandAugment, AugMix and AutoAugment."""
    if isinstance(transform, auto_augment.AugmentOp):
        yield transform
    elif isinstance(transform, (list, tuple)):  # AutoAugment's policy is a list of lists of ops
        for child in transform:
            yield from _augment_ops(child)
    else:
        for attribute in ("transforms", "ops", "policy"):
            yield from _augment_ops(getattr(transform, attribute, ()))


def clamp_posterize_bits(transform: Callable) -> Callable:
    """Make every timm posterize op inside ``transform`` use :func:`posterize`; returns ``transform``.

    Only this transform's ops change, not timm's tables, so other timm users in the process are
    unaffected; a second call is a no-op.
    """
    for op in _augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform


def _scan(root: Path) -> list[str]:
    """Check the train/val (and optional test) layout under ``root`` and return the class names."""
    if not root.is_dir():
        raise DataError(f"image folder root {root} does not exist; set data.init_args.root to a folder "
                        f"holding train/<class>/ and val/<class>/ sub-folders of images")
    classes = {}
    for split in ("train", "val"):
        path = root / split
        if not path.is_dir():
            raise DataError(f"{path} does not exist; the image folder root needs train/ and val/ "
                            f"sub-folders, each with one folder of images per class")
        classes[split] = class_folders(path)
        if not classes[split]:
            raise DataError(f"{path} has no class folders; put each class's images in its own "
                            f"sub-folder, e.g. {path / 'cat' / '0001.jpg'}")
    if (root / "test").is_dir():
        classes["test"] = class_folders(root / "test")
    for split in ("val", "test"):
        if split in classes and classes["train"] != classes[split]:
            missing = sorted(set(classes["train"]) - set(classes[split]))
            extra = sorted(set(classes[split]) - set(classes["train"]))
            raise DataError(f"the class folders of {root / split} differ from those of {root / 'train'} "
                            f"(missing in {split}: {missing}, only in {split}: {extra}); every split "
                            f"needs the same classes")
    return classes["train"]


class ImageFolderDataModule(ImageDataModule):
    """Images sorted into one folder per class, under ``root/train``, ``root/val`` and ``root/test``.

    Training uses timm's ImageNet recipe (random resized crop, horizontal flip, RandAugment,
    random erasing), evaluation resizes and centre-crops (``crop_pct``). With ``in_chans=1``
    images are read as greyscale ('L') and augmented as such: timm's RandAugment handles 'L'
    images, filling with the one-entry ``mean``. ``root/val`` selects the model; ``root/test``,
    when present, is the test split. Without it there is no test split: test metrics are null,
    never the validation figures.
    Posterize ops keep 1 to 8 bits (:func:`clamp_posterize_bits`): at full strength timm asks
    for 0, which Pillow 13 refuses.

    Args:
        root: folder holding ``train/``, ``val/`` and optionally ``test/``, each with one sub-folder
            of images per class.
        image_size: side of the square crops fed to the model, at least 8.
        batch_size: images per batch.
        num_workers: DataLoader worker processes decoding and augmenting images.
        in_chans: 3 reads images as RGB, 1 as greyscale.
        auto_augment: timm augmentation policy for training, e.g. 'rand-m9-mstd0.5-inc1',
            'augmix-m5', 'original'; null for none (timm then applies colour jitter).
        re_prob: probability of random erasing on a training image, in [0, 1].
        crop_pct: evaluation centre crop as a share of the resized image, in (0, 1].
        interpolation: resize filter: nearest, bilinear, bicubic, box, hamming or lanczos.
        mean: per-channel normalisation mean; default ImageNet's for RGB, (0.5,) for greyscale.
        std: per-channel normalisation std; default ImageNet's for RGB, (0.5,) for greyscale.
    """

    def __init__(self, root: str, image_size: int = 224, batch_size: int = 64, num_workers: int = 4,
                 in_chans: int = 3, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                 re_prob: float = 0.25, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__(batch_size, num_workers)
        check_image_size(image_size)
        check_channels(in_chans)
        if not 0.0 <= re_prob <= 1.0:
            raise DataError(f"re_prob must lie in [0, 1], got {re_prob!r}; 0 turns random erasing off")
        if not 0.0 < crop_pct <= 1.0:
            raise DataError(f"crop_pct must lie in (0, 1], got {crop_pct!r}; e.g. 0.875, 1.0 for no crop")
        if interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                            f"got {interpolation!r}")
        mean = tuple(mean) if mean is not None else (IMAGENET_DEFAULT_MEAN if in_chans == 3 else GREY_MEAN)
        std = tuple(std) if std is not None else (IMAGENET_DEFAULT_STD if in_chans == 3 else GREY_STD)
        for name, stats in (("mean", mean), ("std", std)):
            if len(stats) != in_chans:
                raise DataError(f"{name} has {len(stats)} entries but in_chans={in_chans}; "
                                f"give one per channel")
        if min(std) <= 0:
            raise DataError(f"std entries must be positive, got {std}")
        self.root = Path(root).expanduser()
        self.classes = _scan(self.root)
        if not (self.root / "test").is_dir():
            self.no_test_split = (f"{self.root} has no test/ folder; add test/<class>/ images for "
                                  f"test metrics")
        self.save_hyperparameters()
        self.num_classes = len(self.classes)
        self.in_chans = in_chans
        self.image_size = image_size
        # Built here, not in setup: a bad auto_augment string fails before anything runs.
        try:
            self.train_transform = clamp_posterize_bits(create_transform(
                image_size, is_training=True, auto_augment=auto_augment, re_prob=re_prob,
                interpolation=interpolation, mean=mean, std=std))
        except (AssertionError, KeyError, ValueError) as err:
            raise DataError(f"auto_augment={auto_augment!r} is not a timm augmentation policy ({err}); "
                            f"use e.g. 'rand-m9-mstd0.5-inc1', 'augmix-m5', 'original', or null "
                            f"for none") from err
        self.eval_transform = create_transform(image_size, is_training=False, crop_pct=crop_pct,
                                               interpolation=interpolation, mean=mean, std=std)
        self.image_loader = functools.partial(load_image, mode="RGB" if in_chans == 3 else "L")

    def _images(self, split: str, transform: Callable) -> ImageFolder:
        """The ImageFolder of one split, with file problems reported as DataError."""
        path = self.root / split
        try:
            dataset = ImageFolder(str(path), transform=transform, loader=self.image_loader)
        except FileNotFoundError as err:
            raise DataError(f"{path}: {err}; every class folder needs at least one image") from err
        if dataset.classes != self.classes:
            raise DataError(f"the class folders of {path} changed since the datamodule was created")
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Index the image files of every split (once)."""
        if self.train_set is None:
            self.train_set = self._images("train", self.augmented(self.train_transform))
            self.val_set = self._images("val", self.eval_transform)
            if not self.no_test_split:
                self.test_set = self._images("test", self.eval_transform)
