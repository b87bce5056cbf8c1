"""Datamodules: batches, splits, augmentation, error messages and config parsing (CPU, no network)."""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser
from PIL import Image
from sklearn.datasets import load_digits

from fvlab.data import (DataError, DigitsDataModule, ImageFolderDataModule, SyntheticDataModule,
                        TorchvisionDataModule)
from fvlab.data.digits import NUM_IMAGES, random_affine, split_indices
from fvlab.data.torchvision_data import DATASETS, build_transform, channel_stats

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def check_batch(batch: tuple[torch.Tensor, torch.Tensor], dm: pl.LightningDataModule, size: int,
                bound: float = 4.0) -> None:
    """A batch of ``size`` normalised float images and int64 labels that fit ``dm``'s attributes."""
    images, labels = batch
    assert images.shape == (size, dm.in_chans, dm.image_size, dm.image_size)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.shape == (size,)
    assert 0 <= labels.min() and labels.max() < dm.num_classes
    assert torch.isfinite(images).all() and images.abs().max() <= bound


def first(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch of a loader."""
    return next(iter(loader))


# --- digits -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=32, batch_size=16)
    dm.setup("fit")
    return dm


def test_digits_attributes_before_setup() -> None:
    dm = DigitsDataModule(image_size=48, batch_size=8, in_chans=3)
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.batch_size, dm.num_workers) == (10, 3, 48, 8, 0)
    assert dm.train_set is None  # nothing loaded yet
    assert dm.hparams["image_size"] == 48 and dm.hparams["augment"] is True


def test_digits_batches_and_split_sizes(digits: DigitsDataModule) -> None:
    n_held = math.ceil(0.15 * NUM_IMAGES)
    assert (len(digits.train_set), len(digits.val_set), len(digits.test_set)) == \
        (NUM_IMAGES - 2 * n_held, n_held, n_held) == (1257, 270, 270)
    check_batch(first(digits.train_dataloader()), digits, 16)
    check_batch(first(digits.val_dataloader()), digits, 16)
    check_batch(first(digits.test_dataloader()), digits, 16)
    assert len(digits.train_dataloader()) == 1257 // 16  # drop_last
    assert len(digits.val_dataloader()) == len(digits.test_dataloader()) == math.ceil(270 / 16)
    # Normalised with the training set's statistics.
    train = torch.cat([x for x, _ in digits.train_dataloader()])
    val = torch.cat([x for x, _ in digits.val_dataloader()])
    assert abs(val.mean()) < 0.1 and abs(val.std() - 1) < 0.1
    assert abs(train.mean()) < 0.15 and abs(train.std() - 1) < 0.15


def test_digits_split_is_fixed_and_stratified(digits: DigitsDataModule) -> None:
    torch.manual_seed(123)  # the split must not depend on the global seed
    other = DigitsDataModule(image_size=32, batch_size=16)
    other.setup("fit")
    assert torch.equal(other.val_set.labels, digits.val_set.labels)
    assert torch.equal(other.val_set.images, digits.val_set.images)
    assert torch.equal(other.train_set.images, digits.train_set.images)

    assert torch.equal(other.test_set.images, digits.test_set.images)

    reseeded = DigitsDataModule(image_size=32, split_seed=1)
    reseeded.setup()
    assert not torch.equal(reseeded.val_set.images, digits.val_set.images)

    # Three disjoint splits that together hold every image once, each stratified by class.
    train, val, test = split_indices(load_digits().target, 0.15, 0.15, seed=0)
    assert len(set(train) | set(val) | set(test)) == len(train) + len(val) + len(test) == NUM_IMAGES
    assert torch.equal(digits.test_set.labels, torch.from_numpy(load_digits().target[test]))
    counts = [torch.bincount(s.labels, minlength=10).float()
              for s in (digits.train_set, digits.val_set, digits.test_set)]
    total = sum(counts)
    for split, share in zip(counts, (0.7, 0.15, 0.15)):
        assert torch.all((split - share * total).abs() <= 1.5)


def test_digits_augments_train_only_and_reproducibly(digits: DigitsDataModule) -> None:
    index = list(range(16))
    a, labels_a = digits.train_set.__getitems__(index)
    b, labels_b = digits.train_set.__getitems__(index)
    assert torch.equal(labels_a, labels_b) and not torch.allclose(a, b)
    assert torch.equal(digits.val_set.__getitems__(index)[0], digits.val_set.__getitems__(index)[0])

    digits.seed_data(7)
    c, _ = digits.train_set.__getitems__(index)
    torch.rand(100)  # the global generator (the model's) does not move the augmentation
    digits.seed_data(7)
    d, _ = digits.train_set.__getitems__(index)
    assert torch.equal(c, d)

    plain = DigitsDataModule(image_size=32, augment=False)
    plain.setup()
    e, _ = plain.train_set.__getitems__(index)
    assert torch.equal(e, plain.train_set.__getitems__(index)[0])
    # Augmented images are the plain ones moved a little, not different digits.
    assert F.cosine_similarity(a.flatten(1), e.flatten(1)).mean() > 0.6


def test_data_streams_resume_from_a_checkpointed_state(tmp_path: Path) -> None:
    """What a resumed run needs: the next epoch's order and augmentation from the saved state."""
    def epoch(dm: DigitsDataModule) -> list[torch.Tensor]:
        return [images for images, _ in dm.train_dataloader()][:3]

    unbroken = DigitsDataModule(image_size=16, batch_size=64)
    unbroken.setup()
    unbroken.seed_data(5)
    epoch(unbroken)
    torch.save(unbroken.state_dict(), tmp_path / "state.pt")
    expected = epoch(unbroken)

    resumed = DigitsDataModule(image_size=16, batch_size=64)
    resumed.setup()
    resumed.seed_data(5)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # as checkpoints load
    for got, want in zip(epoch(resumed), expected, strict=True):
        assert torch.equal(got, want)


def test_random_affine_identity_and_shift() -> None:
    images = torch.rand(4, 1, 16, 16)
    same = random_affine(images, max_translate=0.0, max_rotate=0.0, scale_range=(1.0, 1.0))
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    # A blob moves by at most 1/8 of the side (plus a rotation/scale wobble) and stays inside.
    blob = torch.zeros(64, 1, 32, 32)
    blob[..., 14:18, 14:18] = 1
    moved = random_affine(blob)
    ys = torch.arange(32.0).view(1, 1, 32, 1)
    centre_y = (moved * ys).sum((1, 2, 3)) / moved.sum((1, 2, 3))
    assert (centre_y - 15.5).abs().max() <= 32 / 8 + 1
    assert (centre_y - 15.5).abs().max() > 0.5


def test_digits_three_channels_repeat_grey() -> None:
    dm = DigitsDataModule(image_size=16, batch_size=8, in_chans=3)
    dm.setup()
    images, _ = first(dm.train_dataloader())
    check_batch((images, _), dm, 8)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    pickle.loads(pickle.dumps(dm.train_set))  # worker processes started with 'spawn' need this


def test_digits_in_worker_processes() -> None:
    dm = DigitsDataModule(image_size=16, batch_size=32, num_workers=1)
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    batches = list(loader)
    assert len(batches) == 1257 // 32
    check_batch(batches[0], dm, 32)


class TinyClassifier(pl.LightningModule):
    """Pool + linear, recording the batches the Trainer hands it."""

    def __init__(self, in_chans: int, num_classes: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                       torch.nn.Linear(in_chans * 16, num_classes))
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"train": [], "val": []}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        self.seen["train"].append((images.clone(), labels.clone()))
        return F.cross_entropy(self.net(images), labels)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.seen["val"].append((images.clone(), labels.clone()))
        self.log("val_loss", F.cross_entropy(self.net(images), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # Lightning's own, under this torch
def test_digits_drive_a_trainer(tmp_path: Path) -> None:
    dm = DigitsDataModule(image_size=16, batch_size=32)
    trainer = pl.Trainer(max_epochs=2, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    torch.manual_seed(0)
    model = TinyClassifier(dm.in_chans, dm.num_classes)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    assert after < 0.6 * before, (before, after)  # the digits carry their labels' signal

    train, val = model.seen["train"], model.seen["val"]
    assert len(train) == 2 * (1257 // 32)  # whole epochs, the last partial batch dropped
    for images, labels in train + val:
        assert images.shape[1:] == (1, 16, 16) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    epoch = [torch.cat(part) for part in zip(*train[: len(train) // 2])]
    assert torch.bincount(epoch[1], minlength=10).min() > 0.8 * len(epoch[1]) / 10  # every class, balanced
    assert not torch.equal(epoch[1], dm.train_set.labels[: len(epoch[1])])  # shuffled
    # Each validation pass sees the whole val split once, in order, the same images every time.
    passes = [val[i * 9:(i + 1) * 9] for i in range(len(val) // 9)]
    assert len(val) == 4 * math.ceil(270 / 32) and len(passes) == 4
    for one in passes:
        assert torch.equal(torch.cat([labels for _, labels in one]), dm.val_set.labels)
        assert torch.equal(torch.cat([images for images, _ in one]), torch.cat([images for images, _ in passes[0]]))


# --- image folder -----------------------------------------------------------------------------


CLASSES = ("ant", "bee", "cat")


def make_tree(root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = 4) -> Path:
    """root/{train,val}/<class>/ with RGB JPEGs and greyscale PNGs of varied sizes."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                shape = (18 + 3 * i, 24 - 2 * i) + ((3,) if i % 2 == 0 else ())
                image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
                image.save(folder / (f"{i}.jpg" if i % 2 == 0 else f"{i}.png"))
    return root


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


# --- torchvision ------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 array in the IDX format MNIST ships in: magic (0x08 = uint8, then ndim), sizes, data."""
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">i4")
    path.write_bytes(header.tobytes() + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, name: str, n_train: int = 24, n_test: int = 12) -> dict[str, np.ndarray]:
    """Uncompressed MNIST-format files under root/<name>/raw: image i is uniformly grey level 10*i."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.repeat(10 * np.arange(n, dtype=np.uint8), 28 * 28).reshape(n, 28, 28)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        files[prefix] = labels
    return files


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
@pytest.mark.parametrize("in_chans", [None, 3])
def test_torchvision_loads_mnist_format_files(tmp_path: Path, name: str, in_chans: int | None) -> None:
    labels = fake_mnist(tmp_path, name)
    dm = TorchvisionDataModule(name.lower(), root=str(tmp_path), image_size=32, batch_size=8, num_workers=0,
                               in_chans=in_chans, val_fraction=0.5)
    assert (dm.name, dm.num_classes, dm.in_chans, dm.image_size) == (name, 10, in_chans or 1, 32)
    dm.setup("fit")
    # val is held out of the official train split (stratified), test is the official test split.
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 12, 12)
    train, val = set(dm.train_set.indices), set(dm.val_set.indices)
    assert not train & val and len(train | val) == 24
    held = np.bincount(labels["train"][sorted(val)], minlength=10)
    assert held.min() >= 1 and held.max() <= 2  # stratified: every class held out, none twice over
    check_batch(first(dm.train_dataloader()), dm, 8)
    check_batch(first(dm.val_dataloader()), dm, 8)
    images, targets = first(dm.test_dataloader())
    check_batch((images, targets), dm, 8)
    assert targets.tolist() == labels["t10k"][:8].tolist()
    # Image i is uniformly 10*i/255 before normalisation; resizing keeps it uniform.
    mean, std = DATASETS[name].mean[0], DATASETS[name].std[0]
    expected = (10 * torch.arange(8.0) / 255 - mean) / std
    torch.testing.assert_close(images.mean((1, 2, 3)), expected, atol=1e-4, rtol=0)
    assert images.flatten(1).std(1).max() < 1e-4


def test_torchvision_missing_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data.init_args.download true") as err:
        TorchvisionDataModule("CIFAR10", root=str(tmp_path / "data"))
    assert str(tmp_path / "data" / "cifar-10-batches-py") in str(err.value)

    (tmp_path / "MNIST" / "raw").mkdir(parents=True)  # the folder exists, the files do not
    dm = TorchvisionDataModule("MNIST", root=str(tmp_path))
    with pytest.raises(DataError, match="--data.init_args.download true") as err:
        dm.setup("fit")
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)


def test_torchvision_download_flag_defers_the_check(tmp_path: Path) -> None:
    dm = TorchvisionDataModule("cifar100", root=str(tmp_path), download=True)  # nothing fetched in __init__
    assert (dm.name, dm.num_classes, dm.in_chans, dm.image_size) == ("CIFAR100", 100, 3, 32)
    assert dm.batch_size == 128
    assert not any(tmp_path.iterdir())


def test_torchvision_transforms() -> None:
    cifar, mnist = DATASETS["CIFAR10"], DATASETS["MNIST"]
    names = lambda t: [type(s).__name__ for s in t.transforms]  # noqa: E731
    assert names(build_transform(cifar, 32, 3, train=True))[:2] == ["RandomCrop", "RandomHorizontalFlip"]
    assert "RandomCrop" not in names(build_transform(cifar, 32, 3, train=False))
    assert "RandomHorizontalFlip" not in names(build_transform(mnist, 28, 1, train=True))
    assert "Resize" in names(build_transform(mnist, 32, 1, train=False))
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert build_transform(cifar, 48, 1, train=True)(rgb).shape == (1, 48, 48)
    assert channel_stats(mnist, 3) == (mnist.mean * 3, mnist.std * 3)
    grey_mean, _ = channel_stats(cifar, 1)
    assert len(grey_mean) == 1 and min(cifar.mean) < grey_mean[0] < max(cifar.mean)


@pytest.mark.parametrize(("kwargs", "argument"), [
    (dict(name="ImageNet"), "ImageNet"),
    (dict(image_size=4), "image_size"),
    (dict(in_chans=4), "in_chans"),
    (dict(batch_size=-1), "batch_size"),
])
def test_torchvision_argument_errors(tmp_path: Path, kwargs: dict, argument: str) -> None:
    with pytest.raises(DataError, match=argument):
        TorchvisionDataModule(**{"root": str(tmp_path), "download": True, **kwargs})


# --- synthetic --------------------------------------------------------------------------------


def test_synthetic_batches_and_determinism() -> None:
    dm = SyntheticDataModule(num_classes=4, in_chans=2, image_size=16, num_samples=40, val_samples=20,
                             batch_size=8, seed=3)
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.batch_size, dm.num_workers) == (4, 2, 16, 8, 0)
    dm.setup()
    check_batch(first(dm.train_dataloader()), dm, 8, bound=8.0)
    check_batch(first(dm.val_dataloader()), dm, 8, bound=8.0)
    check_batch(first(dm.test_dataloader()), dm, 8, bound=8.0)
    assert torch.bincount(dm.train_set.labels).tolist() == [10, 10, 10, 10]
    assert torch.bincount(dm.test_set.labels).tolist() == [16, 16, 16, 16]  # test_samples=64, balanced
    assert abs(dm.train_set.images.std() - 1) < 0.1
    # Its own test images, not the validation ones.
    assert not any(torch.equal(image, other) for image in dm.test_set.images for other in dm.val_set.images)

    torch.manual_seed(99)  # the data depend on `seed` only
    same = SyntheticDataModule(**dict(dm.hparams, batch_size=32))
    same.setup()
    assert torch.equal(same.train_set.images, dm.train_set.images)
    assert torch.equal(same.val_set.labels, dm.val_set.labels)
    other = SyntheticDataModule(**dict(dm.hparams, seed=4))
    other.setup()
    assert not torch.equal(other.train_set.images, dm.train_set.images)


def test_synthetic_is_learnable() -> None:
    dm = SyntheticDataModule(num_samples=256, val_samples=128)
    dm.setup()
    train, val = dm.train_set, dm.val_set
    # Nearest class mean, from 256 training images: far above the 10% of chance.
    means = torch.stack([train.images[train.labels == c].mean(0) for c in range(dm.num_classes)])
    predicted = torch.cdist(val.images.flatten(1), means.flatten(1)).argmin(1)
    assert (predicted == val.labels).float().mean() > 0.9


@pytest.mark.parametrize(("kwargs", "argument"), [
    (dict(num_classes=0), "num_classes"),
    (dict(in_chans=0), "in_chans"),
    (dict(num_samples=0), "num_samples"),
    (dict(val_samples=-3), "val_samples"),
    (dict(image_size=7), "image_size"),
    (dict(batch_size=0), "batch_size"),
])
def test_synthetic_argument_errors(kwargs: dict, argument: str) -> None:
    with pytest.raises(DataError, match=argument):
        SyntheticDataModule(**kwargs)


# --- digits errors, config parsing ------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "argument"), [
    (dict(image_size=4), "image_size"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_workers=-1), "num_workers"),
    (dict(val_fraction=0.0), "val_fraction"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(val_fraction=0.001), "val_fraction"),
    (dict(in_chans=2), "in_chans"),
    (dict(split_seed=-1), "split_seed"),
])
def test_digits_argument_errors(kwargs: dict, argument: str) -> None:
    with pytest.raises(DataError, match=argument):
        DigitsDataModule(**kwargs)


def data_parser() -> ArgumentParser:
    """A parser with a LightningCLI-style ``data`` subclass argument."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data")
    return parser


# LightningCLI still calls instantiate_classes, which jsonargparse has deprecated.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(("class_name", "init_args"), [
    ("DigitsDataModule", {"image_size": 32, "in_chans": 3}),
    ("SyntheticDataModule", {"num_classes": 3, "image_size": 16}),
    ("TorchvisionDataModule", {"name": "MNIST", "download": True, "image_size": 32}),
    ("ImageFolderDataModule", {"image_size": 32, "in_chans": 1, "auto_augment": None, "mean": [0.4]}),
])
def test_config_parses_and_instantiates(tmp_path: Path, class_name: str, init_args: dict) -> None:
    if class_name in ("TorchvisionDataModule", "ImageFolderDataModule"):
        init_args = {**init_args, "root": str(make_tree(tmp_path, per_class=1))}
    parser = data_parser()
    cfg = parser.parse_object({"data": {"class_path": f"fvlab.data.{class_name}", "init_args": init_args}})
    dm = parser.instantiate_classes(cfg).data
    assert type(dm).__name__ == class_name
    for key, value in init_args.items():
        assert dm.hparams[key] == (tuple(value) if isinstance(value, list) else value)
    assert dm.image_size == init_args["image_size"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_config_error_keeps_the_data_error() -> None:
    parser = data_parser()
    cfg = parser.parse_object({"data": {"class_path": "DigitsDataModule", "init_args": {"image_size": 4}}})
    # jsonargparse re-raises as a plain ValueError; the DataError stays reachable as its cause.
    with pytest.raises(ValueError, match="image_size must be") as err:
        parser.instantiate_classes(cfg)
    assert isinstance(err.value, DataError) or isinstance(err.value.__cause__, DataError)
