"""One step of every solver, given the guided x0 estimate where the step reads the model.

Flow matching (x_t = (1 - t) x0 + t eps): Euler and Heun (Karras et al. 2022, Alg. 1,
the last step Euler). Diffusion (DDPM-trained): DDIM with eta (Song et al. 2021, eq. 12)
and DDPM ancestral sampling (Ho et al. 2020) with the fixed posterior variance or DiT's
learned one (Nichol & Dhariwal 2021, eq. 15). Either process: UniPC (Zhao et al. 2023)
and DPM-Solver++(2M) (Lu et al. 2022) on the data prediction (``erg_jax.multistep``),
one model evaluation per step, their history of x0 estimates in the scan carry.

Each ``*_step(sampler, guided, ...)`` returns the scan body ``(carry, i) -> (carry,
None)``; ``guided(x, point, state, step, index, done=None) -> (x0, variance channels,
state)`` runs the guider and the denoiser (``samplers.make_step``). The sampler is
duck-typed: this module sits below ``samplers``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from erg_jax import multistep as M
from erg_jax import predictions as P

Array = jax.Array


@struct.dataclass
class Point:
    """Where a step evaluates the model. Legend: t noise level in [0, 1] (guiders' clock);
    a, s the signal and noise coefficients of x_t; native the model's timestep."""

    t: Array
    a: Array
    s: Array
    native: Array


def flow_native(time: str, t):
    """The flow model's own timestep at noise level t: "unit" t, "sd3" 1000 t, "sit" 1 - t."""
    return {"unit": t, "sd3": 1000.0 * t, "sit": 1.0 - t}[time]


def flow_point(sampler, t, native=None) -> Point:
    """The point at flow noise level t; native defaults to the ``time`` mapping of t."""
    return Point(t, 1.0 - t, t, flow_native(sampler.time, t) if native is None else native)


def flow_grid(sampler) -> Array:
    """The (steps + 1,) noise levels a flow sampler steps on."""
    return sampler.grid if sampler.grid is not None else P.flow_grid(sampler.steps, sampler.shift)


def check_grid(s) -> Array:
    """The grid as the solver reads it; a ValueError names what is wrong with it."""
    g = np.asarray(s.grid)
    if s.is_flow:
        if g.shape != (s.steps + 1,):
            raise ValueError(f"grid must have shape (steps + 1,) = ({s.steps + 1},), got {g.shape}")
        if not (np.all(np.isfinite(g)) and g.min() >= 0.0 and g.max() <= 1.0):
            raise ValueError(f"grid noise levels must lie in [0, 1], got {g}")
        d = np.diff(g)
        # a multistep run may end where it stands (diffusers' final_sigmas_type sigma_min)
        if not (np.all(d[:-1] < 0) and (d[-1] < 0 or (d[-1] == 0 and s.solver in M.SOLVERS))):
            raise ValueError(f"grid noise levels must strictly decrease, got {g}")
        return jnp.asarray(g, jnp.float32)
    last = s.num_train_steps - 1
    if g.shape != (2, s.steps):
        raise ValueError(f"grid must have shape (2, steps) = (2, {s.steps}), got {g.shape}")
    if not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"grid must hold integer diffusion steps, got dtype {g.dtype}")
    ks, prev = g
    if ks.min() < 0 or ks.max() > last or not np.all(np.diff(ks) < 0):
        raise ValueError(
            f"grid row 0 (model steps) must strictly decrease in [0, {last}], got {ks}"
        )
    if prev.min() < -1 or not np.all(prev < ks):
        raise ValueError(
            f"grid row 1 (previous steps) must lie in [-1, {last}] below row 0, got {prev}"
        )
    if s.solver in M.SOLVERS and not np.array_equal(prev[:-1], ks[1:]):
        raise ValueError(f"grid row 1 must be row 0's next steps for {s.solver}, got {prev}")
    return jnp.asarray(g, jnp.int32)


def flow_step(sampler, guided):
    """Euler or Heun on the flow grid."""
    grid = flow_grid(sampler)

    def step(carry, i):
        x, state = carry
        t, t_next = grid[i], grid[i + 1]
        native = None if sampler.model_times is None else sampler.model_times[i]
        x0, _, state = guided(x, flow_point(sampler, t, native), state, 2 * i, i)
        u = P.velocity_from_x0(x0, x, t)
        x_euler = x + (t_next - t) * u
        if sampler.solver == "euler":
            return (x_euler.astype(x.dtype), state), None

        def heun(state):
            point = flow_point(sampler, t_next)
            x0b, _, state = guided(x_euler, point, state, 2 * i + 1, i, i + 1)
            u2 = P.velocity_from_x0(x0b, x_euler, t_next)
            return x + (t_next - t) * 0.5 * (u + u2), state

        x_new, state = jax.lax.cond(t_next > 0, heun, lambda s: (x_euler, s), state)
        return (x_new.astype(x.dtype), state), None

    return step


