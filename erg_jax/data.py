"""A synthetic, seeded data set of 32x32 RGB images, one coloured shape on a textured ground.

The built-in models of erg-jax train on this set, and the quality bench (quality,
diversity, consistency: ``erg_jax.metrics``) reads it back. Each image holds one object:

- shape: one of ``SHAPES`` (square, circle, triangle, cross, diamond, ring), drawn from a
  signed distance function with a one-pixel linear edge ramp, so edges are antialiased;
- colour: one of ``COLOURS`` (red, green, blue, yellow, purple, orange), saturated, with a
  small per-image jitter (std ``COLOUR_JITTER`` per channel);
- size: ``size`` uniform in [0, 1), the radius in pixels ``RADIUS[0] + size * (RADIUS[1] -
  RADIUS[0])``; its word is small / medium / large below 1/3, below 2/3, above;
- position: ``position = (x, y)`` uniform in [0, 1)^2 (x to the right, y downward): where
  the object's centre sits inside the room it has, so x = 0 touches the left margin and
  x = 1 the right one whatever the size. The word comes from a 3x3 grid over the same
  coordinates with cuts at 1/3 and 2/3 ("upper left", "top", ..., "lower right");
- background: a muted tinted grey, plus smooth noise (a 5x5 Gaussian grid, mostly
  brightness, upsampled bilinearly) and faint stripes of random frequency, angle and phase.

The class label is ``shape * NUM_COLOURS + colour`` and the caption reads "a small red
triangle in the upper left". Images are NHWC float32 in [-1, 1].

Determinism: images are drawn in blocks of ``BLOCK`` with the generator
``np.random.default_rng((seed, block))``, so a sample depends only on (seed, its index):
``make_dataset(n, s)`` is a prefix of ``make_dataset(m, s)`` for m > n, and equal calls give
bit-identical arrays. The training split uses ``TRAIN_SEED``, the held-out one
``HELDOUT_SEED``.
"""

from __future__ import annotations

import re

import numpy as np

SHAPES = ("square", "circle", "triangle", "cross", "diamond", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
NUM_SHAPES = len(SHAPES)
NUM_COLOURS = len(COLOURS)
NUM_CLASSES = NUM_SHAPES * NUM_COLOURS
SIZE_WORDS = ("small", "medium", "large")
POSITION_WORDS = (
    ("upper left", "top", "upper right"),
    ("left", "center", "right"),
    ("lower left", "bottom", "lower right"),
)
IMAGE_SIZE = 32
RADIUS = (4.0, 10.0)
COLOUR_JITTER = 0.03
BLOCK = 1024
TRAIN_SEED = 0
HELDOUT_SEED = 1
SEEDS = {"train": TRAIN_SEED, "heldout": HELDOUT_SEED}

_RGB = np.array(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.75, 0.20],  # green
        [0.15, 0.30, 0.95],  # blue
        [0.95, 0.88, 0.10],  # yellow
        [0.62, 0.15, 0.82],  # purple
        [1.00, 0.52, 0.05],  # orange
    ]
)
# Farthest reach of each shape from its centre, in radii; keeps the object inside the frame.
_EXTENT = np.array([1.0, 1.0, 1.2, 1.0, 1.3, 1.0])
_PREPOSITION = {"top": "at the", "bottom": "at the", "left": "on the", "right": "on the"}
_CAPTION = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?:in|at|on) the (?P<position>[\w ]+)$"
)


def _word(value: float | np.ndarray) -> np.ndarray:
    """Index 0, 1 or 2 of the third of [0, 1) that value falls in."""
    return np.clip(np.floor(np.asarray(value) * 3), 0, 2).astype(int)


def caption(shape: int, colour: int, size: float, position) -> str:
    """The caption of one image, e.g. "a small red triangle in the upper left".

    Args:
      shape: index into SHAPES.
      colour: index into COLOURS.
      size: size in [0, 1).
      position: (x, y) in [0, 1)^2, x to the right, y downward.
    """
    x, y = position
    where = POSITION_WORDS[int(_word(y))][int(_word(x))]
    preposition = _PREPOSITION.get(where, "in the")
    return (
        f"a {SIZE_WORDS[int(_word(size))]} {COLOURS[colour]} {SHAPES[shape]} {preposition} {where}"
    )


