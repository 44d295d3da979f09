"""Noise processes, model parameterisations and the conversions between them.

Both processes write a noisy sample as ``x_t = a(t) * x0 + s(t) * eps``:

- flow matching (rectified flow, SD3, SiT): a = 1 - t, s = t, t in [0, 1], and the
  model predicts the velocity u = dx/dt = eps - x0;
- diffusion (DDPM, Ho et al. 2020): a = sqrt(abar_k), s = sqrt(1 - abar_k) for an integer
  step k of a linear or cosine (Nichol & Dhariwal 2021) beta schedule, and the model
  predicts eps, v = a * eps - s * x0 (Salimans & Ho 2022), or x0.

Guiders combine predictions as x0 ("denoised") estimates, so every conversion lives here.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

PREDICTIONS = ("velocity", "eps", "v", "x0")
BETA_SCHEDULES = ("linear", "cosine")


def to_x0(pred, x, a, s, prediction: str):
    """The x0 estimate from a model prediction at x_t = a * x0 + s * eps."""
    if prediction == "x0":
        return pred
    if prediction == "eps":
        return (x - s * pred) / a
    if prediction == "v":  # needs a^2 + s^2 = 1
        return a * x - s * pred
    if prediction == "velocity":  # flow: a = 1 - s, u = eps - x0
        return x - s * pred
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def eps_from_x0(x0, x, a, s):
    """The noise estimate that goes with an x0 estimate."""
    return (x - a * x0) / s


def velocity_from_x0(x0, x, t):
    """Flow velocity u = (x_t - x0) / t."""
    return (x - x0) / t


def shift_time(t, shift):
    """SD3 time shift (Esser et al. 2024, eq. 23): t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_grid(steps: int, shift=1.0):
    """Noise levels 1 = t_0 > ... > t_steps = 0 of a flow sampler, (steps + 1,)."""
    t = jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)
    return shift_time(t, jnp.asarray(shift, jnp.float32))


def beta_schedule(kind: str, num_train_steps: int = 1000) -> np.ndarray:
    """DDPM betas (num_train_steps,), float64.

    linear: 1e-4 .. 0.02 scaled to 1000 steps (Ho et al. 2020; the DiT schedule).
    cosine: abar(t) = cos^2(((t / T) + 0.008) / 1.008 * pi / 2), betas capped at 0.999.
    """
    if kind == "linear":
        scale = 1000.0 / num_train_steps
        return np.linspace(scale * 1e-4, scale * 0.02, num_train_steps, dtype=np.float64)
    if kind == "cosine":

        def abar(u):
            return math.cos((u / num_train_steps + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - abar(i + 1) / abar(i), 0.999) for i in range(num_train_steps)],
            dtype=np.float64,
        )
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {kind!r}")


def diffusion_grid(steps: int, num_train_steps: int = 1000) -> np.ndarray:
    """Integer steps k_0 = T - 1 > ... > k_{steps-1} = 0, evenly spread (DiT respacing)."""
    if steps > num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}], got {steps}")
    if steps == 1:
        return np.array([num_train_steps - 1])
    return np.round(np.linspace(num_train_steps - 1, 0, steps)).astype(np.int64)


def diffusion_tables(kind: str, steps: int, num_train_steps: int = 1000) -> dict:
    """Per sampling step: k, abar at k, abar at the next step (1 after the last), float32."""
    abar = np.cumprod(1.0 - beta_schedule(kind, num_train_steps))
    ks = diffusion_grid(steps, num_train_steps)
    abar_k = abar[ks]
    abar_prev = np.concatenate([abar[ks[1:]], [1.0]])
    return {
        "k": jnp.asarray(ks, jnp.int32),
        "abar": jnp.asarray(abar_k, jnp.float32),
        "abar_prev": jnp.asarray(abar_prev, jnp.float32),
    }
