"""An exact denoiser of a finite set of stored images, written as one attention layer.

For data that is a finite set of patterns P_j (equal weights) and x_t = (1 - t) x0 + t eps,
the posterior mean E[x0 | x_t] = sum_j softmax_j(-|x_t - (1 - t) P_j|^2 / (2 t^2)) P_j is
attention with query x_t, keys and values P_j, scale (1 - t) / t^2 and bias
-(1 - t)^2 |P_j|^2 / (2 t^2) (Karras et al. 2022, "ideal denoiser"; Ramsauer et al. 2021
for the Hopfield reading). Class conditioning masks the patterns of other classes; the
null class attends to all. Since the logits go through ``attend``, ERG's temperature acts
on exactly the attention that the paper's energy rectifies: a small model with an
analytic answer, used by the demo job and the tests.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from erg_jax.control import AttentionControl, attend


class PatternDenoiser:
    """Flow-matching velocity of the ideal denoiser of stored patterns.

    Args:
      patterns: (K, H, W, C) the data set.
      labels: (K,) int class of each pattern in [0, num_classes).
      num_classes: classes; label num_classes is the null (unconditional) class.
    """

    num_layers = 1

    def __init__(self, patterns, labels, num_classes: int):
        self.patterns = jnp.asarray(patterns, jnp.float32)
        self.labels = jnp.asarray(labels, jnp.int32)
        self.num_classes = int(num_classes)
        if self.patterns.ndim != 4 or self.labels.shape != self.patterns.shape[:1]:
            raise ValueError("patterns must be (K, H, W, C) with one label each")

    def __call__(self, x, t, cond, attention: AttentionControl | None = None):
        """Velocity u = (x - E[x0 | x_t]) / t.

        Args:
          x: (b, H, W, C) noisy images; t: (b,) noise level in (0, 1].
          cond: (b,) int labels; num_classes = null.
          attention: control with one layer, or None.
        """
        b = x.shape[0]
        flat = self.patterns.reshape(self.patterns.shape[0], -1)
        t = jnp.asarray(t, jnp.float32).reshape(b, 1, 1, 1)
        q = (x.reshape(b, 1, 1, -1) * (1.0 - t) / jnp.square(t)).astype(jnp.float32)
        k = jnp.broadcast_to(flat[None, :, None, :], (b,) + flat.shape[:1] + (1, flat.shape[1]))
        bias = -jnp.square(1.0 - t) * jnp.sum(jnp.square(flat), -1) / (2.0 * jnp.square(t))
        bias = bias.reshape(b, 1, 1, -1)
        cond = jnp.asarray(cond)
        mask = (self.labels[None, :] == cond[:, None]) | (cond[:, None] == self.num_classes)
        ctl = None if attention is None else attention.layer(0)
        # The query is x_t scaled by (1 - t) / t^2, so with gamma != 1 or several energy
        # steps the update mixes that scaled query in; the toy is meant for tau and alpha.
        x0 = attend(q, k, k, ctl, bias=bias, mask=mask[:, None, None, :], scale=1.0)
        x0 = x0.reshape(x.shape)
        return ((x - x0) / t).astype(x.dtype)


def shape_patterns(num_classes: int = 4, per_class: int = 8, size: int = 16, seed: int = 0):
    """Procedural stored images: class c is a shape (square, disc, cross, bar, ...) of a
    colour, at varied positions and sizes on a dark background, values in [-1, 1].

    Returns:
      (patterns (K, size, size, 3), labels (K,)).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    colours = np.array(
        [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]], np.float32
    )
    out, labels = [], []
    for c in range(num_classes):
        for _ in range(per_class):
            cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
            r = rng.uniform(size * 0.15, size * 0.3)
            kind = c % 4
            if kind == 0:
                m = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
            elif kind == 1:
                m = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            elif kind == 2:
                m = ((np.abs(yy - cy) < r / 3) & (np.abs(xx - cx) < r)) | (
                    (np.abs(xx - cx) < r / 3) & (np.abs(yy - cy) < r)
                )
            else:
                m = (np.abs(yy - cy) < r / 3) & (np.abs(xx - cx) < r * 1.3)
            img = np.full((size, size, 3), -0.8, np.float32)
            img[m] = colours[c % len(colours)]
            out.append(img)
            labels.append(c)
    return np.stack(out), np.array(labels, np.int32)
