"""Glyph tasks whose label only a global view can give: pointer, same/different. Generated, no download.

The pointer task (``layout="pointer"``, the one the shipped experiment uses). Four glyphs sit
in the four corner cells (side image_size / 4) of the image. One, the cue, is one of three cue
shapes meaning "the content 1, 2 or 3 corners on, clockwise"; the other three are each one of
``num_glyphs`` content shapes, and the label is the content the cue points to (``num_glyphs``
classes, balanced). A model that sees each corner alone can only vote on the three contents
(75% with two contents); reading the cue needs the cue's and the target's corners together.
The shipped experiment runs FasterViT-tiny at 64 px with ``window_size`` [2, 2, 2, 1]: the four
stage-3 windows are the image's quadrants, one corner each, and stage 4 (2x2 map, no HAT) has
one-token windows, so no attention crosses a window without carrier tokens. The convs still
do: the stride-2 conv into stage 4 reads tokens of all four stage-3 windows at the centre, and
the conv stages' receptive fields (nominally 79 px) reach across corners, so ``no_carrier`` is
not strictly local at 64 px; at 96 px the same windows keep corners apart (a stage-4 token reads
at most one corner window). The local control ``layout="pointer_local"`` draws the same four
glyphs, cells and jitter into the four cells of one random quadrant, one stage-3 window, so cue
and target are neighbours; carrier tokens can help there only through their parameters. The
pointer label keeps a first-order part (a content glyph votes for its class), so training
leaves chance at once, which same/different (below) never did. Measured (docs/longrange.md):
within a CPU budget no variant learns to read the cue; all sit at the vote's level.

Same or different, the first design. FasterViT's claim for Hierarchical Attention is that carrier tokens give every
local window a cheap global view. To test it, the label must depend on a *relation* between
regions that no window sees together. Each image holds two small glyphs (3x3 binary patterns
with 4 lit cells, from a seeded vocabulary of ``num_glyphs`` shapes that are not shifts of one
another, so brightness and position never give the answer); the label says whether they are
the same glyph (1) or different (0).

- ``layout="apart"`` (the long-range task): the glyphs sit in diagonally opposite quadrants.
  With FasterViT-tiny at 64 px and ``window_size`` 2 in stage 3 (a 4x4 map) the quadrants *are*
  the stage-3 windows, and ``window_size`` 1 in stage 4 (2x2 map, no HAT there) keeps stage 4
  local too. Sameness is not a property of either glyph: per-window features average-pooled
  into a linear head cannot express it (the logit is g1(a) + g2(b), and no g1, g2 make both
  same pairs g1(a) + g2(a), g1(b) + g2(b) exceed both different pairs g1(a) + g2(b),
  g1(b) + g2(a): the two sums are equal). Carrier tokens bring the windows together in their
  global attention; without them only the stride-2 conv from stage 3 to stage 4 crosses a
  window border (its centre output sees one token of each window).
- ``layout="together"`` (the local control): the same glyphs, both inside one random quadrant,
  side by side, so one window holds everything the label depends on. Carrier tokens can only
  help here through their extra parameters.

Same/different was chosen over Pathfinder because Pathfinder needs long training before any
model leaves chance, and because the local control is the same task moved. Measured: on CPU
budgets (up to 12,000 training images, FasterViT-tiny) neither no_carrier nor ct1/ct2 left
chance on ``apart``; relational labels have no first-order signal (each glyph alone says
nothing), so models sit on a plateau first. Hence the pointer task, whose label has a
first-order part; docs/longrange.md has the numbers of both.

Difficulty: ``num_glyphs`` (shapes to tell apart), ``jitter`` (how far glyphs wander, 0:
centred) and ``noise`` (Gaussian pixel noise). Labels are balanced in every split (to one
image). The three splits are drawn from one generator seeded by ``split_seed`` and are disjoint
by construction: no image (glyph pair and positions, in either order) occurs twice in the whole
dataset; a request for more images than the settings can draw without repeats is a DataError.
The arrays are generated once per process and parameter set (0.7 s of CPU for the 4,000
images of the shipped experiments).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fvlab.data.base import (DataError, ImageDataModule, InMemoryImages, NormaliseGrey, check_channels,
                             check_image_size, check_noise, check_positive, check_split_seed)

__all__ = ["SameDifferentDataModule", "LAYOUTS", "distinct_images", "distinct_same_images", "glyph_vocabulary",
           "generate_same_different"]

LAYOUTS = ("apart", "together", "pointer", "pointer_local")
POINTER_LAYOUTS = ("pointer", "pointer_local")
NUM_CUES = 3            # pointer cues: "the content 1, 2 or 3 places on, clockwise"
CLOCKWISE = np.array([0, 1, 3, 2])        # places (0 TL, 1 TR, 2 BL, 3 BR) in clockwise order
CLOCKWISE_RANK = np.argsort(CLOCKWISE)    # where place q stands in that order
GLYPH_GRID = 3          # glyphs are 3x3 binary patterns ...
GLYPH_ON = 4            # ... with 4 lit cells each: 97 shapes once shifts are merged
CELLS_PER_IMAGE = 16    # one glyph cell is image_size / 16 pixels: a glyph is 3/16 of the side
MIN_IMAGE_SIZE = 32     # below this a glyph cell is under 2 pixels
MAX_GLYPHS = 97


def glyph_vocabulary(num_glyphs: int, rng: np.random.Generator) -> np.ndarray:
    """``num_glyphs`` distinct 3x3 binary glyphs with 4 lit cells each, (num_glyphs, 3, 3) float32."""
    cells = GLYPH_GRID * GLYPH_GRID
    patterns = np.array([[(code >> i) & 1 for i in range(cells)] for code in range(2 ** cells)
                         if bin(code).count("1") == GLYPH_ON], dtype=np.float32)
    patterns = patterns.reshape(-1, GLYPH_GRID, GLYPH_GRID)
    # Glyphs land at random offsets, so two patterns that are shifts of each other would look
    # the same: keep one per shape, the one pushed to the top-left corner.
    shapes = patterns[(patterns[:, 0, :].max(1) > 0) & (patterns[:, :, 0].max(1) > 0)]
    return shapes[rng.choice(len(shapes), size=num_glyphs, replace=False)]


def _balanced_labels(count: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels 0 .. classes-1 in random order, as many of each as ``count`` allows (to one image)."""
    return rng.permutation(np.arange(count) % classes)


