"""Multistep solvers on the data prediction: UniPC and DPM-Solver++ (2M).

Both read a noisy sample as x = alpha x0 + sigma eps and step in lambda = log(alpha /
sigma), half the log signal-to-noise ratio. Along lambda the probability-flow ODE has a
linear part that is integrated exactly, so only the data prediction m(lambda) (the x0
estimate) is approximated, by a polynomial through the last few estimates
(exponential-integrator multistep methods). With h = lambda_t - lambda_s, the first-order
step from s to t is DDIM's

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m_s.

- DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
  Diffusion Probabilistic Models", Alg. 2) adds the slope of m from the previous estimate:
  D = (m_s - m_prev) / r with r = h_prev / h, weighed by alpha_t (e^{-h} - 1) / 2
  ("midpoint") or by alpha_t ((e^{-h} - 1) / h + 1) ("heun").
- UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
  Sampling of Diffusion Models", Alg. 2; B(h) = e^h - 1 ("bh2") or h ("bh1")): the
  predictor UniP adds B(h)-weighted differences of earlier estimates; once the model has
  been read at the predicted point, the corrector UniC redoes that step with the new
  estimate in the polynomial as well. The corrected sample is what the next predictor
  starts from, and the model is not read again there, so a step still costs one
  evaluation.

The formulas and their floating-point order follow diffusers' UniPCMultistepScheduler
(predict_x0) and DPMSolverMultistepScheduler (dpmsolver++), including which order each
step takes (a warm-up of one first-order step; ``lower_order_final``). The order is a
traced choice between whole candidate updates, so one compiled step serves every step of
a lax.scan; a candidate that is not chosen may be infinite (a final sigma of 0 makes
lambda infinite) and is discarded by a select, never multiplied by zero.

Below the solvers: the fields of those two schedulers' configs, which of them ours take
(``settings``), and their flow sigmas (``flow_sigmas``); ``grids`` builds Samplers from
them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array
SOLVERS = ("unipc", "dpmpp_2m")
# each solver's variants, its default first
SOLVER_TYPES = {"unipc": ("bh2", "bh1"), "dpmpp_2m": ("midpoint", "heun")}
HISTORY = 2  # the data predictions a second-order step reads


@struct.dataclass
class History:
    """The multistep state in the scan carry. Legend: x0 (HISTORY, b, ...) the last data
    predictions, the newest last (zeros before the first steps); x (b, ...) the sample
    the last step started from, which UniC steps from again."""

    x0: Array
    x: Array


def init_history(x: Array) -> History:
    """An empty history for samples shaped like x (float32)."""
    z = jnp.zeros(x.shape, jnp.float32)
    return History(jnp.stack([z] * HISTORY), z)


def levels(sigmas: Array, flow: bool) -> tuple[Array, Array, Array]:
    """(alpha, sigma, lambda) at a scheduler's sigmas, each shaped like them.

    Flow sigmas are the noise level t (alpha = 1 - t); diffusion sigmas are the
    variance-exploding sigma = sqrt((1 - abar) / abar), so alpha = 1 / sqrt(sigma^2 + 1).
    A sigma of 0 gives lambda = +inf, a flow sigma of 1 lambda = -inf.
    """
    sig = jnp.asarray(sigmas, jnp.float32)
    if flow:
        alpha, sigma = 1.0 - sig, sig
    else:
        alpha = 1.0 / jnp.sqrt(sig * sig + 1.0)
        sigma = sig * alpha
    return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)


def unipc_order(i, steps: int, order: int, lower_order_final: bool):
    """UniP's order at step i: warm-up min(order, i + 1); the last steps lower with
    ``lower_order_final`` (at most steps - i). UniC at step i takes step i - 1's order."""
    p = jnp.minimum(order, i + 1)
    return jnp.minimum(p, steps - i) if lower_order_final else p


def dpm_order(i, steps: int, order: int, lower_order_final: bool, final_sigma):
    """DPM-Solver++'s order at step i: 1 at the first step, and at the last one when it
    ends on sigma 0 or (``lower_order_final``) the run has fewer than 15 steps."""
    last = (i == steps - 1) & ((lower_order_final and steps < 15) | (final_sigma == 0))
    return jnp.where((i == 0) | last, 1, order)


def _unipc_coefficients(h, solver_type: str):
    """h phi_1(-h) = e^{-h} - 1, B(h) and the right-hand side (b_1, b_2) of UniPC's
    order conditions, for a step of h in lambda (data prediction: the exponent is -h)."""
    hh = -h
    h_phi_1 = jnp.expm1(hh)
    b_h = hh if solver_type == "bh1" else jnp.expm1(hh)
    phi = h_phi_1 / hh - 1.0
    b1 = phi * 1.0 / b_h
    phi = phi / hh - 0.5
    return h_phi_1, b_h, b1, phi * 2.0 / b_h


