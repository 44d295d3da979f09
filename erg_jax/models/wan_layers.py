"""The Wan transformer block (Wan 2025; diffusers' ``WanTransformerBlock``) and its parts:
3-D rotary positions, the space-time query blur of SEG, the attentions.

Per block, with the video tokens x (b, N, D), the embedded text c (b, L, D) and the six
modulation rows m = table + proj(temb) (b, 6, D), in float32 as Wan keeps them:

    x += m2 * SelfAttn(LN(x) (1 + m1) + m0)      rotary q, k; q, k RMS-normed over all heads
    x += CrossAttn(LN_affine(x), c)              no positions, every text row (padding too)
    x += m5 * FFN(LN(x) (1 + m4) + m3)           GELU-tanh

Rotary positions: each head's channels split into frame, row and column parts
(``Spec.rope_axes``); a part rotates adjacent channel pairs by its token's frame, row or
column index times theta^(-2i / part), theta = 10^4 (``flux_rope``'s tables and rotation,
whose pair convention is Wan's). The block's control (``erg_jax.control``) acts on the
self-attention only: SEG blurs its queries over the (frames, rows, columns) token grid
(``blur_queries_3d``), ``attend`` applies I-ERG's energy and PAG's identity (STG-A), TPG
moves the block's update, SLG skips the block (STG-R). The cross-attention is plain.

Context parallelism: under a mesh with a "context" axis the video tokens stay split along
their sequence between the attentions (``tokens``: logical axes ("batch", "length", -),
"length" -> "context"), the self-attention runs as ring or Ulysses attention
(``erg_jax.sharding.sequence_attention``) and the cross-attention as ring attention: the
queries stay where they are and only the text's keys and values, a few hundred rows
copied on every device, go round the ring.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from erg_jax import sharding
from erg_jax.control import (
    AttentionControl,
    attend,
    capture_received,
    image_block_output,
    sow_entropy,
)
from erg_jax.energy import energy_attention
from erg_jax.models.flux_rope import apply_rope, rope_tables
from erg_jax.models.mmdit_layers import dense, layer_norm
from erg_jax.models.wan_config import Spec

Array = jax.Array
Grid = tuple[int, int, int]  # token grid (frames, rows, columns) after patching


def tokens(x: Array) -> Array:
    """Video tokens (..., b, N, D) kept split over the batch and the context axis (a
    no-op without a mesh, ``erg_jax.sharding.constrain``)."""
    return sharding.constrain(x, (None,) * (x.ndim - 3) + ("batch", "length", None))


def wan_rope(grid: Grid, axes: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (F*H*W, head_dim / 2) float32 of every token's rotation angles, tokens
    in row-major (frame, row, column) order; numpy constants of the grid alone."""
    f, h, w = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
    ids = np.stack([f, h, w], axis=-1).reshape(-1, 3).astype(np.float64)
    return rope_tables(ids, axes)


def blur_queries_3d(q: Array, grid: Grid, sigma: Array) -> Array:
    """Gaussian blur of queries over their (frames, rows, columns) token grid (SEG).

    The blur is separable: a dense (n, n) kernel per axis, each row normalised over the
    grid (no padding), so sigma is traced data; sigma -> inf gives every query the mean
    of all queries, exactly; sigma <= 0 returns q unchanged.

    Args:
      q: (b, F*H*W, h, d) queries in row-major grid order.
      grid: (F, H, W).
      sigma: scalar blur width in tokens, the same on every axis.
    """
    b, n, h, d = q.shape
    if n != int(np.prod(grid)):
        raise ValueError(f"blur grid {grid} does not cover the {n} query tokens")
    sigma = jnp.asarray(sigma, jnp.float32)
    safe = jnp.where(sigma > 0, sigma, 1.0)

    def kernel(size):
        i = jnp.arange(size, dtype=jnp.float32)
        w = jnp.exp(-jnp.square(i[:, None] - i[None, :]) / (2.0 * jnp.square(safe)))
        return w / jnp.sum(w, axis=-1, keepdims=True)

    x = q.reshape(b, *grid, h, d).astype(jnp.float32)
    x = jnp.einsum("ij,bjyxhd->biyxhd", kernel(grid[0]), x)
    x = jnp.einsum("ij,bfjxhd->bfixhd", kernel(grid[1]), x)
    x = jnp.einsum("ij,bfyjhd->bfyihd", kernel(grid[2]), x)
    return jnp.where(sigma > 0, x.reshape(q.shape).astype(q.dtype), q)


def maybe_blur_3d(q: Array, grid: Grid, control: AttentionControl | None) -> Array:
    """SEG's space-time blur where the control asks for one; a per-head sigma (heads,)
    blurs its heads with the largest sigma and leaves the others (``control.maybe_blur``)."""
    if control is None or control.blur is None:
        return q
    sigma = jnp.asarray(control.blur)
    if not sigma.ndim:
        return blur_queries_3d(q, grid, sigma)
    on = sigma.reshape(1, 1, -1, 1) > 0
    return jnp.where(on, blur_queries_3d(q, grid, jnp.max(sigma)), q)


