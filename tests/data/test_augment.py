"""timm augmentation in ImageFolderDataModule: every posterize op stays valid at every magnitude, on
real image files, and an image folder trains with the default recipe (and every op forced) via `fvlab fit`."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.data.auto_augment import AugmentOp, RandAugment

from fvlab.cli import main
from fvlab.data import ImageFolderDataModule

pytestmark = pytest.mark.filterwarnings("ignore")

DEFAULT_AA = "rand-m9-mstd0.5-inc1"
# All 15 ops of the default ('inc1') set, drawn without replacement, each applied to every image at
# the top magnitude: the default recipe's worst case, certain here, where the default draws it for
# about 1 image in 650 (0 bits: posterize picked, applied, and magnitude 9 + noise reaching 10).
EVERY_OP_AT_MAX = "rand-m10-n15-p1-inc1-tweights"


def write_tree(root: Path, classes: int = 3, train: int = 16, val: int = 4) -> Path:
    """root/{train,val}/<class>/ of small RGB JPEGs and greyscale PNGs: noise, gradients, stripes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = 24 + 4 * (i % 5), 40 - 3 * (i % 4)
                y, x = np.mgrid[:height, :width]
                stripes = 127 * (1 + np.sin(x * (label + 1) / 3 + y * i / 7))
                noise = rng.integers(0, 64, (height, width, 3))
                pixels = np.clip(stripes[..., None] * (0.4 + 0.3 * np.eye(3)[label]) + noise, 0, 255)
                image = Image.fromarray(pixels.astype(np.uint8))
                if i % 2:
                    image.convert("L").save(folder / f"{i}.png")
                else:
                    image.save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree"))


def posterize_ops(transform) -> list[AugmentOp]:
    """The posterize ops inside a timm train transform (RandAugment, AugMix or AutoAugment)."""
    ops = []
    for step in transform.transforms:
        ops += list(getattr(step, "ops", [])) + [op for sub in getattr(step, "policy", []) for op in sub]
    return [op for op in ops if op.name.startswith("Posterize")]


def grey_levels(image: Image.Image) -> int:
    """Most distinct values in any one channel."""
    pixels = np.asarray(image).reshape(image.size[1], image.size[0], -1)
    return max(len(np.unique(pixels[..., c])) for c in range(pixels.shape[-1]))


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("auto_augment, variant", [
    (DEFAULT_AA, "PosterizeIncreasing"),                   # the default: 0 bits at magnitude 10
    ("rand-m9-mstd0.5-mmax20-inc1", "PosterizeIncreasing"),  # above 10: negative bit counts
    ("rand-m9-mstd0.5", "Posterize"),                      # 0 bits at magnitude < 2.5
    ("v0", "Posterize"),
    ("original", "PosterizeOriginal"),
    ("augmix-m5", "PosterizeIncreasing"),
])
def test_posterize_is_valid_and_full_strength_at_every_magnitude(tree: Path, in_chans: int,
                                                                 auto_augment: str, variant: str) -> None:
    dm = ImageFolderDataModule(str(tree), image_size=32, in_chans=in_chans, auto_augment=auto_augment)
    dm.setup("fit")
    ops = posterize_ops(dm.train_transform)
    assert ops and {op.name for op in ops} == {variant}
    images = [dm.image_loader(path) for path, _ in dm.train_set.samples[:4]]  # JPEG and PNG files
    assert {image.mode for image in images} == {"L" if in_chans == 1 else "RGB"}
    for op in ops:
        op.prob, op.magnitude_std = 1.0, 0.0
        top = op.magnitude_max or 10
        for magnitude in (0, 1, top / 2, top - 0.5, top):
            op.magnitude = magnitude
            raw_bits = op.level_fn(magnitude, op.hparams)[0]
            for image in images:
                out = op(image)  # timm asks Pillow for raw_bits, which Pillow 13 refuses outside 1..8
                assert out.mode == image.mode and out.size == image.size
                # Full strength kept: an out-of-range request keeps 1 bit (2 levels), not the image.
                assert grey_levels(out) <= 2 ** min(max(raw_bits, 1), 8)
        # Magnitude noise above the top, as mstd0.5 samples: timm clips it to the top, still valid.
        op.magnitude, op.magnitude_std = top, 0.5
        for image in images * 4:
            assert op(image).mode == image.mode


