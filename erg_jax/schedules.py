"""Guidance weight schedules over the noise level t, and the range check they share with
the guiders' settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
SHAPES = ("constant", "linear", "cosine")


def check_range(value, name, lo, hi, *, lo_open=False, hi_open=False):
    """Raises ValueError naming the field when a concrete value (tracers pass) lies
    outside [lo, hi] (open ends where asked) or is NaN."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        v = jnp.asarray(value, jnp.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}") from e
    lo_bad = (v <= lo) if lo_open else (v < lo)
    hi_bad = (v >= hi) if hi_open else (v > hi)
    if bool(jnp.any(lo_bad | hi_bad | jnp.isnan(v))):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")


@struct.dataclass
class WeightSchedule:
    """Guidance weight over the noise level t (1 = pure noise).

    ``w(t) = 1 + (scale - 1) * shape(t)`` inside [t_min, t_max] and 1 outside (the
    guidance interval of Kynkaanniemi et al. 2024). Shapes, each averaging 1 over t
    (Wang et al. 2024): constant 1; linear 2 (1 - t); cosine 1 + cos(pi t); or a
    function of t (a static, hashable callable). With ``low`` set, ``low`` takes the
    place of ``scale`` below the noise level ``switch`` (a second expert's own weight,
    Wan 2.2's guidance_scale_2).
    """

    scale: Any = 1.0
    t_min: Any = 0.0
    t_max: Any = 1.0
    shape: str | Callable = struct.field(pytree_node=False, default="constant")
    low: Any = None
    switch: Any = None

    def __call__(self, t: Array) -> Array:
        t = jnp.asarray(t, jnp.float32)
        if callable(self.shape):
            s = self.shape(t)
        elif self.shape == "constant":
            s = jnp.ones_like(t)
        elif self.shape == "linear":
            s = 2.0 * (1.0 - t)
        else:
            s = 1.0 + jnp.cos(jnp.pi * t)
        inside = (t >= self.t_min) & (t <= self.t_max)
        scale = self.scale
        if self.low is not None:
            scale = jnp.where(t >= self.switch, self.scale, self.low)
        return jnp.where(inside, 1.0 + (scale - 1.0) * s, 1.0)


def schedule(
    scale, shape: str | Callable = "constant", interval: tuple = (0.0, 1.0)
) -> WeightSchedule:
    """A checked WeightSchedule."""
    if not callable(shape) and shape not in SHAPES:
        raise ValueError(f"schedule shape must be one of {SHAPES} or a callable, got {shape!r}")
    if isinstance(interval, str) or len(interval) != 2:
        raise ValueError(f"interval must be two noise levels (lo, hi), got {interval!r}")
    check_range(interval[0], "interval[0]", 0.0, 1.0)
    check_range(interval[1], "interval[1]", 0.0, 1.0)
    if not any(isinstance(v, jax.core.Tracer) for v in interval) and float(interval[0]) > float(
        interval[1]
    ):
        raise ValueError(f"interval must have interval[0] <= interval[1], got {interval!r}")
    return WeightSchedule(scale, interval[0], interval[1], shape)
