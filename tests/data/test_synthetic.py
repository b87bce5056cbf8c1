"""``fvlab.data.synthetic``: SyntheticDataModule's batches, determinism, learnability and argument
errors."""

from __future__ import annotations

import pytest
import torch

from fvlab.data import DataError, SyntheticDataModule

from helpers import check_batch, first

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
