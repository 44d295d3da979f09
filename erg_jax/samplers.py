"""Samplers: a time grid and a solver under one lax.scan, branches in one vmap per step.

Flow matching (x_t = (1 - t) x0 + t eps): Euler and Heun (Karras et al. 2022, Alg. 1,
the last step Euler), on the SD3-shifted grid. Diffusion (DDPM-trained): DDIM with eta
(Song et al. 2021, eq. 12) and DDPM ancestral sampling (Ho et al. 2020) with the fixed
posterior variance or the learned one of DiT (Nichol & Dhariwal 2021, eq. 15). A given
``grid`` replaces our even grids with a reference scheduler's (``erg_jax.grids``).

One step: the guider names the branches -> ``vmap(denoiser)`` over them -> every output
to an x0 estimate -> ``guider.combine`` -> the solver's update (a staged branch, SAG's:
a second forward on an input the guider builds from the first; EMAG's weak branch: a
forward alone on the guider's carried state). Randomness comes only
from the per-sample keys (DDPM noise: fold_in(key_i, step)), so a sample does not depend
on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from erg_jax import emag as EMAG
from erg_jax import predictions as P
from erg_jax.branches import map_branches
from erg_jax.guidance.guider import Guider, check_denoisers, check_layers
from erg_jax.targets import resolve_targets

Array = jax.Array
Denoiser = Callable[..., Array]
FLOW_SOLVERS = ("euler", "heun")
DIFFUSION_SOLVERS = ("ddim", "ddpm")
TIMES = ("unit", "sd3", "sit", "ddpm")


@struct.dataclass
class Sampler:
    """How to integrate: solver, grid and the model's parameterisation.

    Static (they shape the program): solver, steps, prediction, learned_sigma, time, the
    diffusion schedule (beta_schedule .. fixed_variance). Traced: shift (even flow grid),
    eta (DDIM), grid.

    Attributes:
      solver: "euler" or "heun" (flow), "ddim" or "ddpm" (diffusion).
      steps: number of solver steps.
      prediction: what the model outputs: "velocity" (flow), "eps", "v" or "x0".
      learned_sigma: the output has 2C channels, the last C DiT's variance interpolation.
      time: the model's native timestep: "unit" (t), "sd3" (1000 t), "sit" (1 - t, SiT's
        data-at-1 convention, whose velocity is negated), "ddpm" (the integer step).
      beta_schedule: "linear" (scaled by 1000 / num_train_steps), "scaled_linear", "cosine".
      beta_start, beta_end: the linear schedules' end points.
      alpha_to_one: the abar after the last step is 1; False: abar_0 (DDIM's
        set_alpha_to_one=False).
      float32_betas: betas and alphas rounded to float32 before their product (diffusers).
      fixed_variance: DDPM uses the fixed small variance even when the model outputs its
        own (learned_sigma), as diffusers' DiT pipeline with variance_type fixed_small.
      clip_x0: diffusion only: the guided x0 estimate is clipped to [-clip_x0, clip_x0]
        before the update, its noise estimate left as it was (diffusers' clip_sample /
        clip_sample_range without use_clipped_model_output); None: never.
      grid: None (our grids), or a reference scheduler's. Flow: (steps + 1,) float32 noise
        levels t_0 > ... > t_steps. Diffusion: (2, steps) int32, row 0 the model's steps
        k_i, row 1 the step whose abar is "prev" for step i (-1: the final abar); noise
        (DDPM) wherever k_i > 0. Guiders see t (flow) or k / (T - 1) (diffusion).
    """

    solver: str = struct.field(pytree_node=False, default="euler")
    steps: int = struct.field(pytree_node=False, default=28)
    prediction: str = struct.field(pytree_node=False, default="velocity")
    learned_sigma: bool = struct.field(pytree_node=False, default=False)
    time: str = struct.field(pytree_node=False, default="unit")
    beta_schedule: str = struct.field(pytree_node=False, default="linear")
    num_train_steps: int = struct.field(pytree_node=False, default=1000)
    shift: Any = 1.0
    eta: Any = 0.0
    beta_start: float = struct.field(pytree_node=False, default=1e-4)
    beta_end: float = struct.field(pytree_node=False, default=0.02)
    alpha_to_one: bool = struct.field(pytree_node=False, default=True)
    float32_betas: bool = struct.field(pytree_node=False, default=False)
    fixed_variance: bool = struct.field(pytree_node=False, default=False)
    clip_x0: float | None = struct.field(pytree_node=False, default=None)
    grid: Any = None

    @property
    def is_flow(self) -> bool:
        return self.solver in FLOW_SOLVERS

    def diffusion_tables(self) -> dict:
        """Per step: the model's k, abar at k, abar at the step's "prev" (diffusion)."""
        return P.diffusion_tables(
            self.beta_schedule,
            self.steps,
            self.num_train_steps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            float32_betas=self.float32_betas,
            alpha_to_one=self.alpha_to_one,
            grid=self.grid,
        )

    @property
    def nfe_per_step(self) -> int:
        return 2 if self.solver == "heun" else 1


def make_sampler(solver: str = "euler", steps: int = 28, **kw) -> Sampler:
    """A checked Sampler; every error names the field and its allowed values."""
    if solver not in FLOW_SOLVERS + DIFFUSION_SOLVERS:
        raise ValueError(
            f"solver must be one of {FLOW_SOLVERS + DIFFUSION_SOLVERS}, got {solver!r}"
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    flow = solver in FLOW_SOLVERS
    s = Sampler(
        solver,
        steps,
        **{"prediction": "velocity" if flow else "eps", "time": "unit" if flow else "ddpm", **kw},
    )
    if s.prediction not in P.PREDICTIONS:
        raise ValueError(f"prediction must be one of {P.PREDICTIONS}, got {s.prediction!r}")
    if s.time not in TIMES:
        raise ValueError(f"time must be one of {TIMES}, got {s.time!r}")
    if flow and (s.time == "ddpm" or s.prediction in ("eps", "v")):
        raise ValueError(
            f"solver {solver!r} is a flow solver: prediction must be 'velocity' "
            f"or 'x0' and time one of unit/sd3/sit, got {s.prediction}/{s.time}"
        )
    if not flow:
        if s.time != "ddpm" or s.prediction == "velocity":
            raise ValueError(
                f"solver {solver!r} is a diffusion solver: time must be 'ddpm' and "
                f"prediction eps/v/x0, got {s.prediction}/{s.time}"
            )
        P.beta_schedule(s.beta_schedule, s.num_train_steps)
        if s.clip_x0 is not None and not float(s.clip_x0) > 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {s.clip_x0!r}")
        if steps > s.num_train_steps:
            raise ValueError(f"steps must be in [1, {s.num_train_steps}], got {steps}")
        if not 0.0 < s.beta_start <= s.beta_end < 1.0:
            raise ValueError(
                f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                f"got {s.beta_start!r}, {s.beta_end!r}"
            )
    if float(jnp.asarray(s.shift)) <= 0:
        raise ValueError(f"shift must be > 0, got {s.shift!r}")
    if not 0.0 <= float(jnp.asarray(s.eta)) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {s.eta!r}")
    if s.grid is not None:
        s = s.replace(grid=_checked_grid(s))
    return s


def _checked_grid(s: Sampler) -> Array:
    """The grid as the solver reads it; a ValueError names what is wrong with it."""
    g = np.asarray(s.grid)
    if s.is_flow:
        if g.shape != (s.steps + 1,):
            raise ValueError(f"grid must have shape (steps + 1,) = ({s.steps + 1},), got {g.shape}")
        if not (np.all(np.isfinite(g)) and g.min() >= 0.0 and g.max() <= 1.0):
            raise ValueError(f"grid noise levels must lie in [0, 1], got {g}")
        if not np.all(np.diff(g) < 0):
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
    return jnp.asarray(g, jnp.int32)


@struct.dataclass
class _Point:
    """Where a step evaluates the model. Legend: t noise level in [0, 1] (guiders' clock);
    a, s the signal and noise coefficients of x_t; native the model's timestep; k the
    diffusion step's index into the tables (flow: unused)."""

    t: Array
    a: Array
    s: Array
    native: Array


def _flow_point(sampler: Sampler, t) -> _Point:
    native = {"unit": t, "sd3": 1000.0 * t, "sit": 1.0 - t}[sampler.time]
    return _Point(t, 1.0 - t, t, native)


def evaluate(
    denoisers: Sequence[Denoiser],
    x,
    point: _Point,
    guider: Guider,
    conds,
    sampler: Sampler,
    keys,
    step,
    num_layers: int,
    progress=None,
    state=None,
):
    """x0 estimates of every branch (strong first) and the strong branch's variance
    channels (DiT's learned sigma; None otherwise); given the guider's state, also the
    new state (EMAG's weak branches run alone on it, after the others: ``erg_jax.emag``).

    Branches of one model run together (``map_branches``); when they also share their
    condition and the denoiser offers ``branched(x, t, cond, controls)`` (DiT, MMDiT), it
    runs everything before the first perturbed layer once (``models.shared_prefix``).
    A staged branch (``guider.staged``, SAG's weak one) needs the strong output: the
    strong branch runs first, alone (``guider.strong_pass``), then the rest, then the
    staged ones on the inputs the guider builds from it (``guider.staged_inputs``)."""
    b = x.shape[0]
    native = jnp.broadcast_to(point.native, (b,))
    branch_conds = guider.conditions(conds, point.t, keys, step)
    controls = guider.controls(point.t, num_layers, progress)
    slots = _slots(guider, conds)
    raw = [None] * guider.num_branches
    staged, alone = guider.staged, EMAG.stateful(guider)
    if alone and state is None:
        raise ValueError(f"{guider.name}: emag's weak branch needs the guider's state")
    if staged:
        args = (native, branch_conds[0], controls[0], num_layers)
        raw[0], found = guider.strong_pass(denoisers[0], x, *args)
    for m in sorted(set(guider.models)):
        idx = [i for i, mi in enumerate(guider.models) if mi == m and i not in staged + alone]
        idx = [i for i in idx if raw[i] is None]
        if not idx:
            continue
        den = denoisers[m]
        if guider.nag is not None and idx[0] == 0 and len(idx) > 1:
            # NAG's strong forward has its own negative stream: it runs apart
            raw[0] = den(x, native, branch_conds[0], controls[0])
            idx = idx[1:]
        if len(idx) == 1:
            raw[idx[0]] = den(x, native, branch_conds[idx[0]], controls[idx[0]])
            continue
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        ctl = controls[idx[0]]
        if ctl is not None:
            ctl = jax.tree_util.tree_map(stack, *[controls[i] for i in idx])
        if hasattr(den, "branched") and len({slots[i] for i in idx}) == 1:
            # One condition for all: the model runs its shared prefix once.
            out = den.branched(x, native, branch_conds[idx[0]], ctl)
            out = jnp.broadcast_to(out, (len(idx),) + out.shape[1:])
        else:
            cs = jax.tree_util.tree_map(stack, *[branch_conds[i] for i in idx])
            out = map_branches(lambda c, a, den=den: den(x, native, c, a), cs, ctl)
        for j, i in enumerate(idx):
            raw[i] = out[j]
    if alone:
        args = (guider, denoisers, x, native, branch_conds, controls, raw, state, point.t)
        raw, state = EMAG.weak_passes(*args, num_layers)
    if staged:
        (x0,), _ = _to_x0(raw[:1], x, point, sampler)
        inputs = guider.staged_inputs(x, x0, found, point.a)
        for i, x_i in zip(staged, inputs, strict=True):
            # read at x_t, not x_i: the guided x0 is the reference's sum of raw outputs
            raw[i] = denoisers[guider.models[i]](x_i, native, branch_conds[i], controls[i])
    x0s, var = _to_x0(raw, x, point, sampler)
    return (x0s, var) if state is None else (x0s, var, state)


def _to_x0(raw: list, x, point: _Point, sampler: Sampler):
    """The x0 estimates of raw outputs, and the first one's variance channels."""
    c = x.shape[-1]
    var = raw[0][..., c:] if sampler.learned_sigma else None
    sign = -1.0 if sampler.time == "sit" else 1.0
    x0s = [
        P.to_x0(sign * r[..., :c].astype(jnp.float32), x, point.a, point.s, sampler.prediction)
        for r in raw
    ]
    return x0s, var


def evaluate_cached(
    dens, x, point, guider, conds, sampler, keys, step, num_layers, cache, progress=None
):
    """``evaluate`` under the guider's weak-branch cache (``guidance.cache``).

    cache = (the weak branches' last x0 differences to the strong one, the count of
    evaluations inside the window so far). A refreshing evaluation runs every branch and
    stores the differences; the others run the strong branch alone and rebuild the weak
    x0 estimates as strong - difference. Returns (x0s, var, new cache).
    """
    diffs, count = cache
    c = guider.cache
    every = jnp.maximum(jnp.asarray(c.every).astype(jnp.int32), 1)
    inside = (point.t >= c.t_min) & (point.t <= c.t_max)
    refresh = jnp.logical_not(inside) | (count % every == 0)

    def full(diffs):
        args = (dens, x, point, guider, conds, sampler, keys, step, num_layers)
        x0s, var = evaluate(*args, progress)
        return x0s, var, tuple(x0s[0] - w for w in x0s[1:])

    def strong_only(diffs):
        native = jnp.broadcast_to(point.native, (x.shape[0],))
        cond = guider.conditions(conds, point.t, keys, step)[0]
        raw = dens[0](x, native, cond, guider.controls(point.t, num_layers, progress)[0])
        (x0,), var = _to_x0([raw], x, point, sampler)
        return [x0] + [x0 - d for d in diffs], var, diffs

    x0s, var, diffs = jax.lax.cond(refresh, full, strong_only, diffs)
    return x0s, var, (diffs, jnp.where(inside, count + 1, 0))


def initial_carry(guider: Guider, x: Array, denoiser=None) -> tuple:
    """The carry ``make_step`` starts from at x: (x, (guider state, weak-branch cache)).
    EMAG's state needs the denoiser (the shape of its image queries)."""
    queries = EMAG.query_shape(guider, denoiser, x)
    state = guider.init_state(x.astype(jnp.float32), queries)
    if guider.cache is None:
        return x, (state, None)
    diffs = tuple(jnp.zeros(x.shape, jnp.float32) for _ in guider.terms)
    return x, (state, (diffs, jnp.zeros((), jnp.int32)))


def _slots(guider: Guider, conds) -> list[str]:
    """The condition slot of every branch (strong first); CADS anneals equal slots
    equally, so branches with one slot have one condition."""
    out = ["cond"]
    for term in guider.terms:
        auto = "tempered" if "tempered" in conds else "cond"
        out.append(auto if term.condition == "auto" else term.condition)
    return out


def _denoisers(denoiser) -> tuple:
    return tuple(denoiser) if isinstance(denoiser, list | tuple) else (denoiser,)


def make_step(
    denoiser: Denoiser | Sequence[Denoiser],
    conds: Mapping[str, Any],
    guider: Guider,
    sampler: Sampler,
    keys: Array,
    num_layers: int,
):
    """The solver step ``(carry, i) -> (carry, None)``; carry = (x, (guider state,
    weak-branch cache)), from ``initial_carry``."""
    dens = _denoisers(denoiser)
    layout = getattr(dens[0], "layout", None)  # a denoiser that names its blocks
    if layout is not None:
        guider = resolve_targets(guider, layout)
    check_layers(guider, num_layers)
    check_denoisers(guider, dens)
    if max(guider.models) >= len(dens):
        raise ValueError(
            f"guider {guider.name!r} needs {max(guider.models) + 1} denoisers "
            f"(AutoGuidance takes (model, weak_model)), got {len(dens)}"
        )

    def guided(x, point, state, step, index, done=None):
        # done: the steps finished before this evaluation (Heun's corrector: index + 1)
        state, cache = state
        progress = (index if done is None else done) / sampler.steps
        args = (dens, x, point, guider, conds, sampler, keys, step, num_layers)
        if cache is None:
            x0s, var, state = evaluate(*args, progress, state)
        else:
            x0s, var, cache = evaluate_cached(*args, cache, progress)
        x0, state = guider.combine(x0s, point.t, state, x=x, a=point.a, s=point.s, index=index)
        return x0, var, (state, cache)

    if sampler.is_flow:
        grid = (
            sampler.grid if sampler.grid is not None else P.flow_grid(sampler.steps, sampler.shift)
        )

        def step(carry, i):
            x, state = carry
            t, t_next = grid[i], grid[i + 1]
            x0, _, state = guided(x, _flow_point(sampler, t), state, 2 * i, i)
            u = P.velocity_from_x0(x0, x, t)
            x_euler = x + (t_next - t) * u
            if sampler.solver == "euler":
                return (x_euler.astype(x.dtype), state), None

            def heun(state):
                x0b, _, state = guided(
                    x_euler, _flow_point(sampler, t_next), state, 2 * i + 1, i, i + 1
                )
                u2 = P.velocity_from_x0(x0b, x_euler, t_next)
                return x + (t_next - t) * 0.5 * (u + u2), state

            x_new, state = jax.lax.cond(t_next > 0, heun, lambda s: (x_euler, s), state)
            return (x_new.astype(x.dtype), state), None

        return step

    tables = sampler.diffusion_tables()
    t_max = sampler.num_train_steps - 1

    def step(carry, i):
        x, state = carry
        k, abar, abar_prev = tables["k"][i], tables["abar"][i], tables["abar_prev"][i]
        a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        point = _Point(k.astype(jnp.float32) / max(t_max, 1), a, s, k)
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


def sample(
    denoiser: Denoiser | Sequence[Denoiser],
    noise: Array,
    conds: Mapping[str, Any],
    guider: Guider,
    sampler: Sampler,
    *,
    keys: Array,
    num_layers: int,
) -> Array:
    """Draws x0 from x_T = noise with guidance, one lax.scan over the steps.

    Args:
      denoiser: ``(x, t_native, cond, attention) -> raw output`` (NHWC), or a tuple
        (model, weak_model) for AutoGuidance.
      noise: (b, H, W, C) the starting noise x_T.
      conds: condition slots: "cond" (required), "null" (CFG/APG), "tempered" (C-ERG);
        each a pytree with leading axis b.
      guider: from erg_jax.guidance.
      sampler: from ``make_sampler``.
      keys: (b,) per-sample PRNG keys (DDPM and CADS noise).
      num_layers: attention layers of the denoiser (length of its AttentionControl).

    Returns:
      (b, H, W, C) samples x0, dtype of noise.
    """
    step = make_step(denoiser, conds, guider, sampler, keys, num_layers)
    carry = initial_carry(guider, noise, denoiser)
    (x, _), _ = jax.lax.scan(step, carry, jnp.arange(sampler.steps))
    return x


def sample_keys(seed: int, indices: Array) -> Array:
    """Per-sample keys fold_in(key(seed), i) for the global sample indices (b,)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def initial_noise(keys: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """x_T for each sample key: (b,) + shape standard normal, independent of the batch."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0x7FFFFFFF), shape, dtype))(
        keys
    )