class HeadsRMSNorm(nn.Module):
    """RMSNorm over all heads' channels at once (b, n, D), affine (diffusers' norm_q /
    norm_k, ``rms_norm_across_heads``), in float32."""

    s: Spec

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.s.eps)
        init = nn.with_logical_partitioning(nn.initializers.ones, ("heads",))
        scale = self.param("scale", init, (x.shape[-1],), self.s.param_dtype)
        return (y * scale.astype(jnp.float32)).astype(self.s.dtype)


class Attention(nn.Module):
    """Self-attention of the video tokens (rotary, under the block's control), or their
    cross-attention to the text (``cross``: keys and values from c, no positions)."""

    s: Spec
    grid: Grid
    cross: bool = False

    def _project(self, x: Array, name: str, norm: bool) -> Array:
        s = self.s
        y = dense(s, s.dim, ("embed", "heads"), name)(x)
        if norm:
            y = HeadsRMSNorm(s, name=f"norm_{name[-1]}")(y)
        return y.reshape(x.shape[:2] + (s.heads, s.head_dim))

    @nn.compact
    def __call__(self, x: Array, c: Array | None, rope, control: AttentionControl | None):
        """x (b, N, D) tokens; c (b, L, D) the text (cross) or None; rope the (cos, sin)
        tables (self); control this layer's control (self) or None. Returns (b, N, D)."""
        s = self.s
        kv = c if self.cross else x
        q = self._project(x, "to_q", True)
        k = self._project(kv, "to_k", True)
        v = self._project(kv, "to_v", False)
        impl = sharding.sequence_attention(s.implementation, s.heads)
        kw = dict(implementation=impl, precision=s.precision)
        if self.cross:
            if impl in sharding.CONTEXT_IMPLEMENTATIONS:  # split queries, whole text
                kw["implementation"] = "ring"
            out = energy_attention(q, k, v, **kw)
        else:
            q = maybe_blur_3d(q, self.grid, control)
            q, k = apply_rope(q, rope), apply_rope(k, rope)
            capture_received(self, q, k, control)  # SAG's map, only where the control asks
            sow_entropy(self, q, k, control)  # the entropy probe, likewise
            out = attend(q, k, v, control, **kw)
        out = out.reshape(out.shape[:2] + (s.dim,)).astype(s.dtype)
        return dense(s, s.dim, ("heads", "embed"), "to_out")(out)


class FeedForward(nn.Module):
    """linear_2(gelu_tanh(linear_1(x))): the block's FFN and the text embedder."""

    s: Spec
    hidden: int
    axes_in: str | None = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(self.s, self.hidden, (self.axes_in, "mlp"), "linear_1")(x)
        return dense(self.s, self.s.dim, ("mlp", "embed"), "linear_2")(nn.gelu(h, approximate=True))


def _modulated(x: Array, shift: Array, scale: Array, eps: float, dtype) -> Array:
    """LN(x) (1 + scale) + shift in float32 (Wan's fp32 norms and table), cast to dtype."""
    return (layer_norm(x.astype(jnp.float32), eps) * (1 + scale) + shift).astype(dtype)


class Block(nn.Module):
    """One Wan block (module docstring).

    Called as ``(x, c, temb6, rope, control) -> (x, None)``, the carry / output pair of
    ``nn.scan``: x (b, N, D) the video tokens, c (b, L, D) the embedded text, temb6
    (b, 6, D) float32 the projected timestep embedding, rope the (cos, sin) tables.
    """

    s: Spec
    grid: Grid

    @nn.compact
    def __call__(self, x: Array, c: Array, temb6: Array, rope, control):
        s, d = self.s, self.s.dim
        init = nn.initializers.normal(d**-0.5)  # diffusers' randn / sqrt(dim)
        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(init, (None, "embed")),
            (6, d),
            s.param_dtype,
        )
        m = table.astype(jnp.float32)[None] + temb6.astype(jnp.float32)
        shift, scale, gate, c_shift, c_scale, c_gate = (m[:, i : i + 1] for i in range(6))

        x = tokens(x)
        h = _modulated(x, shift, scale, s.eps, s.dtype)
        a = Attention(s, self.grid, name="attn1")(h, None, rope, control)
        y = tokens((x.astype(jnp.float32) + a.astype(jnp.float32) * gate).astype(s.dtype))

        h = y  # no norm before the cross-attention unless cross_attn_norm (every Wan has it)
        if s.cross_attn_norm:
            h = NormAffine(s, name="norm2")(layer_norm(y.astype(jnp.float32), s.eps))
        c = sharding.constrain(c, ("batch", None, None))  # the text whole on every device
        y = y + Attention(s, self.grid, cross=True, name="attn2")(h.astype(s.dtype), c, None, None)

        h = _modulated(tokens(y), c_shift, c_scale, s.eps, s.dtype)
        ff = FeedForward(s, s.ffn_dim, name="ffn")(h)
        y = (y.astype(jnp.float32) + ff.astype(jnp.float32) * c_gate).astype(s.dtype)
        return tokens(image_block_output(x, y, control)), None


class NormAffine(nn.Module):
    """The affine part of an fp32 LayerNorm: x * scale + bias over (D,), x float32."""

    s: Spec

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        ones = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
        scale = self.param("scale", ones, (d,), self.s.param_dtype).astype(jnp.float32)
        return x * scale + self.param("bias", zeros, (d,), self.s.param_dtype).astype(jnp.float32)
