"""``fvlab.data.torchvision_data``: TorchvisionDataModule on MNIST-format files written here,
missing files naming their path, the download flag, transforms and channel statistics, argument
errors (CPU, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fvlab.data import DataError, TorchvisionDataModule
from fvlab.data.torchvision_data import DATASETS, build_transform, channel_stats

from helpers import check_batch, first

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
