"""Time grids of diffusers' schedulers, recomputed in numpy, and the Sampler that steps on one.

A published pipeline evaluates its model where its scheduler's ``set_timesteps`` says, and
our even grids (``predictions.flow_grid``, ``predictions.diffusion_grid``) differ from
those. The builders here redo each scheduler's arithmetic in the same floating-point
order, from the parsed ``scheduler/scheduler_config.json`` (no torch, no I/O):

- FlowMatchEulerDiscreteScheduler: sigmas evenly spaced from the largest to the smallest
  entry of its float32 training table (already shifted unless the shift is dynamic), then
  shifted (SD3's t' = s t / (1 + (s - 1) t), Esser et al. 2024 eq. 23, or the
  resolution-dependent mu of SD3 / Flux), optionally stretched to end at shift_terminal,
  then a final 0 appended. 3 steps, shift 3: [1, 0.751, 0.0089, 0]. A pipeline may hand
  it sigmas of its own instead of the evenly spaced ones (FluxPipeline: linspace(1,
  1 / steps, steps)); they are shifted alike.
- DDIMScheduler: "leading", "trailing" or "linspace" timesteps (Lin et al. 2024, Table 2);
  the step from t lands on the abar of t - T // N, on or off the grid (-1: the final abar).
- DDPMScheduler: the same timesteps; the step lands on the next grid entry.
- UniPCMultistepScheduler, DPMSolverMultistepScheduler (our "unipc", "dpmpp_2m"): on
  DDPM betas, timesteps spaced as DDIM's but over steps + 1 points with the last one
  dropped ("linspace" 3 steps: 999, 666, 333), each step landing on the next, the last
  on sigma 0 ("zero") or abar_0 ("sigma_min"). With use_flow_sigmas (Wan: flow_shift 3 or
  5, prediction_type flow_prediction), shifted flow sigmas (UniPC: from 1 - 1e-6, DPM:
  from the shifted 1 - 1 / T), and the model is handed int(T sigma), not T sigma: the
  Sampler carries those as ``model_times``.

Where a config asks for something our solvers cannot reproduce, a ValueError names the
field rather than sampling on a grid that only looks similar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from erg_jax import multistep as M
from erg_jax import predictions as P
from erg_jax import samplers as S
from erg_jax import solvers as SV

FLOW = "FlowMatchEulerDiscreteScheduler"
DDIM = "DDIMScheduler"
DDPM = "DDPMScheduler"
UNIPC = "UniPCMultistepScheduler"
DPM = "DPMSolverMultistepScheduler"
SCHEDULERS = (FLOW, DDIM, DDPM, UNIPC, DPM)
SPACINGS = ("leading", "trailing", "linspace")
# the class whose rules each solver follows, and each class's own solver
RULES = {
    "euler": FLOW,
    "heun": FLOW,
    "ddim": DDIM,
    "ddpm": DDPM,
    "unipc": UNIPC,
    "dpmpp_2m": DPM,
}
_OWN = {FLOW: "euler", DDIM: "ddim", DDPM: "ddpm", UNIPC: "unipc", DPM: "dpmpp_2m"}

# Every field each class reads, with the value its constructor gives a missing one.
_DIFFUSION_FIELDS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
FIELDS: dict[str, dict[str, Any]] = {
    FLOW: {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    },
    DDIM: {**_DIFFUSION_FIELDS, "set_alpha_to_one": True},
    DDPM: {**_DIFFUSION_FIELDS, "variance_type": "fixed_small"},
    **{M.CLASSES[k]: v for k, v in M.FIELDS.items()},
}
# Flags whose effect our solvers do not have, and why.
_REFUSED = {
    "use_karras_sigmas": "Karras sigmas are not implemented here",
    "use_exponential_sigmas": "exponential sigmas are not implemented here",
    "use_beta_sigmas": "beta sigmas are not implemented here",
    "invert_sigmas": "inverted sigmas (Mochi's data-at-1 time) are not implemented here",
    "stochastic_sampling": "it re-noises every step with the scheduler's own generator",
    "thresholding": "dynamic thresholding of x0 is not implemented here",
    "rescale_betas_zero_snr": "zero-terminal-SNR betas are not implemented here",
    "use_lu_lambdas": "Lu lambdas are not implemented here",
    "euler_at_final": "a first-order last step at any length is not implemented here",
    "solver_p": "an outside predictor is not implemented here",
}
_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_VARIANCES = ("fixed_small", "fixed_small_log", "learned_range")
# Sampler fields the scheduler config decides; a caller changes them through overrides.
_FROM_CONFIG = (
    "steps",
    "grid",
    "shift",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "num_train_steps",
    "alpha_to_one",
    "float32_betas",
    "fixed_variance",
    "clip_x0",
    "order",
    "lower_order_final",
    "solver_type",
    "disable_corrector",
    "model_times",
)


def dynamic_shift_mu(
    image_seq_len: int,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """SD3 / Flux's resolution-dependent mu: linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_image_seq_len)


