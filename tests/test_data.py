"""The synthetic data set: seeded, captions true to the drawing, every attribute drawn."""

import numpy as np
import pytest

from erg_jax import data


@pytest.fixture(scope="module")
def batch():
    return data.make_dataset(600, seed=3)


def test_same_seed_is_bit_identical_and_seeds_differ(batch):
    again = data.make_dataset(600, seed=3)
    for key in ("images", "shape", "colour", "label", "size", "position"):
        np.testing.assert_array_equal(batch[key], again[key])
    assert batch["caption"] == again["caption"]
    other = data.make_dataset(600, seed=4)
    assert not np.array_equal(batch["images"], other["images"])
    assert not np.array_equal(batch["shape"], other["shape"])


def test_a_sample_depends_only_on_seed_and_index(batch):
    # Crosses the block boundary at data.BLOCK and starts inside a block.
    n = data.BLOCK + 50
    whole = data.make_dataset(n, seed=5)
    piece = data.make_dataset(100, seed=5, start=data.BLOCK - 50)
    np.testing.assert_array_equal(piece["images"], whole["images"][data.BLOCK - 50 :])
    assert piece["caption"] == whole["caption"][data.BLOCK - 50 :]
    np.testing.assert_array_equal(data.make_dataset(7, seed=5)["images"], whole["images"][:7])


def test_types_ranges_and_labels(batch):
    images = batch["images"]
    assert images.shape == (600, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    np.testing.assert_array_equal(
        batch["label"], batch["shape"] * data.NUM_COLOURS + batch["colour"]
    )
    assert batch["label"].max() < data.NUM_CLASSES
    assert set(batch["shape"]) == set(range(data.NUM_SHAPES)) and data.NUM_SHAPES >= 4
    assert set(batch["colour"]) == set(range(data.NUM_COLOURS)) and data.NUM_COLOURS >= 6
    assert len(set(batch["label"])) == data.NUM_CLASSES


def test_captions_name_the_drawn_attributes(batch):
    for i, text in enumerate(batch["caption"]):
        assert data.parse_caption(text) == (batch["shape"][i], batch["colour"][i])
        words = data.parse_caption_words(text)
        size_word = data.SIZE_WORDS[min(int(batch["size"][i] * 3), 2)]
        x, y = batch["position"][i]
        where = data.POSITION_WORDS[min(int(y * 3), 2)][min(int(x * 3), 2)]
        assert (words["size"], words["position"]) == (size_word, where), text
    assert data.caption(2, 0, 0.1, (0.1, 0.2)) == "a small red triangle in the upper left"
    assert data.caption(0, 1, 0.9, (0.5, 0.9)) == "a large green square at the bottom"
    with pytest.raises(ValueError):
        data.parse_caption("a small teal triangle in the upper left")


def test_object_is_drawn_where_and_as_large_as_stated(batch):
    alpha = data.coverage(batch["shape"], batch["size"], batch["position"])
    grid = np.arange(32) + 0.5
    mass = alpha.sum(axis=(1, 2))
    cx = (alpha.sum(axis=1) * grid).sum(axis=1) / mass
    cy = (alpha.sum(axis=2) * grid).sum(axis=1) / mass
    centre = data.centre(batch["shape"], batch["size"], batch["position"])
    # Every shape is centred on its centroid; a tenth of a pixel allows for the edge ramp.
    np.testing.assert_allclose(np.stack([cx, cy], 1), centre, atol=0.1)
    # The object lies inside the frame: no coverage on the border pixels.
    assert alpha[:, 0].max() == 0 and alpha[:, -1].max() == 0
    assert alpha[:, :, 0].max() == 0 and alpha[:, :, -1].max() == 0
    for s in range(data.NUM_SHAPES):
        i = batch["shape"] == s
        assert np.corrcoef(batch["size"][i], mass[i])[0, 1] > 0.95


def test_object_colour_shows_over_the_background(batch):
    alpha = data.coverage(batch["shape"], batch["size"], batch["position"])
    rgb = (batch["images"] + 1) / 2
    inside = (rgb * (alpha == 1)[..., None]).sum(axis=(1, 2)) / (alpha == 1).sum(axis=(1, 2))[
        :, None
    ]
    nearest = np.argmin(((inside[:, None] - data._RGB[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest, batch["colour"])


def test_train_and_heldout_splits_differ():
    train, heldout = data.split("train", 64), data.split("heldout", 64)
    np.testing.assert_array_equal(train["images"], data.make_dataset(64, data.TRAIN_SEED)["images"])
    assert data.TRAIN_SEED != data.HELDOUT_SEED
    # No held-out image is a copy of a training one.
    d = np.abs(train["images"][:, None] - heldout["images"][None]).max(axis=(2, 3, 4))
    assert d.min() > 0.05
    with pytest.raises(ValueError):
        data.split("test", 4)


def _grid_cell(word):
    """(row, column) of a position word, 0 = top / left, read from the word itself."""
    row = 0 if word == "top" or "upper" in word else 2 if word == "bottom" or "lower" in word else 1
    col = 0 if "left" in word else 2 if "right" in word else 1
    return row, col


def test_caption_position_words_match_the_drawn_object(batch):
    # The object's pixels, read from the image alone: those within 0.15 of its palette
    # colour (jitter std 0.03); the muted ground never comes that close.
    rgb = (batch["images"] + 1) / 2
    mask = np.abs(rgb - data._RGB[batch["colour"]][:, None, None]).max(-1) < 0.15
    grid = np.arange(32) + 0.5
    count = mask.sum(axis=(1, 2))
    assert count.min() >= 10
    drawn = np.stack(
        [(mask.sum(1) * grid).sum(1) / count, (mask.sum(2) * grid).sum(1) / count], 1
    )  # (n, 2) centroid (x, y) in pixels, y downward
    cells = np.array(
        [_grid_cell(data.parse_caption_words(t)["position"]) for t in batch["caption"]]
    )
    # The centre moves over the room left beside the object, which is symmetric about the
    # middle (16 px): a first third lies left of it, a last third right of it, and the middle
    # third within a third of the half-frame; 0.5 px allows for the mask's ragged edge.
    for axis, index in ((0, cells[:, 1]), (1, cells[:, 0])):
        c = drawn[:, axis] - 16.0
        assert np.all(c[index == 0] < 0.5), axis
        assert np.all(c[index == 2] > -0.5), axis
        assert np.all(np.abs(c[index == 1]) < 16 / 3 + 0.5), axis
        # Not only on the right side: the thirds sit well apart on average.
        assert c[index == 0].mean() < -4 and c[index == 2].mean() > 4, axis
    assert {tuple(c) for c in cells} == {(r, k) for r in range(3) for k in range(3)}
