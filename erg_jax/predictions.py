"""Noise processes, model parameterisations and the conversions between them.

Both processes write a noisy sample as ``x_t = a(t) * x0 + s(t) * eps``:

- flow matching (rectified flow, SD3, SiT): a = 1 - t, s = t, t in [0, 1], and the
  model predicts the velocity u = dx/dt = eps - x0;
- diffusion (DDPM, Ho et al. 2020): a = sqrt(abar_k), s = sqrt(1 - abar_k) for an integer
  step k of a linear, scaled-linear or cosine (Nichol & Dhariwal 2021) beta schedule,
  and the model predicts eps, v = a * eps - s * x0 (Salimans & Ho 2022), or x0.

Guiders combine predictions as x0 ("denoised") estimates, so every conversion lives here.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

PREDICTIONS = ("velocity", "eps", "v", "x0")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


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


def beta_schedule(
    kind: str, num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """DDPM betas (num_train_steps,), float64.

    linear: beta_start .. beta_end, both scaled by 1000 / T (Ho et al. 2020; ADM and DiT
      scale so that any T has the 1000-step schedule's shape; diffusers' "linear" at T=1000).
    scaled_linear: linspace(sqrt(beta_start), sqrt(beta_end))^2 (latent diffusion; diffusers'
      "scaled_linear", unscaled).
    cosine: abar(u) = cos^2((u + 0.008) / 1.008 * pi / 2) at u = i / T, betas capped at 0.999
      (Nichol & Dhariwal 2021; diffusers' "squaredcos_cap_v2", equal to the last bit).
    """
    if kind == "linear":
        scale = 1000.0 / num_train_steps
        return np.linspace(scale * beta_start, scale * beta_end, num_train_steps, dtype=np.float64)
    if kind == "scaled_linear":
        root = np.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=np.float64)
        return root**2
    if kind == "cosine":

        def abar(u):
            return math.cos((u / num_train_steps + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - abar(i + 1) / abar(i), 0.999) for i in range(num_train_steps)],
            dtype=np.float64,
        )
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {kind!r}")


def alphas_cumprod(
    kind: str,
    num_train_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    float32_betas: bool = False,
) -> np.ndarray:
    """abar_k = prod_{j <= k} (1 - beta_j), (num_train_steps,) float64.

    float32_betas follows diffusers, which rounds the betas and 1 - beta to float32 before
    the product (accumulated in float64, the result rounded to float32). Near beta = 0.999
    that rounding moves abar by ~1e-5 relative (cosine schedule), so a reference scheduler
    is matched only on its own arithmetic; ADM and DiT keep everything in float64.
    """
    betas = beta_schedule(kind, num_train_steps, beta_start, beta_end)
    if not float32_betas:
        return np.cumprod(1.0 - betas)
    alphas = np.float32(1.0) - betas.astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32).astype(np.float64)


def diffusion_grid(steps: int, num_train_steps: int = 1000) -> np.ndarray:
    """Integer steps k_0 = T - 1 > ... > k_{steps-1} = 0, evenly spread (DiT respacing)."""
    if steps > num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}], got {steps}")
    if steps == 1:
        return np.array([num_train_steps - 1])
    return np.round(np.linspace(num_train_steps - 1, 0, steps)).astype(np.int64)


def diffusion_tables(
    kind: str,
    steps: int,
    num_train_steps: int = 1000,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    float32_betas: bool = False,
    alpha_to_one: bool = True,
    grid=None,
) -> dict:
    """Per sampling step (steps,): k, abar at k, the "previous" abar, and whether noise is added.

    Without a grid: k on ``diffusion_grid`` and abar_prev the next step's abar, the final
    one after the last step, which alone adds no noise. With a grid (2, steps) int, traced:
    row 0 the k, row 1 the step whose abar is "prev" (-1: the final one), and noise is added
    wherever k > 0, as diffusers' DDPMScheduler does (with leading spacing and steps_offset
    the last k is 1). The final abar is 1, or abar_0 without ``alpha_to_one`` (DDIM's
    set_alpha_to_one=False).

    Returns:
      dict of (steps,) arrays: "k" int32, "abar" and "abar_prev" float32, "noisy" bool.
    """
    abar = alphas_cumprod(kind, num_train_steps, beta_start, beta_end, float32_betas)
    final = 1.0 if alpha_to_one else abar[0]
    if grid is None:
        ks = diffusion_grid(steps, num_train_steps)
        return {
            "k": jnp.asarray(ks, jnp.int32),
            "abar": jnp.asarray(abar[ks], jnp.float32),
            "abar_prev": jnp.asarray(np.append(abar[ks[1:]], final), jnp.float32),
            "noisy": jnp.arange(steps) < steps - 1,
        }
    table = jnp.asarray(abar, jnp.float32)
    ks, prev = grid[0], grid[1]
    return {
        "k": ks,
        "abar": table[ks],
        "abar_prev": jnp.where(prev >= 0, table[jnp.maximum(prev, 0)], jnp.float32(final)),
        "noisy": ks > 0,
    }