def _offsets(room: int, jitter: float, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random offsets in [0, room]: centred, spread over the fraction ``jitter`` of the room."""
    spread = round(room * jitter)
    return (room - spread) // 2 + rng.integers(0, spread + 1, shape)


def _draw_layouts(labels: np.ndarray, num_glyphs: int, image_size: int, layout: str, jitter: float,
                  rng: np.random.Generator) -> np.ndarray:
    """(N, 6) int layouts: glyph a and the top-left (y, x) of a in pixels, then the same for b."""
    n = len(labels)
    glyph = GLYPH_GRID * (image_size // CELLS_PER_IMAGE)
    half = image_size // 2
    a = rng.integers(0, num_glyphs, n)
    # A different glyph, uniform among the others.
    b = np.where(labels == 1, a, (a + rng.integers(1, max(num_glyphs, 2), n)) % num_glyphs)
    if layout == "apart":
        # Diagonally opposite quadrants (TL/BR or TR/BL, either glyph first).
        quad_a = rng.integers(0, 4, n)
        quad_b = 3 - quad_a
        pos_a = _offsets(half - glyph, jitter, (n, 2), rng) + half * np.stack([quad_a // 2, quad_a % 2], 1)
        pos_b = _offsets(half - glyph, jitter, (n, 2), rng) + half * np.stack([quad_b // 2, quad_b % 2], 1)
    else:
        # Both in one quadrant: split it in two along a random axis, one glyph per part.
        quad = rng.integers(0, 4, n)
        origin = half * np.stack([quad // 2, quad % 2], 1)
        axis = rng.integers(0, 2, n)
        part = half // 2
        rows = np.arange(n)
        offset_a = np.empty((n, 2), dtype=np.int64)
        offset_b = np.empty((n, 2), dtype=np.int64)
        offset_a[rows, axis] = _offsets(part - glyph, jitter, (n,), rng)
        offset_b[rows, axis] = _offsets(part - glyph, jitter, (n,), rng) + part
        offset_a[rows, 1 - axis] = _offsets(half - glyph, jitter, (n,), rng)
        offset_b[rows, 1 - axis] = _offsets(half - glyph, jitter, (n,), rng)
        swap = rng.integers(0, 2, n).astype(bool)  # which glyph comes first along the axis
        pos_a = origin + np.where(swap[:, None], offset_b, offset_a)
        pos_b = origin + np.where(swap[:, None], offset_a, offset_b)
    return np.concatenate([a[:, None], pos_a, b[:, None], pos_b], 1).astype(np.int64)


def distinct_same_images(image_size: int, layout: str, num_glyphs: int, jitter: float) -> int:
    """How many different images of label "same" the layout can draw (the scarcer label)."""
    glyph = GLYPH_GRID * (image_size // CELLS_PER_IMAGE)
    half = image_size // 2

    def places(room: int) -> int:
        return round(room * jitter) + 1

    if layout == "apart":  # 2 diagonals, each glyph anywhere in its quadrant's spread
        return num_glyphs * 2 * places(half - glyph) ** 4
    # 4 quadrants x 2 axes, each glyph in its part of the quadrant
    return num_glyphs * 8 * (places(half // 2 - glyph) * places(half - glyph)) ** 2


def _draw_pointer(labels: np.ndarray, num_glyphs: int, image_size: int, layout: str, jitter: float,
                  rng: np.random.Generator) -> np.ndarray:
    """(N, 12) int layouts of the pointer task: (glyph, y, x) for each of four places.

    Glyphs 0-2 of the vocabulary are cues ("the content 1, 2 or 3 places on, clockwise"),
    glyphs 3 and up the contents; the label is the content at the place the cue points to.
    A place is a cell of side image_size / 4. ``pointer``: the image's four corner cells;
    ``pointer_local``: the four cells of one random quadrant, so cue and target are neighbours.
    """
    n = len(labels)
    glyph = GLYPH_GRID * (image_size // CELLS_PER_IMAGE)
    half = image_size // 2
    cue = rng.integers(0, 4, n)
    shift = rng.integers(1, 4, n)
    ids = NUM_CUES + rng.integers(0, num_glyphs, (n, 4))
    rows = np.arange(n)
    ids[rows, CLOCKWISE[(CLOCKWISE_RANK[cue] + shift) % 4]] = NUM_CUES + labels
    ids[rows, cue] = shift - 1
    place = np.stack([np.arange(4) // 2, np.arange(4) % 2], 1)  # (4, 2): the (row, column) of place q
    quarter = half // 2
    if layout == "pointer":  # the image's corner cells, three cells apart
        origin = (image_size - quarter) * place[None]
    else:  # the four cells of one quadrant, side by side
        origin = half * place[rng.integers(0, 4, n)][:, None] + quarter * place[None]
    pos = origin + _offsets(quarter - glyph, jitter, (n, 4, 2), rng)
    return np.concatenate([ids[:, :, None], pos], 2).reshape(n, 12).astype(np.int64)


def distinct_images(image_size: int, layout: str, num_glyphs: int, jitter: float) -> int:
    """How many different images of one label (the scarcest) the layout can draw."""
    if layout in ("apart", "together"):
        return distinct_same_images(image_size, layout, num_glyphs, jitter)
    glyph = GLYPH_GRID * (image_size // CELLS_PER_IMAGE)
    half = image_size // 2
    room = half // 2 - glyph
    places = (round(room * jitter) + 1) ** 8  # four glyphs, each anywhere in its spread
    quadrants = 1 if layout == "pointer" else 4
    return quadrants * 4 * 3 * num_glyphs ** 2 * places  # cue place x pointer x other two contents


def _layout_keys(layouts: np.ndarray, layout: str) -> np.ndarray:
    """One row per image; two layouts draw the same image exactly when their rows are equal."""
    if layout in ("apart", "together"):
        # (a at p, b at q) and (b at q, a at p) are one image: the key is the unordered pair.
        scale = int(layouts.max()) + 1
        code_a = (layouts[:, 0] * scale + layouts[:, 1]) * scale + layouts[:, 2]
        code_b = (layouts[:, 3] * scale + layouts[:, 4]) * scale + layouts[:, 5]
        return np.stack([np.minimum(code_a, code_b), np.maximum(code_a, code_b)], 1)
    return layouts  # the places are fixed in order, so equal images have equal rows


def _unique_layouts(sizes: tuple[int, ...], num_glyphs: int, image_size: int, layout: str, jitter: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Layouts and labels for all splits together, no layout twice (so the splits are disjoint)."""
    pointer = layout in POINTER_LAYOUTS
    draw = _draw_pointer if pointer else _draw_layouts
    classes = num_glyphs if pointer else 2
    labels = np.concatenate([_balanced_labels(n, classes, rng) for n in sizes])
    layouts = draw(labels, num_glyphs, image_size, layout, jitter, rng)
    for _ in range(100):
        _, first = np.unique(_layout_keys(layouts, layout), axis=0, return_index=True)
        repeat = np.setdiff1d(np.arange(len(layouts)), first)
        if len(repeat) == 0:
            return layouts, labels
        layouts[repeat] = draw(labels[repeat], num_glyphs, image_size, layout, jitter, rng)
    raise DataError(f"cannot draw {len(labels)} distinct images of {num_glyphs} glyphs at image_size "
                    f"{image_size} with jitter {jitter}: use fewer images, more glyphs, more jitter "
                    f"or a larger image_size")


def _render(layouts: np.ndarray, glyphs: np.ndarray, image_size: int, noise: float,
            rng: np.random.Generator) -> np.ndarray:
    """(N, image_size, image_size) float32 images: the glyphs on black, plus Gaussian noise.

    ``layouts`` holds (glyph, y, x) triples, one per glyph of the image, (y, x) its top-left pixel.
    """
    cell = image_size // CELLS_PER_IMAGE
    bitmaps = glyphs.repeat(cell, axis=1).repeat(cell, axis=2)
    side = bitmaps.shape[-1]
    images = np.zeros((len(layouts), image_size, image_size), dtype=np.float32)
    index = np.arange(len(layouts))[:, None, None]
    span = np.arange(side)
    for glyph in range(0, layouts.shape[1], 3):  # one gather-scatter per glyph, all images at once
        rows = (layouts[:, glyph + 1, None] + span)[:, :, None]
        cols = (layouts[:, glyph + 2, None] + span)[:, None, :]
        images[index, rows, cols] = bitmaps[layouts[:, glyph]]
    if noise > 0:
        images += noise * rng.standard_normal(images.shape, dtype=np.float32)
    return images


@functools.lru_cache(maxsize=4)
def generate_same_different(image_size: int, sizes: tuple[int, ...], layout: str, num_glyphs: int,
                            jitter: float, noise: float, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(images, labels) per split of ``sizes``; the same arguments give the same arrays (cached).

    Images are (n, image_size, image_size) float32 in about [0, 1]; labels int64, 1 = same glyph.
    """
    rng = np.random.default_rng(seed)
    glyphs = glyph_vocabulary(num_glyphs + (NUM_CUES if layout in POINTER_LAYOUTS else 0), rng)
    layouts, labels = _unique_layouts(sizes, num_glyphs, image_size, layout, jitter, rng)
    images = _render(layouts, glyphs, image_size, noise, rng)
    images.setflags(write=False)
    labels.setflags(write=False)
    bounds = np.cumsum((0,) + sizes)
    return tuple((images[lo:hi], labels[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:]))


class SameDifferentDataModule(ImageDataModule):
    """Glyph tasks: the pointer task (``pointer``, ``pointer_local``) or same/different (``apart``, ``together``).

    See the module docstring for why. ``layout="pointer"``: a cue glyph in one corner points to
    another corner, whose content glyph is the label (a long-range relation); ``"pointer_local"``
    puts the four glyphs in one quadrant (its local control). ``layout="apart"``: label 1 when the
    glyphs in diagonally opposite quadrants are the same; ``"together"`` puts both in one
    quadrant. No augmentation: every image is fresh, and a flip would change the glyphs.

    Args:
        image_size: side of the square images, at least 32 (a glyph is 3/16 of it).
        num_train: training images.
        num_val: validation images (model selection).
        num_test: test images (measured once after training).
        layout: ``pointer``, ``pointer_local``, ``apart`` or ``together`` (see above).
        num_glyphs: size of the glyph vocabulary, 2 to 97 (difficulty: more shapes to tell apart);
            for the pointer layouts the number of content glyphs and classes, 2 to 94 (three
            more glyphs are the cues).
        jitter: how far a glyph moves around its place, from 0 (always centred) to 1 (anywhere
            inside its quadrant, its half of the quadrant for ``together``, its cell for the
            pointer layouts) (difficulty).
        noise: standard deviation of the Gaussian pixel noise on [0, 1] images (difficulty).
        batch_size: images per batch.
        num_workers: DataLoader worker processes; 0 is fastest for in-memory tensors.
        split_seed: seed of the glyphs, layouts, noise and splits; the same seed gives the same
            three splits, whatever the global seed.
        in_chans: 1 for greyscale, 3 to repeat the grey channel.
    """

    def __init__(self, image_size: int = 64, num_train: int = 3000, num_val: int = 500, num_test: int = 500,
                 layout: str = "apart", num_glyphs: int = 4, jitter: float = 0.5, noise: float = 0.1,
                 batch_size: int = 64,
                 num_workers: int = 0, split_seed: int = 0, in_chans: int = 1):
        super().__init__(batch_size, num_workers)
        check_image_size(image_size)
        if image_size < MIN_IMAGE_SIZE:
            raise DataError(f"image_size must be at least {MIN_IMAGE_SIZE} for same/different glyphs, got "
                            f"{image_size}; set image_size to {MIN_IMAGE_SIZE} or more (e.g. 64)")
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            check_positive(name, value)
        if layout not in LAYOUTS:
            raise DataError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}; 'pointer' and "
                            f"'apart' are long-range tasks, 'pointer_local' and 'together' their local controls")
        most = MAX_GLYPHS - (NUM_CUES if layout in POINTER_LAYOUTS else 0)
        if isinstance(num_glyphs, bool) or not isinstance(num_glyphs, int) or not 2 <= num_glyphs <= most:
            raise DataError(f"num_glyphs must be an integer from 2 to {most} for layout {layout}, got "
                            f"{num_glyphs!r}; e.g. set num_glyphs to 2")
        if not (isinstance(jitter, (int, float)) and not isinstance(jitter, bool) and 0 <= jitter <= 1):
            raise DataError(f"jitter must be a number from 0 (glyphs centred) to 1 (anywhere in their "
                            f"place), got {jitter!r}; e.g. 0.5")
        check_noise(noise, 0.1)
        check_split_seed(split_seed)
        check_channels(in_chans)
        classes = num_glyphs if layout in POINTER_LAYOUTS else 2
        capacity = distinct_images(image_size, layout, num_glyphs, jitter)
        # Drawing more than half of all possible images would make the redraws of repeats crawl.
        if -(-(num_train + num_val + num_test) // classes) > capacity // 2:
            raise DataError(f"{num_train + num_val + num_test} images cannot be drawn without repeats: "
                            f"{layout} with {num_glyphs} glyphs, jitter {jitter} at image_size {image_size} "
                            f"has only {capacity} distinct images per label; use fewer images, more jitter, "
                            f"more glyphs or a larger image_size")
        self.save_hyperparameters()
        self.num_classes = classes
        self.in_chans = in_chans
        self.image_size = image_size
        self.sizes = (num_train, num_val, num_test)
        self.layout = layout
        self.num_glyphs = num_glyphs
        self.jitter = float(jitter)
        self.noise = float(noise)
        self.split_seed = split_seed

    def setup(self, stage: str | None = None) -> None:
        """Generate (or reuse this process's copy of) the three splits."""
        if self.train_set is not None:
            return
        splits = generate_same_different(self.image_size, self.sizes, self.layout, self.num_glyphs,
                                         self.jitter, self.noise, self.split_seed)
        tensors = [(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.copy())) for x, y in splits]
        train_images = tensors[0][0]
        transform = NormaliseGrey(train_images.mean().item(), train_images.std().item(), self.in_chans)
        self.train_set, self.val_set, self.test_set = (InMemoryImages(x, y, transform) for x, y in tensors)