def flow_sigmas(
    steps: int,
    *,
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    mu: float | None = None,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
    sigmas: np.ndarray | None = None,
) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's sigmas after ``set_timesteps(steps)``, or after
    ``set_timesteps(sigmas=sigmas)`` when a pipeline passes its own.

    Args:
      steps: number of solver steps.
      num_train_timesteps: T of the training table sigma = i / T, i = 1..T.
      shift: the fixed shift (used when mu is None).
      mu: the dynamic shift's parameter (``dynamic_shift_mu``); None = fixed shift.
      time_shift_type: the dynamic shift: "exponential" (e^mu) or "linear" (mu).
      shift_terminal: stretch 1 - sigma so that the last sigma is this; None/0 = off.
      sigmas: (steps,) the unshifted sigmas a pipeline hands the scheduler (FluxPipeline:
        linspace(1, 1 / steps, steps)), shifted as the scheduler shifts its own; None =
        the scheduler's own, spaced over its training table.

    Returns:
      (steps + 1,) float32 noise levels, the last 0.
    """
    if sigmas is not None:
        sigma = np.asarray(sigmas, np.float64).astype(np.float32)
        if sigma.shape != (steps,):
            raise ValueError(f"sigmas must have shape ({steps},), got {sigma.shape}")
    else:
        # The scheduler's float32 training table ends at 1 / T; it is shifted with the
        # fixed shift when that is on, so the fixed shift reaches the grid's ends twice.
        one, smallest = np.float32(1.0), np.float32(1.0) / np.float32(num_train_timesteps)
        if mu is None:
            one, smallest = (shift * v / (1 + (shift - 1) * v) for v in (one, smallest))
        t = np.linspace(
            float(one) * num_train_timesteps, float(smallest) * num_train_timesteps, steps
        )
        sigma = t / num_train_timesteps
    if mu is None:
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
    else:
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(
                f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}"
            )
        m = math.exp(mu) if time_shift_type == "exponential" else mu
        sigma = m / (m + (1 / sigma - 1))
    if shift_terminal:
        rest = 1 - sigma
        sigma = 1 - rest / (rest[-1] / (1 - shift_terminal))
    return np.append(sigma.astype(np.float32), np.float32(0.0))


def diffusion_timesteps(
    steps: int,
    *,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """DDIM / DDPM model timesteps after ``set_timesteps(steps)``, (steps,) int64, decreasing.

    leading: multiples of T // steps from 0, plus steps_offset (3 steps: 666, 333, 0).
    trailing: T - 1 and every T / steps below, rounded (3 steps: 999, 666, 332).
    linspace: round(linspace(0, T - 1, steps)) (3 steps: 999, 500, 0).
    """
    n = num_train_timesteps
    if timestep_spacing == "leading":
        return (np.arange(steps) * (n // steps))[::-1].astype(np.int64) + steps_offset
    if timestep_spacing == "trailing":
        ks = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        if len(ks) != steps:
            # np.arange overshoots by one for some counts (61, 103, ...); diffusers then
            # steps at t = -1, which indexes the last abar.
            raise ValueError(
                f"steps: trailing spacing with {steps} steps gives diffusers {len(ks)} "
                f"timesteps, the last {ks[-1]}; choose another step count"
            )
        return ks
    if timestep_spacing == "linspace":
        return np.round(np.linspace(0, n - 1, steps))[::-1].astype(np.int64)
    raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")


def scheduler_grid(
    scheduler_config: Mapping[str, Any],
    steps: int,
    *,
    image_seq_len: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    solver: str | None = None,
    sigmas: np.ndarray | None = None,
) -> np.ndarray:
    """The ``Sampler.grid`` that reproduces a diffusers scheduler; see ``sampler_from_scheduler``.

    Returns:
      flow: (steps + 1,) float32 sigmas; diffusion: (2, steps) int32, the model timesteps
      and the timestep whose abar each step lands on (-1: the final abar).
    """
    rules, _, cfg = _resolve(scheduler_config, overrides, solver)
    return _grid(rules, cfg, steps, image_seq_len, sigmas)[0]


def scheduler_timesteps(
    scheduler_config: Mapping[str, Any],
    steps: int,
    *,
    image_seq_len: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    solver: str | None = None,
    sigmas: np.ndarray | None = None,
) -> np.ndarray:
    """The scheduler's ``timesteps`` after ``set_timesteps(steps)``: what its pipeline
    hands the model, (steps,) float32 T sigma (FlowMatchEulerDiscreteScheduler) or int64."""
    rules, _, cfg = _resolve(scheduler_config, overrides, solver)
    return _grid(rules, cfg, steps, image_seq_len, sigmas)[1]


def sampler_from_scheduler(
    scheduler_config: Mapping[str, Any],
    steps: int,
    *,
    image_seq_len: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    sigmas: np.ndarray | None = None,
    **sampler_kw,
) -> S.Sampler:
    """A Sampler that steps where a diffusers pipeline's scheduler does.

    Args:
      scheduler_config: the parsed scheduler_config.json (with "_class_name"); fields it
        lacks take the class's defaults, fields no supported class reads are ignored.
      steps: number of solver steps (num_inference_steps).
      image_seq_len: image tokens, needed with use_dynamic_shifting (SD3 / Flux's mu).
      overrides: config fields replaced before anything is built, e.g.
        {"shift": 5.0} or {"timestep_spacing": "trailing"}.
      sigmas: (steps,) unshifted sigmas the pipeline passes to ``set_timesteps`` (flow
        schedulers only; FluxPipeline's linspace(1, 1 / steps, steps)); None = the
        scheduler's own.
      **sampler_kw: ``make_sampler`` fields the config does not decide: solver (flow
        configs: euler or heun; DDIM / DDPM / UniPC / DPM-Solver++ configs: ddim, ddpm,
        unipc or dpmpp_2m, each following its own class's rules, as ``from_config``
        would), learned_sigma, time, eta, prediction (FlowMatch; otherwise it must agree
        with prediction_type).

    Returns:
      A checked Sampler with ``grid`` set, and ``model_times`` where the scheduler hands
      the model other than ``time`` of the grid (UniPC / DPM-Solver++ on flow sigmas).
    """
    taken = sorted(set(sampler_kw) & set(_FROM_CONFIG))
    if taken:
        raise ValueError(f"{taken} come from the scheduler config; change them with overrides")
    rules, solver, cfg = _resolve(scheduler_config, overrides, sampler_kw.pop("solver", None))
    grid, timesteps = _grid(rules, cfg, steps, image_seq_len, sigmas)
    multistep = rules in (UNIPC, DPM)
    flow = rules == FLOW or (multistep and cfg["use_flow_sigmas"])
    if flow and sampler_kw.get("time") == "sd3" and cfg["num_train_timesteps"] != 1000:
        raise ValueError(
            "num_train_timesteps: the scheduler feeds the model sigma * "
            f"{cfg['num_train_timesteps']}, time 'sd3' feeds 1000 sigma"
        )
    if rules == FLOW:
        return S.make_sampler(solver, steps, grid=grid, **sampler_kw)
    fields = M.settings(solver, cfg, PREDICTIONS) if multistep else {}
    prediction = (M.FLOW_PREDICTIONS if flow else PREDICTIONS)[cfg["prediction_type"]]
    if sampler_kw.pop("prediction", prediction) != prediction:
        raise ValueError(
            f"prediction: the scheduler's prediction_type {cfg['prediction_type']!r} means "
            f"{prediction!r}; change it with overrides={{'prediction_type': ...}}"
        )
    fields.update(prediction=prediction, grid=grid)
    if flow:  # the model reads int(T sigma), in its own units
        tau = timesteps.astype(np.float64) / cfg["num_train_timesteps"]
        fields["model_times"] = SV.flow_native(sampler_kw.get("time", "unit"), tau)
        return S.make_sampler(solver, steps, **fields, **sampler_kw)
    fields.update(
        beta_schedule=_BETAS[cfg["beta_schedule"]],
        beta_start=float(cfg["beta_start"]),
        beta_end=float(cfg["beta_end"]),
        num_train_steps=int(cfg["num_train_timesteps"]),
        float32_betas=True,
    )
    if multistep:
        return S.make_sampler(
            solver, steps, alpha_to_one=cfg["final_sigmas_type"] == "zero", **fields, **sampler_kw
        )
    learned = bool(sampler_kw.get("learned_sigma", False))
    variance = cfg["variance_type"] if rules == DDPM else None
    if variance == "learned_range" and not learned:
        raise ValueError(
            "variance_type 'learned_range' reads the model's variance channels: "
            "pass learned_sigma=True (a model with 2C output channels)"
        )
    return S.make_sampler(
        solver,
        steps,
        # DDPMScheduler always ends on abar = 1.
        alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
        # DDPM's fixed variances ignore the channels a learned-sigma model also outputs.
        fixed_variance=variance in ("fixed_small", "fixed_small_log"),
        clip_x0=float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None,
        **fields,
        **sampler_kw,
    )


def is_flow_config(scheduler_config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config steps a flow-matching model (FlowMatchEuler, or a
    multistep scheduler with use_flow_sigmas)."""
    name = scheduler_config.get("_class_name")
    return name == FLOW or (name in (UNIPC, DPM) and bool(scheduler_config.get("use_flow_sigmas")))


def _resolve(scheduler_config, overrides, solver) -> tuple[str, str, dict]:
    """(the class whose rules apply, the solver, its fields: defaults < config < overrides)."""
    name = scheduler_config.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler _class_name must be one of {SCHEDULERS}, got {name!r}")
    solver = solver or _OWN[name]
    # a diffusion config may run any diffusion solver, by that solver's class (from_config)
    family = S.DIFFUSION_SOLVERS + S.MULTISTEP_SOLVERS
    if name == FLOW:
        family = S.FLOW_SOLVERS
    elif is_flow_config({**scheduler_config, **(overrides or {})}):
        family = S.MULTISTEP_SOLVERS
    if solver not in family:
        raise ValueError(
            f"solver: {name} takes one of {family}, got {solver!r} (any solver runs on our "
            "even grid: sampler.scheduler=even with sampler.shift)"
        )
    rules = RULES[solver]
    fields = FIELDS[rules]
    unknown = sorted(set(overrides or {}) - set(fields))
    if unknown:
        raise ValueError(
            f"overrides: unknown field(s) {unknown} for {rules}; known: {sorted(fields)}"
        )
    cfg = {**fields, **{k: v for k, v in scheduler_config.items() if k in fields}}
    cfg.update(overrides or {})
    for field, why in _REFUSED.items():
        if cfg.get(field):
            raise ValueError(f"{field}=true: cannot reproduce {rules} with it ({why})")
    if rules in (UNIPC, DPM):
        M.settings(solver, cfg, PREDICTIONS)
    return rules, solver, cfg


def _check_betas(rules: str, cfg: dict) -> None:
    if cfg["trained_betas"] is not None:
        raise ValueError(f"trained_betas: cannot reproduce {rules} with its own betas")
    if cfg["beta_schedule"] not in _BETAS:
        raise ValueError(
            f"beta_schedule must be one of {tuple(_BETAS)}, got {cfg['beta_schedule']!r}"
        )
    if cfg["beta_schedule"] == "linear" and cfg["num_train_timesteps"] != 1000:
        # Our "linear" scales its end points by 1000 / T (ADM); diffusers' does not.
        raise ValueError(
            f"num_train_timesteps must be 1000 with linear betas, got {cfg['num_train_timesteps']}"
        )


def _grid(rules: str, cfg: dict, steps: int, image_seq_len, sigmas=None) -> tuple:
    """(the Sampler's grid, the scheduler's timesteps)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if sigmas is not None and rules != FLOW:
        raise ValueError(f"sigmas: a pipeline's own sigmas need a {FLOW}, not a {rules}")
    n = cfg["num_train_timesteps"]
    if rules == FLOW:
        mu = None
        if cfg["use_dynamic_shifting"]:
            if image_seq_len is None:
                raise ValueError("image_seq_len is needed with use_dynamic_shifting=true")
            keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
            mu = dynamic_shift_mu(image_seq_len, *(cfg[k] for k in keys))
        if cfg["time_shift_type"] not in ("exponential", "linear"):
            raise ValueError(
                f"time_shift_type must be 'exponential' or 'linear', got {cfg['time_shift_type']!r}"
            )
        if float(cfg["shift"]) <= 0:
            raise ValueError(f"shift must be > 0, got {cfg['shift']!r}")
        with np.errstate(invalid="ignore"):
            sigmas = flow_sigmas(
                steps,
                num_train_timesteps=n,
                shift=cfg["shift"],
                mu=mu,
                time_shift_type=cfg["time_shift_type"],
                shift_terminal=cfg["shift_terminal"],
                sigmas=sigmas,
            )
        if not np.all(np.isfinite(sigmas)):
            # One step leaves shift_terminal's stretch 0 / 0: diffusers' sigmas are NaN too.
            raise ValueError(
                f"shift_terminal={cfg['shift_terminal']} needs steps >= 2, got {steps}"
            )
        return sigmas, sigmas[:-1] * np.float32(n)
    if rules in (UNIPC, DPM) and cfg["use_flow_sigmas"]:
        if float(cfg["flow_shift"]) <= 0:
            raise ValueError(f"flow_shift must be > 0, got {cfg['flow_shift']!r}")
        abar_0 = None
        if rules == DPM and cfg["final_sigmas_type"] == "sigma_min":  # read off the betas
            _check_betas(rules, cfg)
            args = (_BETAS[cfg["beta_schedule"]], n, cfg["beta_start"], cfg["beta_end"], True)
            abar_0 = P.alphas_cumprod(*args)[0]
        kw = dict(num_train_timesteps=n, flow_shift=float(cfg["flow_shift"]))
        kw.update(shift_terminal=cfg.get("shift_terminal"), abar_0=abar_0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = M.flow_sigmas(
                steps, _OWN[rules], final_sigmas_type=cfg["final_sigmas_type"], **kw
            )
        if not np.all(np.isfinite(out[0])):
            raise ValueError(f"shift_terminal={cfg['shift_terminal']} needs steps >= 2")
        return out
    _check_betas(rules, cfg)
    if cfg["prediction_type"] not in PREDICTIONS:
        raise ValueError(
            f"prediction_type must be one of {tuple(PREDICTIONS)}, got {cfg['prediction_type']!r}"
        )
    if rules == DDPM and cfg["variance_type"] not in _VARIANCES:
        raise ValueError(
            f"variance_type must be one of {_VARIANCES}, got {cfg['variance_type']!r} "
            "(cannot reproduce the large or fully learned variances)"
        )
    if steps > n:
        raise ValueError(f"steps must be in [1, {n}], got {steps}")
    spacing = dict(timestep_spacing=cfg["timestep_spacing"], steps_offset=int(cfg["steps_offset"]))
    if rules in (UNIPC, DPM) and cfg["timestep_spacing"] != "trailing":
        # DDIM's spacing over steps + 1 points, the last one (0) dropped
        ks = diffusion_timesteps(steps + 1, num_train_timesteps=n, **spacing)[:-1]
    else:
        ks = diffusion_timesteps(steps, num_train_timesteps=n, **spacing)
    if rules == DDIM:
        prev = np.maximum(ks - n // steps, -1)
    else:
        prev = np.append(ks[1:], -1)
    return np.stack([ks, prev]).astype(np.int32), ks
