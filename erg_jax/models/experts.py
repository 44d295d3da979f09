"""Two experts as one denoiser: a high-noise and a low-noise model switched at a timestep.

Wan 2.2's A14B models (Wan Team 2025) split the denoising path between two transformers
of one architecture: the first runs while the model's timestep t (its own units, 0..1000)
is at or above a boundary, boundary_ratio * num_train_timesteps from the pipeline
folder, the second below it, as diffusers' WanPipeline switches them. Every branch of a
step shares t, so the switch is a ``lax.cond`` on data: one expert's forward runs per
step, the guidance branches batched under it, and the program compiles once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def switched(high: Callable, low: Callable, boundary: float) -> Callable:
    """``denoiser(x, t, cond, attention=None)`` running ``high`` where t >= boundary and
    ``low`` below it (t: the model's timestep, the same for the whole batch), with the
    experts' ``branched`` switched alike and their layout, config and layer count."""

    def pick(t, x):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return t[0] >= boundary

    def denoiser(x: Array, t: Array, cond, attention=None) -> Array:
        return jax.lax.cond(
            pick(t, x),
            lambda: high(x, t, cond, attention),
            lambda: low(x, t, cond, attention),
        )

    def branched(x: Array, t: Array, cond, controls) -> Array:
        return jax.lax.cond(
            pick(t, x),
            lambda: high.branched(x, t, cond, controls),
            lambda: low.branched(x, t, cond, controls),
        )

    if hasattr(high, "branched"):
        denoiser.branched = branched
    for name in ("config", "num_layers", "layout"):
        if hasattr(high, name):
            setattr(denoiser, name, getattr(high, name))
    denoiser.boundary = boundary
    return denoiser