def parse_caption_words(text: str) -> dict[str, str]:
    """The size, colour, shape and position words of a caption made by ``caption``."""
    match = _CAPTION.match(text.strip().lower())
    if match is None:
        raise ValueError(f"not a caption of this data set: {text!r}")
    words = match.groupdict()
    positions = [w for row in POSITION_WORDS for w in row]
    for key, vocabulary in (
        ("size", SIZE_WORDS),
        ("colour", COLOURS),
        ("shape", SHAPES),
        ("position", positions),
    ):
        if words[key] not in vocabulary:
            raise ValueError(f"unknown {key} {words[key]!r} in caption {text!r}")
    return words


def parse_caption(text: str) -> tuple[int, int]:
    """The (shape, colour) indices named by a caption."""
    words = parse_caption_words(text)
    return SHAPES.index(words["shape"]), COLOURS.index(words["colour"])


def radius(size: np.ndarray) -> np.ndarray:
    """Radius in pixels of objects of the given size in [0, 1)."""
    return RADIUS[0] + np.asarray(size) * (RADIUS[1] - RADIUS[0])


def centre(shape: np.ndarray, size: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(n, 2) pixel coordinates (x, y) of the objects' centres (pixel j spans [j, j + 1))."""
    # Two pixels of room: the edge ramp reaches up to a pixel past a triangle's apex.
    margin = _EXTENT[np.asarray(shape)] * radius(size) + 2.0
    return margin[:, None] + np.asarray(position) * (IMAGE_SIZE - 2 * margin[:, None])


def _box(px: np.ndarray, py: np.ndarray, hx, hy) -> np.ndarray:
    """Signed distance to an axis-aligned box of half-extents (hx, hy)."""
    qx, qy = np.abs(px) - hx, np.abs(py) - hy
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def coverage(shape: np.ndarray, size: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(n, 32, 32) float32 share of each pixel covered by the object, edges ramped.

    Args:
      shape: (n,) indices into SHAPES.
      size: (n,) sizes in [0, 1).
      position: (n, 2) positions (x, y) in [0, 1)^2.
    """
    shape = np.asarray(shape)
    r = radius(size).astype(np.float32)[:, None, None]
    c = centre(shape, size, position).astype(np.float32)
    grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    px = grid[None, None, :] - c[:, 0, None, None]
    py = grid[None, :, None] - c[:, 1, None, None]
    px, py = np.broadcast_arrays(px, py)
    sdf = np.empty(px.shape, np.float32)
    for s, name in enumerate(SHAPES):
        i = np.flatnonzero(shape == s)
        if i.size == 0:
            continue
        x, y, ri = px[i], py[i], r[i]
        if name == "square":
            d = _box(x, y, 0.9 * ri, 0.9 * ri)
        elif name == "circle":
            d = np.hypot(x, y) - ri
        elif name == "triangle":
            # Equilateral, apex up, centroid at the centre: three half-planes, inradius 0.6 r.
            d = np.maximum(y, np.abs(x) * (np.sqrt(3) / 2) - y / 2) - 0.6 * ri
        elif name == "cross":
            d = np.minimum(_box(x, y, ri, 0.35 * ri), _box(x, y, 0.35 * ri, ri))
        elif name == "diamond":
            d = (np.abs(x) + np.abs(y) - 1.3 * ri) / np.sqrt(2)
        else:  # ring: outer radius r, hole radius r / 2
            d = np.abs(np.hypot(x, y) - 0.75 * ri) - 0.25 * ri
        sdf[i] = d
    return np.clip(0.5 - sdf, 0.0, 1.0)


def background(num: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 32, 32, 3) float32 muted textured backgrounds in [0, 1]."""
    grey = rng.uniform(0.25, 0.6, (num, 1))
    tint = rng.uniform(-1.0, 1.0, (num, 3))
    base = grey + 0.1 * (tint - tint.mean(axis=1, keepdims=True))
    # Mostly brightness, a little hue: the ground never rivals the object's saturation.
    coarse = rng.normal(0.0, 0.07, (num, 5, 5, 1)) + rng.normal(0.0, 0.03, (num, 5, 5, 3))
    # Bilinear upsampling of the 5x5 grid as one matrix per axis.
    t = (np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE * 4
    up = np.maximum(0.0, 1.0 - np.abs(t[:, None] - np.arange(5)[None, :]))
    noise = np.einsum("yi,nijc,xj->nyxc", up, coarse, up, optimize=True)
    amplitude = rng.uniform(0.0, 0.08, num)
    frequency = rng.uniform(1.5, 4.0, num) * 2 * np.pi / IMAGE_SIZE
    angle = rng.uniform(0.0, np.pi, num)
    phase = rng.uniform(0.0, 2 * np.pi, num)
    grid = np.arange(IMAGE_SIZE) + 0.5
    along = (
        np.cos(angle)[:, None, None] * grid[None, None, :]
        + np.sin(angle)[:, None, None] * grid[None, :, None]
    )
    stripes = amplitude[:, None, None] * np.sin(
        frequency[:, None, None] * along + phase[:, None, None]
    )
    out = base[:, None, None, :] + noise + stripes[..., None]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def render(
    shape: np.ndarray,
    colour: np.ndarray,
    size: np.ndarray,
    position: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draws objects over fresh backgrounds; colour jitter and background come from rng.

    Args:
      shape: (n,) indices into SHAPES.
      colour: (n,) indices into COLOURS.
      size: (n,) sizes in [0, 1).
      position: (n, 2) positions (x, y) in [0, 1)^2.
      rng: numpy generator for the colour jitter and the background.

    Returns:
      (n, 32, 32, 3) float32 images in [-1, 1].
    """
    num = len(shape)
    rgb = _RGB[np.asarray(colour)] + rng.normal(0.0, COLOUR_JITTER, (num, 3))
    rgb = np.clip(rgb, 0.0, 1.0).astype(np.float32)[:, None, None, :]
    ground = background(num, rng)
    alpha = coverage(shape, size, position)[..., None]
    image = ground + alpha * (rgb - ground)
    return np.clip(2.0 * image - 1.0, -1.0, 1.0).astype(np.float32)


def _block(seed: int, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((seed, index))
    shape = rng.integers(0, NUM_SHAPES, BLOCK)
    colour = rng.integers(0, NUM_COLOURS, BLOCK)
    size = rng.uniform(0.0, 1.0, BLOCK)
    position = rng.uniform(0.0, 1.0, (BLOCK, 2))
    images = render(shape, colour, size, position, rng)
    return dict(images=images, shape=shape, colour=colour, size=size, position=position)


def make_dataset(num: int, seed: int, start: int = 0) -> dict:
    """Samples ``start .. start + num - 1`` of the data set with this seed.

    Args:
      num: number of images.
      seed: data set seed (TRAIN_SEED, HELDOUT_SEED or any other).
      start: index of the first sample, to stream a large set in pieces.

    Returns:
      dict with images (n, 32, 32, 3) float32 in [-1, 1]; shape, colour and label (n,)
      int64; size (n,) float64; position (n, 2) float64 (x, y); caption, a list of str.
    """
    if num < 0 or start < 0:
        raise ValueError(f"num and start must be >= 0, got {num} and {start}")
    first, last = start // BLOCK, -(-(start + num) // BLOCK)
    blocks = [_block(seed, b) for b in range(first, max(last, first + 1))]
    lo = start - first * BLOCK
    out = {k: np.concatenate([b[k] for b in blocks])[lo : lo + num] for k in blocks[0]}
    out["label"] = out["shape"] * NUM_COLOURS + out["colour"]
    out["caption"] = [
        caption(s, c, z, p)
        for s, c, z, p in zip(
            out["shape"], out["colour"], out["size"], out["position"], strict=True
        )
    ]
    return out


def split(name: str, num: int, start: int = 0) -> dict:
    """The "train" (TRAIN_SEED) or "heldout" (HELDOUT_SEED) split; see make_dataset."""
    if name not in SEEDS:
        raise ValueError(f"split must be one of {sorted(SEEDS)}, got {name!r}")
    return make_dataset(num, SEEDS[name], start)
