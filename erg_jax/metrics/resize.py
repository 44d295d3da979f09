"""Image resizing as the FID implementations do it before their feature networks.

``bilinear_tf1`` is TensorFlow 1.x's ``resize_bilinear`` (align_corners=False), the resize
inside the 2015-12-05 Inception graph, as torch-fidelity re-implements it
(``interpolate_bilinear_2d_like_tensorflow1x``): output pixel i reads the source at

    s = i * (in / out)                  (no half-pixel offset: the grid is anchored at 0)

and blends the pixels floor(s) and min(floor(s) + 1, in - 1) by s - floor(s), first along
the width, then along the height. It runs on the device, inside the jitted network.

``clean_resize`` is clean-fid's "clean" mode (Parmar et al. 2022): each channel as a float32
PIL image ("F" mode), resized with PIL's antialiased bicubic filter, clipped to [0, 255]
and kept in float32 (no rounding back to uint8). It runs on the host, per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def _tf1_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Low and high source indices (n_out,) and the weight of the high one, float32.

    The coordinates are computed in float32 as TensorFlow (and torch-fidelity) compute
    them, so the weights match theirs to the last bit.
    """
    s = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    lo = s.astype(np.int64)  # s >= 0: truncation is floor
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, s - lo.astype(np.float32)


def bilinear_tf1(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TensorFlow 1.x bilinear resize (align_corners=False) of (n, H, W, C) to (n, h, w, C).

    Args:
      x: float images (n, H, W, C).
      size: the output (h, w).

    Returns:
      (n, h, w, C) in x's dtype; x itself when (h, w) == (H, W).
    """
    h, w = (int(s) for s in size)
    n_h, n_w = x.shape[1], x.shape[2]
    if (h, w) == (n_h, n_w):
        return x
    x_lo, x_hi, dx = _tf1_taps(n_w, w)
    y_lo, y_hi, dy = _tf1_taps(n_h, h)
    dx = jnp.asarray(dx, x.dtype)[None, None, :, None]
    dy = jnp.asarray(dy, x.dtype)[None, :, None, None]
    top, bottom = jnp.take(x, y_lo, axis=1), jnp.take(x, y_hi, axis=1)
    rows = []
    for r in (top, bottom):
        left, right = jnp.take(r, x_lo, axis=2), jnp.take(r, x_hi, axis=2)
        rows.append(left + (right - left) * dx)
    return rows[0] + (rows[1] - rows[0]) * dy


def clean_resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """clean-fid's "clean" resize: per channel, PIL float32 bicubic, clipped to [0, 255].

    Args:
      images: uint8 (n, H, W, C) images.
      size: the output (h, w).

    Returns:
      float32 (n, h, w, C) in [0, 255].
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be (n, H, W, C), got shape {x.shape}")
    h, w = (int(s) for s in size)
    out = np.empty((x.shape[0], h, w, x.shape[3]), np.float32)
    for i, image in enumerate(x):
        for c in range(x.shape[3]):
            # A 2-d float32 array becomes a mode "F" image; PIL sizes are (width, height).
            channel = Image.fromarray(np.ascontiguousarray(image[:, :, c], np.float32))
            out[i, :, :, c] = np.asarray(channel.resize((w, h), resample=Image.BICUBIC))
    return np.clip(out, 0, 255, out=out)
