"""FLUX.1's token packing (2x2 latent patches, as FluxPipeline packs them) and rotary
positions (FluxPosEmbed; RoFormer, Su et al. 2021): ids (0, row, col) for the image
tokens and zeros for the text; axis a rotates its axes_dims_rope[a] channels of every
head at frequencies theta^(-2i / dim_a), adjacent channel pairs. The tables are numpy
constants of the shapes alone, applied in JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax.models.flux_config import ROPE_THETA

Array = jax.Array


def pack(x: Array, p: int) -> Array:
    """(b, H, W, C) latents -> (b, H/p * W/p, C*p*p) tokens, each patch's channels in
    (C, dy, dx) order as FluxPipeline packs them, tokens in row-major grid order."""
    b, hgt, wid, ch = x.shape
    x = x.reshape(b, hgt // p, p, wid // p, p, ch)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (hgt // p) * (wid // p), ch * p * p)


def unpack(h: Array, grid: tuple[int, int], p: int) -> Array:
    """(..., N, C*p*p) tokens -> (..., H, W, C) latents; the inverse of ``pack``."""
    lead, ch = h.shape[:-2], h.shape[-1] // (p * p)
    h = h.reshape(lead + (grid[0], grid[1], ch, p, p))
    k = len(lead)
    h = h.transpose(tuple(range(k)) + tuple(k + a for a in (0, 3, 1, 4, 2)))
    return h.reshape(lead + (grid[0] * p, grid[1] * p, ch))


def position_ids(grid: tuple[int, int], text_len: int) -> np.ndarray:
    """Token positions (text_len + H*W, 3): zeros for the text, then (0, row, col) for
    the image tokens in row-major order, as FluxPipeline makes them."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    img = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
    return np.concatenate([np.zeros((text_len, 3), img.dtype), img]).astype(np.float64)


def rope_tables(ids: np.ndarray, axes_dims: tuple[int, ...], theta: float = ROPE_THETA):
    """cos and sin (n, sum(axes_dims) / 2) float32 of every token's rotation angles.

    Axis a spends axes_dims[a] channels, axes_dims[a] / 2 pairs, on the angles
    pos_a * theta^(-2i / axes_dims[a]). Computed in float64 with numpy: the ids depend
    only on shapes, so the tables are constants of the traced program.
    """
    cols = []
    for a, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        cols.append(ids[:, a : a + 1] * freqs[None])
    angles = np.concatenate(cols, axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: Array, rope: tuple[Array, Array]) -> Array:
    """Rotates each channel pair (x0, x1) of x (b, n, h, d) by its token's angle."""
    cos, sin = (a[None, :, None, :] for a in rope)
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    # Per pair, not x * cos + rotate(x) * sin over whole vectors: XLA's CPU fusions then
    # round the rotation alike in every program, so a neutral control stays bit-exact.
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