@pytest.mark.parametrize("in_chans", [1, 3])
def test_every_default_op_at_full_strength_on_image_files(tree: Path, in_chans: int) -> None:
    default = ImageFolderDataModule(str(tree), image_size=32, in_chans=in_chans)
    (increasing,) = posterize_ops(default.train_transform)
    # Why the default recipe crashes by chance: magnitude 9 + noise 0.5 reaches the top, 10,
    # where timm's increasing posterize asks for 0 bits.
    assert (increasing.magnitude, increasing.magnitude_std) == (9, 0.5)
    assert increasing.level_fn(10, increasing.hparams) == (0,)
    forced = ImageFolderDataModule(str(tree), image_size=32, in_chans=in_chans, auto_augment=EVERY_OP_AT_MAX)
    (randaugment,) = [step for step in forced.train_transform.transforms if isinstance(step, RandAugment)]
    (default_ra,) = [step for step in default.train_transform.transforms if isinstance(step, RandAugment)]
    assert sorted(op.name for op in randaugment.ops) == sorted(op.name for op in default_ra.ops)
    assert all(op.prob == 1.0 and op.magnitude == 10 for op in randaugment.ops)
    forced.setup("fit")
    for index in range(len(forced.train_set)):
        image, _ = forced.train_set[index]
        assert image.shape == (in_chans, 32, 32) and torch.isfinite(image).all()


def test_posterize_fix_is_local_and_idempotent(tree: Path) -> None:
    from timm.data import auto_augment

    from fvlab.data.folder import clamp_posterize_bits, posterize

    dm = ImageFolderDataModule(str(tree), image_size=32, auto_augment="original")
    ops = [op for sub in dm.train_transform.transforms[2].policy for op in sub]
    functions = [op.aug_fn for op in ops]
    assert clamp_posterize_bits(dm.train_transform) is dm.train_transform
    assert [op.aug_fn for op in ops] == functions  # a second pass changes nothing
    assert {op.name for op in ops if op.aug_fn is posterize} == {"PosterizeOriginal"}
    assert all(op.aug_fn is auto_augment.NAME_TO_OP[op.name] for op in ops if op.aug_fn is not posterize)
    # Spawned DataLoader workers (macOS, Windows) receive the transform pickled.
    copied = pickle.loads(pickle.dumps(dm.train_transform))
    assert {op.aug_fn for sub in copied.transforms[2].policy for op in sub if op.name.startswith("Posterize")} \
        == {posterize}
    # timm itself is untouched: its own ops still call its posterize.
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is auto_augment.posterize
    assert AugmentOp("PosterizeIncreasing").aug_fn is auto_augment.posterize


def test_fit_image_folder_with_the_default_augmentation(tmp_path: Path) -> None:
    data = {"class_path": "fvlab.data.ImageFolderDataModule",
            "init_args": {"root": str(write_tree(tmp_path / "tree")), "image_size": 32, "batch_size": 16,
                          "num_workers": 1}}  # augmenting in a DataLoader worker, where the crash was seen
    forced = {"data.init_args.auto_augment": EVERY_OP_AT_MAX, "trainer.max_epochs": 1}
    experiment = {
        "name": "exp", "seed_everything": 0,
        "model": {"arch": {"name": "fastervit_micro"}, "lr": 1e-3},
        "data": data,
        "trainer": {"max_epochs": 3, "log_every_n_steps": 1, "num_sanity_val_steps": 0},
        "ablation": {
            "default": {},  # the shipped recipe, rand-m9-mstd0.5-inc1: crashed by chance
            "every_op_rgb": forced,  # crashed on the first image
            "every_op_grey": {**forced, "data.init_args.in_chans": 1},
        },
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    assert main(["fit", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    for variant, epochs in (("default", 3), ("every_op_rgb", 1), ("every_op_grey", 1)):
        metrics = json.loads((tmp_path / "runs" / "exp" / variant / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["epochs"] == epochs, (variant, metrics)
