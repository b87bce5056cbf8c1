"""``fvlab.data.digits``: DigitsDataModule's batches, its fixed stratified split, train-only
reproducible augmentation (``random_affine``), grey to three channels, worker processes, a Trainer
driven by it, and its argument errors (CPU, no network)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fvlab.data import DataError, DigitsDataModule
from fvlab.data.digits import NUM_IMAGES, random_affine, split_indices

from helpers import check_batch, first

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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


# --- errors ----------------------------------------------------------------------------------


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