def unipc_predict(x, m0, m1, i, lv, order, solver_type: str = "bh2"):
    """UniP from step i to i + 1: x at step i, m0 its data prediction, m1 step i - 1's.

    Args:
      x, m0, m1: (b, ...) float32.
      i: the step (traced); lv: ``levels`` of the (steps + 1,) sigmas.
      order: 1 or 2 (traced).
    """
    alpha, sigma, lam = lv
    h = lam[i + 1] - lam[i]
    h_phi_1, b_h, _, _ = _unipc_coefficients(h, solver_type)
    base = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * h_phi_1 * m0
    rk = (lam[i - 1] - lam[i]) / h
    d1 = (m1 - m0) / rk
    second = base - alpha[i + 1] * b_h * (0.5 * d1)
    return jnp.where(order >= 2, second, base)


def unipc_correct(x_last, m_new, m0, m1, i, lv, order, solver_type: str = "bh2"):
    """UniC at step i: redoes the step from x_last (step i - 1) with its data prediction
    m0, step i - 2's m1, and the new one m_new, read at the predicted sample of step i.

    Returns the corrected sample at step i; ``order`` is the order UniP took to reach it.
    """
    alpha, sigma, lam = lv
    h = lam[i] - lam[i - 1]
    h_phi_1, b_h, b1, b2 = _unipc_coefficients(h, solver_type)
    base = sigma[i] / sigma[i - 1] * x_last - alpha[i] * h_phi_1 * m0
    d1_t = m_new - m0
    first = base - alpha[i] * b_h * (0.5 * d1_t)
    rk = (lam[i - 2] - lam[i - 1]) / h
    d1 = (m1 - m0) / rk
    # rho solves [[1, 1], [rk, 1]] rho = (b1, b2)
    rho0 = (b2 - b1) / (rk - 1.0)
    rho1 = b1 - rho0
    second = base - alpha[i] * b_h * (rho0 * d1 + rho1 * d1_t)
    return jnp.where(order >= 2, second, first)


def unipc_step(
    x,
    m_new,
    hist: History,
    i,
    lv,
    *,
    steps: int,
    order: int = 2,
    lower_order_final: bool = True,
    solver_type: str = "bh2",
    disable_corrector: tuple[int, ...] = (),
):
    """One UniPC step: correct x (step i) with its data prediction m_new, then predict
    step i + 1. ``disable_corrector`` names the steps whose result UniC leaves as it is
    (diffusers' list). Returns (x at step i + 1, the new history)."""
    x = x.astype(jnp.float32)
    m0, m1 = hist.x0[-1], hist.x0[-2]
    last_order = unipc_order(i - 1, steps, order, lower_order_final)
    corrected = unipc_correct(hist.x, m_new, m0, m1, i, lv, last_order, solver_type)
    on = i > 0
    for j in disable_corrector:
        on = on & (i - 1 != j)
    x = jnp.where(on, corrected, x)
    p = unipc_order(i, steps, order, lower_order_final)
    x_next = unipc_predict(x, m_new, m0, i, lv, p, solver_type)
    return x_next, History(jnp.stack([m0, m_new]), x)


