"""The same/different glyph task: determinism, disjoint balanced splits, layouts, bad input (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fvlab.data import DataError, SameDifferentDataModule
from fvlab.data.same_different import generate_same_different, glyph_vocabulary

from helpers import ROOT

SIZES = (600, 200, 200)


def generate(seed: int = 0, layout: str = "apart", image_size: int = 32, num_glyphs: int = 4,
             noise: float = 0.1, sizes: tuple[int, ...] = SIZES):
    """A fresh generation (not this process's cached copy)."""
    return generate_same_different.__wrapped__(image_size, sizes, layout, num_glyphs, 1.0, noise, seed)


def test_same_split_seed_same_data_other_seed_other_data() -> None:
    first, again, other = generate(seed=3), generate(seed=3), generate(seed=4)
    for (x, y), (x2, y2), (x3, _) in zip(first, again, other):
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
        assert not np.array_equal(x, x3)


def test_datamodule_has_three_disjoint_balanced_splits() -> None:
    # Two glyphs, no noise, small images and together: few enough layouts that a plain random
    # draw repeats some (140 of 3,001 here), so disjointness is the generator's doing.
    dm = SameDifferentDataModule(image_size=32, num_train=2000, num_val=500, num_test=501, layout="together",
                                 num_glyphs=2, jitter=1.0, noise=0.0, split_seed=1)
    dm.setup("fit")
    splits = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}
    assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "val": 500, "test": 501}
    seen: dict[bytes, str] = {}
    for name, split in splits.items():
        for image in split.images.numpy():
            key = image.tobytes()
            assert key not in seen, f"an image of {name} is also in {seen[key]}"
            seen[key] = name
    for name, split in splits.items():
        counts = np.bincount(split.labels.numpy(), minlength=2)
        assert abs(counts[0] - counts[1]) <= 1, (name, counts)
    images, labels = dm.val_dataloader().dataset.__getitems__(list(range(8)))
    assert images.shape == (8, 1, 32, 32) and set(labels.tolist()) <= {0, 1}


@pytest.mark.parametrize("layout", ["apart", "together"])
def test_glyphs_sit_where_the_layout_says_and_label_says_same(layout: str) -> None:
    (images, labels), = generate(layout=layout, image_size=64, noise=0.0, sizes=(200,))
    half = 32
    for image, label in zip(images, labels):
        quadrants = {q for q in range(4) if image[(q // 2) * half:(q // 2 + 1) * half,
                                                  (q % 2) * half:(q % 2 + 1) * half].any()}
        if layout == "apart":
            assert quadrants in ({0, 3}, {1, 2})
            crops = [image[(q // 2) * half:(q // 2 + 1) * half, (q % 2) * half:(q % 2 + 1) * half]
                     for q in sorted(quadrants)]
            glyphs = [crop[np.ix_(crop.any(1), crop.any(0))] for crop in crops]
            same = glyphs[0].shape == glyphs[1].shape and np.array_equal(glyphs[0], glyphs[1])
            assert same == bool(label)
        else:
            assert len(quadrants) == 1


@pytest.mark.parametrize("kwargs", [dict(layout="sideways"), dict(num_glyphs=1), dict(num_glyphs=500),
                                    dict(noise=-0.1), dict(image_size=16), dict(num_test=0),
                                    dict(layout="pointer", num_glyphs=95)])
def test_bad_arguments_raise_data_error(kwargs: dict) -> None:
    with pytest.raises(DataError):
        SameDifferentDataModule(**kwargs)


def test_bad_argument_exits_2_from_fvlab_fit(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fvlab.cli", "fit", str(ROOT / "experiments/longrange_carrier.yaml"),
                           "--runs-dir", str(tmp_path / "runs"), "--data.init_args.layout", "sideways"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "layout" in done.stderr and "apart" in done.stderr
    assert not (tmp_path / "runs").exists()


# The pointer task: a cue glyph in one place says which other place's content glyph is the label.

@pytest.mark.parametrize("layout", ["pointer", "pointer_local"])
def test_pointer_same_split_seed_same_data_other_seed_other_data(layout: str) -> None:
    first, again, other = generate(seed=3, layout=layout), generate(seed=3, layout=layout), generate(seed=4, layout=layout)
    for (x, y), (x2, y2), (x3, _) in zip(first, again, other):
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
        assert not np.array_equal(x, x3)


@pytest.mark.parametrize("layout", ["pointer", "pointer_local"])
def test_pointer_splits_are_disjoint_and_balanced(layout: str) -> None:
    # 32 px and two places per glyph and axis: a plain random draw repeats some of the 3,001
    # layouts (44 for pointer, 14 for pointer_local), so disjointness is the generator's doing. Three content
    # glyphs: three balanced classes.
    dm = SameDifferentDataModule(image_size=32, num_train=2000, num_val=500, num_test=501, layout=layout,
                                 num_glyphs=3, jitter=0.5, noise=0.0, split_seed=1)
    dm.setup("fit")
    assert dm.num_classes == 3
    seen: dict[bytes, str] = {}
    for name, split in {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}.items():
        for image in split.images.numpy():
            key = image.tobytes()
            assert key not in seen, f"an image of {name} is also in {seen[key]}"
            seen[key] = name
        counts = np.bincount(split.labels.numpy(), minlength=3)
        assert counts.max() - counts.min() <= 1, (name, counts)


def bounding_box(image: np.ndarray) -> np.ndarray:
    """The smallest crop holding every lit pixel (empty rows inside it kept)."""
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    return image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@pytest.mark.parametrize("layout", ["pointer", "pointer_local"])
def test_pointer_label_is_the_content_the_cue_points_to(layout: str) -> None:
    image_size, num_glyphs, seed = 64, 3, 5
    (images, labels), = generate(seed=seed, layout=layout, image_size=image_size, num_glyphs=num_glyphs,
                                 noise=0.0, sizes=(200,))
    cell = image_size // 16
    vocabulary = glyph_vocabulary(3 + num_glyphs, np.random.default_rng(seed)).repeat(cell, 1).repeat(cell, 2)
    clockwise = [0, 1, 3, 2]  # TL, TR, BR, BL
    for image, label in zip(images, labels):
        half = image_size // 2
        quadrants = [image[(q // 2) * half:(q // 2 + 1) * half, (q % 2) * half:(q % 2 + 1) * half] for q in range(4)]
        if layout == "pointer":
            places = quadrants
        else:  # all four glyphs in one quadrant, one per quarter of it
            lit = [q for q in quadrants if q.any()]
            assert len(lit) == 1
            quarter = half // 2
            places = [lit[0][(p // 2) * quarter:(p // 2 + 1) * quarter, (p % 2) * quarter:(p % 2 + 1) * quarter]
                      for p in range(4)]
        found = []
        for place in places:
            glyph = bounding_box(place)
            matches = [g for g, bitmap in enumerate(vocabulary)
                       if (box := bounding_box(bitmap)).shape == glyph.shape and np.array_equal(box, glyph)]
            assert len(matches) == 1
            found.append(matches[0])
        cues = [p for p, g in enumerate(found) if g < 3]
        assert len(cues) == 1
        target = clockwise[(clockwise.index(cues[0]) + found[cues[0]] + 1) % 4]
        assert found[target] - 3 == label
