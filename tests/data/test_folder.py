"""``fvlab.data.folder``: ImageFolderDataModule's batches and splits (test/ optional), timm's
augmentation on grey images, default statistics, layout and argument errors (CPU, no network)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fvlab.data import DataError, ImageFolderDataModule

from helpers import CLASSES, check_batch, first, make_tree

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("in_chans", [3, 1])
def test_image_folder_batches(tmp_path: Path, in_chans: int) -> None:
    dm = ImageFolderDataModule(str(make_tree(tmp_path)), image_size=16, batch_size=4, num_workers=0,
                               in_chans=in_chans, re_prob=0.5)
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.batch_size) == (3, in_chans, 16, 4)
    assert dm.classes == list(CLASSES)
    dm.setup("fit")
    assert len(dm.train_set) == len(dm.val_set) == 12
    for _ in range(3):  # several random augmentations
        check_batch(first(dm.train_dataloader()), dm, 4, bound=5.0)
    images, labels = first(dm.val_dataloader())
    check_batch((images, labels), dm, 4, bound=5.0)
    assert labels.tolist() == [0, 0, 0, 0]  # sorted files, first class first
    # Without test/ there is no test split: never the val images in its place.
    assert dm.test_set is None and "no test/ folder" in dm.no_test_split
    with pytest.raises(DataError, match="no test split"):
        dm.test_dataloader()


def test_image_folder_test_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path, per_class=2)
    (root / "val").rename(root / "test")
    make_tree(tmp_path / "other", per_class=1)
    (tmp_path / "other" / "val").rename(root / "val")
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert not dm.no_test_split and (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 3, 6)
    assert {Path(p).parent.parent.name for p, _ in dm.test_set.samples} == {"test"}
    check_batch(first(dm.test_dataloader()), dm, 4, bound=5.0)
    (root / "test" / "ant").rename(root / "test" / "ape")
    with pytest.raises(DataError, match=r"missing in test: \['ant'\]"):
        ImageFolderDataModule(str(root))


def test_image_folder_grey_randaugment_runs_every_op(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(str(make_tree(tmp_path)), image_size=12, in_chans=1, re_prob=1.0)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20), dtype=np.uint8))
    # 200 draws of two ops out of ~15 (each applied with p=0.5) hit every op with near certainty.
    for _ in range(200):
        out = dm.train_transform(image)
        assert out.shape == (1, 12, 12) and torch.isfinite(out).all()
    assert dm.eval_transform(image).shape == (1, 12, 12)


@pytest.mark.parametrize("in_chans", [3, 1])
def test_image_folder_default_stats(tmp_path: Path, in_chans: int) -> None:
    dm = ImageFolderDataModule(str(make_tree(tmp_path)), image_size=8, in_chans=in_chans)
    normalize = [t for t in dm.eval_transform.transforms if type(t).__name__ == "Normalize"][0]
    assert len(normalize.mean) == len(normalize.std) == in_chans


def test_image_folder_layout_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"{missing}.*does not exist"):
        ImageFolderDataModule(str(missing))
    (tmp_path / "a" / "train" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{tmp_path / 'a' / 'val'} does not exist"):
        ImageFolderDataModule(str(tmp_path / "a"))
    (tmp_path / "b" / "train").mkdir(parents=True)
    (tmp_path / "b" / "val" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{tmp_path / 'b' / 'train'} has no class folders"):
        ImageFolderDataModule(str(tmp_path / "b"))

    root = make_tree(tmp_path / "c")
    (root / "val" / "ant").rename(root / "val" / "ape")
    with pytest.raises(DataError, match=r"missing in val: \['ant'\], only in val: \['ape'\]"):
        ImageFolderDataModule(str(root))

    root = make_tree(tmp_path / "d")
    for file in (root / "train" / "bee").iterdir():
        file.unlink()
    dm = ImageFolderDataModule(str(root))  # an empty class folder is only found when indexing
    with pytest.raises(DataError, match=f"{root / 'train'}.*at least one image"):
        dm.setup("fit")


@pytest.mark.parametrize(("kwargs", "argument"), [
    (dict(auto_augment="no-such-policy"), "auto_augment"),
    (dict(interpolation="cubic"), "interpolation"),
    (dict(in_chans=1, mean=(0.5, 0.5, 0.5)), "mean"),
    (dict(std=(0.2, 0.2)), "std"),
    (dict(std=(0.2, 0.0, 0.2)), "std"),
    (dict(re_prob=1.5), "re_prob"),
    (dict(crop_pct=0.0), "crop_pct"),
    (dict(image_size=7), "image_size"),
    (dict(in_chans=2), "in_chans"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_workers=-1), "num_workers"),
])
def test_image_folder_argument_errors(tmp_path: Path, kwargs: dict, argument: str) -> None:
    root = make_tree(tmp_path, per_class=1)
    with pytest.raises(DataError, match=argument):
        ImageFolderDataModule(str(root), **kwargs)