def dpmpp_2m_step(
    x,
    m_new,
    hist: History,
    i,
    lv,
    *,
    steps: int,
    order: int = 2,
    lower_order_final: bool = True,
    solver_type: str = "midpoint",
):
    """One DPM-Solver++(2M) step from x (step i) with its data prediction m_new.
    Returns (x at step i + 1, the new history)."""
    alpha, sigma, lam = lv
    x = x.astype(jnp.float32)
    m1 = hist.x0[-1]
    h = lam[i + 1] - lam[i]
    decay = alpha[i + 1] * (jnp.exp(-h) - 1.0)
    first = (sigma[i + 1] / sigma[i]) * x - decay * m_new
    r0 = (lam[i] - lam[i - 1]) / h
    d1 = (1.0 / r0) * (m_new - m1)
    if solver_type == "heun":
        second = first + (alpha[i + 1] * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
    else:
        second = first - 0.5 * decay * d1
    p = dpm_order(i, steps, order, lower_order_final, sigma[-1])
    return jnp.where(p >= 2, second, first), History(jnp.stack([m1, m_new]), x)


# --- diffusers' UniPCMultistepScheduler and DPMSolverMultistepScheduler ---------------

CLASSES = {"unipc": "UniPCMultistepScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "lower_order_final": True,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}
# Every field each class reads, with the value its constructor gives a missing one.
FIELDS = {
    "unipc": {
        **_COMMON,
        "predict_x0": True,
        "solver_type": "bh2",
        "disable_corrector": [],
        "solver_p": None,
        "sigma_min": None,  # read by Karras sigmas only
        "sigma_max": None,
        "shift_terminal": None,
    },
    "dpmpp_2m": {
        **_COMMON,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "euler_at_final": False,
        "use_lu_lambdas": False,
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,  # the pipeline hands the scheduler the first C channels
    },
}
# diffusers' solver_type as each constructor maps it
_TYPES = {
    "unipc": {"bh1": "bh1", "bh2": "bh2", **dict.fromkeys(("midpoint", "heun", "logrho"), "bh2")},
    "dpmpp_2m": {"heun": "heun", **dict.fromkeys(("midpoint", "logrho", "bh1", "bh2"), "midpoint")},
}
FLOW_PREDICTIONS = {"flow_prediction": "velocity", "sample": "x0"}


def settings(solver: str, cfg: dict, predictions) -> dict:
    """The Sampler's multistep fields (order, lower_order_final, solver_type,
    disable_corrector) from a UniPC / DPM-Solver++ config with every field present; a
    ValueError names a setting our solvers do not have. ``predictions``: the
    prediction_type values allowed without use_flow_sigmas."""
    refused = {
        "predict_x0": cfg.get("predict_x0", True) is not True,
        "algorithm_type": cfg.get("algorithm_type", "dpmsolver++") not in ("dpmsolver++", "deis"),
        "lambda_min_clipped": cfg.get("lambda_min_clipped", -float("inf")) != -float("inf"),
        "use_dynamic_shifting": bool(cfg["use_dynamic_shifting"]),
        "shift_terminal": bool(cfg.get("shift_terminal")) and not cfg["use_flow_sigmas"],
    }
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise ValueError(
            f"{bad[0]}={cfg[bad[0]]!r}: cannot reproduce {CLASSES[solver]} with it (ours "
            "step on the data prediction (predict_x0, dpmsolver++) over the whole schedule "
            "with a fixed flow_shift; shift_terminal needs use_flow_sigmas)"
        )
    if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError(
            f"final_sigmas_type must be 'zero' or 'sigma_min', got {cfg['final_sigmas_type']!r}"
        )
    allowed = FLOW_PREDICTIONS if cfg["use_flow_sigmas"] else predictions
    if cfg["prediction_type"] not in allowed:
        raise ValueError(
            f"prediction_type must be one of {tuple(allowed)} with use_flow_sigmas="
            f"{bool(cfg['use_flow_sigmas'])}, got {cfg['prediction_type']!r}"
        )
    if cfg["solver_order"] not in (1, 2):
        raise ValueError(f"solver_order must be 1 or 2, got {cfg['solver_order']!r}")
    types = _TYPES[solver]
    if cfg["solver_type"] not in types:
        raise ValueError(f"solver_type must be one of {tuple(types)}, got {cfg['solver_type']!r}")
    out = dict(
        order=int(cfg["solver_order"]),
        lower_order_final=bool(cfg["lower_order_final"]),
        solver_type=types[cfg["solver_type"]],
    )
    if solver == "unipc":
        out["disable_corrector"] = tuple(int(j) for j in cfg["disable_corrector"] or ())
    return out


def flow_sigmas(
    steps: int,
    solver: str = "unipc",
    *,
    num_train_timesteps: int = 1000,
    flow_shift: float = 1.0,
    shift_terminal: float | None = None,
    final_sigmas_type: str = "zero",
    abar_0: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """UniPC's or DPM-Solver++'s sigmas and timesteps with use_flow_sigmas (Wan's), in
    the schedulers' own floating-point order.

    unipc: linspace(1, 1 / T, steps + 1) without its last entry, shifted (SD3's shift with
    flow_shift), optionally stretched to end at shift_terminal, a first sigma of 1 moved
    to 1 - 1e-6. dpmpp_2m: 1 - linspace(1, 1 / T, steps + 1), shifted, reversed, without
    its last entry (0). Both hand the model int(T sigma), rounded down in float64.

    Args:
      final_sigmas_type: "zero", or "sigma_min": unipc ends on its last sigma again,
        dpmpp_2m on sqrt((1 - abar_0) / abar_0) of its DDPM betas (abar_0, float32).

    Returns:
      (steps + 1,) float32 sigmas and (steps,) int64 timesteps.
    """
    n = num_train_timesteps
    shift = lambda v: flow_shift * v / (1 + (flow_shift - 1) * v)  # noqa: E731
    if solver == "unipc":
        sig = shift(np.linspace(1, 1 / n, steps + 1)[:-1])
        if shift_terminal:
            sig = 1 - (1 - sig) / ((1 - sig[-1]) / (1 - shift_terminal))
        if abs(sig[0] - 1) < 1e-6:  # UniPC's own guard against lambda = -inf
            sig[0] -= 1e-6
        last = sig[-1]
    else:
        sig = np.flip(shift(1.0 - np.linspace(1, 1 / n, steps + 1)))[:-1].copy()
        a0 = np.float32(abar_0 if abar_0 is not None else 1.0)
        last = np.sqrt((np.float32(1.0) - a0) / a0)
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(
            f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}"
        )
    last = 0.0 if final_sigmas_type == "zero" else last
    return np.append(sig, last).astype(np.float32), (sig * n).astype(np.int64)
