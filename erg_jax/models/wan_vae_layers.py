"""The layers of the Wan 2.1 video VAE, in Flax, channel-last (b, F, H, W, C).

Follows the causal 3-D Wan-VAE of the Wan Team 2025 (Wan: Open and Advanced Large-Scale
Video Generative Models) as diffusers' AutoencoderKLWan lays it out, so its checkpoints
convert key by key (``erg_jax.convert.wan_vae``).

Time is causal: a 3-D convolution with a kernel of 3 frames sees the current frame and
the two before it, with zeros before the first frame. A video is processed in chunks
(see ``erg_jax.models.wan_vae``), so each such convolution keeps the last ``CACHE_T`` = 2
frames of its input as a cache that the next chunk reads as its past. Every cached layer
here takes ``(x, cache)`` and returns ``(y, new_cache)``: the cache is a pytree of fixed
shapes, so a ``jax.lax.scan`` over chunks can carry it. ``cache=None`` stands for the
zeros before the video starts.

The layers: an RMS norm over channels (x / ||x|| * sqrt(C) * gamma), residual blocks of
two causal convolutions, per-frame single-head self-attention, and the resampling
layers. Temporal upsampling doubles the frames of every chunk but the first (whose one
frame stays one frame), with a (3, 1, 1) causal convolution giving the two output frames
as two channel halves; temporal downsampling halves the frames of every chunk but the
first with a stride-2 (3, 1, 1) convolution that reads one cached frame.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from erg_jax.energy import energy_attention

Array = jax.Array
Cache = Any  # a pytree of (b, frames, H, W, C) arrays, or None before the first chunk

CACHE_T = 2  # past frames a causal 3-frame convolution reads


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every layer shares: the three dtypes and the attention kernel."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: str | None = None
    attention_implementation: str | None = None


def sub(cache: Cache, name: str) -> Cache:
    """The cache of child ``name`` (None before the first chunk)."""
    return None if cache is None else cache[name]


def dense(s: Settings, features: int, name: str) -> nn.Dense:
    """A 1x1(x1) convolution: a Dense over the channel axis."""
    return nn.Dense(
        features, dtype=s.dtype, param_dtype=s.param_dtype, precision=s.precision, name=name
    )


def conv(s: Settings, features: int, kernel: tuple[int, ...], name: str, **kw: Any) -> nn.Conv:
    return nn.Conv(
        features,
        kernel,
        dtype=s.dtype,
        param_dtype=s.param_dtype,
        precision=s.precision,
        name=name,
        **kw,
    )


def causal_conv3d(
    s: Settings, features: int, name: str, x: Array, cache: Array | None, spatial: int = 3
) -> tuple[Array, Array]:
    """A 3-D convolution causal in time (3 frames), 'same' zero padding in space.

    Each output frame reads its own input frame and the two before it: the cache (the
    last 2 input frames of the previous chunk, zeros before the video) goes in front of
    the chunk. Call inside a compact module; the Conv is its child ``name``.

    Args:
      x: (b, F, H, W, c).
      cache: (b, 2, H, W, c), or None for zeros.
      spatial: kernel height and width (3, or 1 for a time-only kernel).

    Returns:
      (b, F, H, W, features) and the new cache, the last 2 frames of [cache, x].
    """
    if cache is None:
        cache = jnp.zeros(x.shape[:1] + (CACHE_T,) + x.shape[2:], x.dtype)
    x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    p = spatial // 2
    kernel = (CACHE_T + 1, spatial, spatial)
    y = conv(s, features, kernel, name, padding=((0, 0), (p, p), (p, p)))(x)
    return y, x[:, -CACHE_T:]


class RMSNorm(nn.Module):
    """x / max(||x||_2, 1e-12) * sqrt(C) * scale over the channel axis (no bias).

    The normalisation runs in float32 whatever the activation dtype.
    """

    s: Settings

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.s.param_dtype)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = (x32 / jnp.maximum(norm, 1e-12)).astype(self.s.dtype)
        return y * jnp.asarray(c**0.5, self.s.dtype) * scale.astype(self.s.dtype)


class ResidualBlock(nn.Module):
    """x' = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))), convs causal.

    The shortcut is a 1x1x1 convolution where the channel count changes, else identity.
    """

    features: int
    s: Settings

    @nn.compact
    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        """(b, F, H, W, c_in) -> (b, F, H, W, features), with the caches of conv1, conv2."""
        h = x if x.shape[-1] == self.features else dense(self.s, self.features, "conv_shortcut")(x)
        y = nn.silu(RMSNorm(self.s, name="norm1")(x))
        y, c1 = causal_conv3d(self.s, self.features, "conv1", y, sub(cache, "conv1"))
        y = nn.silu(RMSNorm(self.s, name="norm2")(y))
        y, c2 = causal_conv3d(self.s, self.features, "conv2", y, sub(cache, "conv2"))
        return y + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, with a residual."""

    s: Settings

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(b, F, H, W, c) -> (b, F, H, W, c); beta = 1 / sqrt(c)."""
        b, f, hgt, wid, c = x.shape
        h = RMSNorm(self.s, name="norm")(x)
        qkv = dense(self.s, 3 * c, "to_qkv")(h).reshape(b * f, hgt * wid, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = energy_attention(
            q,
            k,
            v,
            implementation=self.s.attention_implementation,
            precision=self.s.precision,
        )
        out = dense(self.s, c, "proj")(out.reshape(b, f, hgt, wid, c))
        return x + out.astype(x.dtype)


class MidBlock(nn.Module):
    """resnets_0 -> attentions_0 -> resnets_1 at the lowest resolution."""

    features: int
    s: Settings

    @nn.compact
    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        x, c0 = ResidualBlock(self.features, self.s, name="resnets_0")(x, sub(cache, "resnets_0"))
        x = AttentionBlock(self.s, name="attentions_0")(x)
        x, c1 = ResidualBlock(self.features, self.s, name="resnets_1")(x, sub(cache, "resnets_1"))
        return x, {"resnets_0": c0, "resnets_1": c1}


UP_MODES = ("upsample2d", "upsample3d")
DOWN_MODES = ("downsample2d", "downsample3d")


class Resample(nn.Module):
    """Spatial x2 up- or downsampling, and in the '3d' modes x2 in time too.

    upsample: (temporal first) nearest x2 in H and W, then a 3x3 conv to ``features``.
    downsample: zero pad bottom and right by one, a 3x3 stride-2 conv, then (temporal).

    Temporal upsampling: a causal (3, 1, 1) conv to 2c channels whose halves are the
    even and odd output frames; the first chunk skips it and keeps its one frame, and
    the next chunk starts from an empty (zero) cache, so the first frame is never part
    of the time conv's past. Temporal downsampling: a stride-2 (3, 1, 1) conv over the
    last frame of the previous chunk followed by this chunk's frames; the first chunk
    skips it and only leaves its frame in the cache.
    """

    mode: str
    features: int
    s: Settings

    @nn.compact
    def __call__(
        self, x: Array, cache: Array | None = None, first: bool = False
    ) -> tuple[Array, Array | None]:
        """(b, F, H, W, c) -> (b, F', H', W', features) and the new cache.

        F' = F on the first chunk and in the '2d' modes, else 2F (up) or F / 2 (down).
        The cache: upsample3d the time conv's 2 past frames (b, 2, H, W, c); downsample3d
        the last frame after the spatial conv (b, 1, H', W', features); '2d' none.
        """
        new_cache = None
        if self.mode == "upsample3d":
            if first:
                new_cache = jnp.zeros(x.shape[:1] + (CACHE_T,) + x.shape[2:], x.dtype)
            else:
                c = x.shape[-1]
                y, new_cache = causal_conv3d(self.s, 2 * c, "time_conv", x, cache, spatial=1)
                b, f, hgt, wid, _ = y.shape
                y = y.reshape(b, f, hgt, wid, 2, c).transpose(0, 1, 4, 2, 3, 5)
                x = y.reshape(b, 2 * f, hgt, wid, c)
        if self.mode in UP_MODES:
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            return conv(self.s, self.features, (3, 3), "resample", padding=1)(x), new_cache
        if self.mode not in DOWN_MODES:
            raise ValueError(f"unknown resample mode {self.mode!r}")
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
        x = conv(self.s, self.features, (3, 3), "resample", strides=2, padding="VALID")(x)
        if self.mode == "downsample2d":
            return x, None
        if first:
            return x, x[:, -1:]
        past = jnp.zeros_like(x[:, :1]) if cache is None else cache.astype(x.dtype)
        time_conv = conv(
            self.s, self.features, (3, 1, 1), "time_conv", strides=(2, 1, 1), padding="VALID"
        )
        return time_conv(jnp.concatenate([past, x], axis=1)), x[:, -1:]
