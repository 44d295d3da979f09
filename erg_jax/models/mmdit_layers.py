"""The MMDiT's building blocks that FLUX.1 shares: Dense layers in a Spec's dtypes and
shardings, LayerNorm without affine, adaLN modulation and sinusoidal timestep features."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from erg_jax.models.mmdit_config import Spec

Array = jax.Array


def dense(s: Spec, features: int, axes: tuple[str | None, str | None], name: str) -> nn.Dense:
    """A Dense layer in s's dtypes and precision, its kernel (and bias) sharded over the
    logical axes (in, out), xavier-uniform initialised like diffusers' linears."""
    init = nn.initializers.xavier_uniform()
    return nn.Dense(
        features,
        dtype=s.dtype,
        param_dtype=s.param_dtype,
        precision=s.precision,
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        name=name,
    )


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
    """LayerNorm without affine over the last axis, two-pass statistics in float32."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x (b, n, D) * (1 + scale) + shift, with shift, scale (b, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_features(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
    """Sinusoidal features [cos, sin] of t (b,) -> (b, dim), float32 (DDPM / diffusers)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
