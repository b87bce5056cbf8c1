"""Cluttered digits (fvlab/data/cluttered.py): a generated task on which architectures differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvlab.data import ClutteredDigitsDataModule, DataError
from fvlab.data.cluttered import render_cluttered
from fvlab.data.digits import split_sizes


def test_splits_are_disjoint_copies_of_the_digit_split_and_fixed_by_the_seed() -> None:
    data = ClutteredDigitsDataModule(image_size=24, digit_size=12, copies=2, batch_size=8, in_chans=3)
    assert (data.num_classes, data.in_chans, data.image_size) == (10, 3, 24)  # known before setup
    data.setup()
    sizes = [len(s) for s in (data.train_set, data.val_set, data.test_set)]
    assert sizes == [2 * n for n in split_sizes(1797, 0.2, 0.2)]
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (8, 3, 24, 24) and labels.dtype == torch.int64
    same = ClutteredDigitsDataModule(image_size=24, digit_size=12, copies=2, batch_size=8)
    same.setup()
    assert torch.equal(same.val_set.images, data.val_set.images)
    other = ClutteredDigitsDataModule(image_size=24, digit_size=12, copies=2, batch_size=8, split_seed=1)
    other.setup()
    assert not torch.equal(other.val_set.images, data.val_set.images)
    # Every class in every split, each split balanced as the stratified digit split is.
    for split in (data.train_set, data.val_set, data.test_set):
        assert set(split.labels.tolist()) == set(range(10))


def test_the_digit_is_drawn_whole_over_strokes_and_noise() -> None:
    rng = np.random.default_rng(0)
    digits = rng.uniform(0.5, 1.0, (5, 8, 8)).astype(np.float32)
    clean = render_cluttered(digits, 20, distractors=0, fragment_size=4, noise=0.0, rng=rng)
    # No strokes, no noise: each canvas holds exactly its digit, somewhere.
    for canvas, digit in zip(clean, digits):
        ys, xs = np.nonzero(canvas)
        y, x = ys.min(), xs.min()
        assert np.array_equal(canvas[y:y + 8, x:x + 8], digit) and canvas.sum() == pytest.approx(digit.sum())
    cluttered = render_cluttered(digits, 20, distractors=3, fragment_size=4, noise=0.0, rng=rng)
    assert all((c > 0).sum() > 64 for c in cluttered)  # strokes beside the digit


@pytest.mark.parametrize("kwargs, words", [
    ({"digit_size": 40}, ["digit_size", "from 8 to image_size (32)"]),
    ({"fragment_size": 20}, ["fragment_size", "digit_size (16)"]),
    ({"distractors": -1}, ["distractors", ">= 0"]),
    ({"noise": -0.1}, ["noise", ">= 0"]),
    ({"copies": 0}, ["copies"]),
    ({"val_fraction": 0.001}, ["fewer than 10 digits"]),
])
def test_bad_settings_name_the_setting(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(DataError) as err:
        ClutteredDigitsDataModule(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)