def diffusion_step(sampler, guided, keys: Array):
    """DDIM or DDPM on the diffusion tables; DDPM's noise is fold_in(key_i, step)."""
    tables = sampler.diffusion_tables()
    t_max = sampler.num_train_steps - 1

    def step(carry, i):
        x, state = carry
        k, abar, abar_prev = tables["k"][i], tables["abar"][i], tables["abar_prev"][i]
        a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        point = Point(k.astype(jnp.float32) / max(t_max, 1), a, s, k)
        x0, var, state = guided(x, point, state, i, i)
        eps = P.eps_from_x0(x0, x, a, s)
        if sampler.clip_x0 is not None:  # x0 only: DDIM keeps the unclipped noise estimate
            x0 = jnp.clip(x0, -sampler.clip_x0, sampler.clip_x0)
        beta = 1.0 - abar / abar_prev
        post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
        noise = jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, i), x.shape[1:]))(
            keys
        ).astype(jnp.float32)
        if sampler.solver == "ddim":
            sigma2 = jnp.square(sampler.eta) * post_var
            x_new = (
                jnp.sqrt(abar_prev) * x0
                + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma2, 0.0)) * eps
                + jnp.sqrt(sigma2) * noise
            )
        else:
            mean = (jnp.sqrt(abar_prev) * beta / (1.0 - abar)) * x0 + (
                jnp.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)
            ) * x
            # A step into the final abar = 1 has zero posterior variance: floored (as
            # diffusers does) for the log; it adds noise only where a grid has k > 0 there.
            small = jnp.maximum(post_var, 1e-20)
            if var is not None and not sampler.fixed_variance:
                frac = (var.astype(jnp.float32) + 1.0) / 2.0
                log_var = frac * jnp.log(beta) + (1.0 - frac) * jnp.log(small)
                std = jnp.exp(0.5 * log_var)
            else:
                std = jnp.sqrt(small)
            x_new = mean + jnp.where(tables["noisy"][i], std, 0.0) * noise
        return (x_new.astype(x.dtype), state), None

    return step


def multistep_points(sampler) -> tuple[Any, Any]:
    """(the (steps + 1,) ``multistep.levels`` the solver steps on, a function from the step
    i to its ``Point``). Flow: the grid's noise levels, the model's time from
    ``model_times`` or the ``time`` mapping. Diffusion: the scheduler's sigma
    sqrt((1 - abar) / abar) at the grid's steps and the final abar, the model's time k."""
    if sampler.is_flow:
        grid = flow_grid(sampler)
        lv = M.levels(grid, flow=True)

        def point(i):
            native = None if sampler.model_times is None else sampler.model_times[i]
            return flow_point(sampler, grid[i], native)

        return lv, point
    tables = sampler.diffusion_tables()
    abar = jnp.concatenate([tables["abar"], tables["abar_prev"][-1:]])
    lv = M.levels(jnp.sqrt((1.0 - abar) / abar), flow=False)
    t_max = max(sampler.num_train_steps - 1, 1)

    def point(i):
        k = tables["k"][i]
        return Point(k.astype(jnp.float32) / t_max, lv[0][i], lv[1][i], k)

    return lv, point


def multistep_step(sampler, guided):
    """UniPC or DPM-Solver++(2M); the carry's state is (guider state, cache, History)."""
    lv, point = multistep_points(sampler)
    kw = dict(
        steps=sampler.steps,
        order=sampler.order,
        lower_order_final=sampler.lower_order_final,
        solver_type=sampler.solver_type,
    )
    if sampler.solver == "unipc":
        update = lambda *a: M.unipc_step(*a, **kw, disable_corrector=sampler.disable_corrector)  # noqa: E731
    else:
        update = lambda *a: M.dpmpp_2m_step(*a, **kw)  # noqa: E731

    def step(carry, i):
        x, state = carry
        if len(state) != 3:
            raise ValueError(
                f"solver {sampler.solver!r} carries its history: start from "
                "initial_carry(guider, x, denoiser, sampler)"
            )
        *state, hist = state
        # flow: the step's key index as Euler's (2 i), so CADS draws the same noise
        x0, _, state = guided(x, point(i), tuple(state), 2 * i if sampler.is_flow else i, i)
        x_new, hist = update(x, x0.astype(jnp.float32), hist, i, lv)
        return (x_new.astype(x.dtype), (*state, hist)), None

    return step
