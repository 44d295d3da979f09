"""Samplers: a time grid and a solver under one lax.scan, branches in one vmap per step.

Solvers (``erg_jax.solvers``): Euler and Heun for flow matching, on the SD3-shifted
grid; DDIM and DDPM for DDPM-trained diffusion; UniPC and DPM-Solver++(2M) for either,
their multistep history in the scan carry (``erg_jax.multistep``). A given ``grid``
replaces our even grids with a reference scheduler's (``erg_jax.grids``).

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
from erg_jax import multistep as M
from erg_jax import predictions as P
from erg_jax import solvers as SV
from erg_jax.branches import map_branches
from erg_jax.guidance.guider import Guider, check_denoisers, check_layers
from erg_jax.targets import resolve_targets

Array = jax.Array
Denoiser = Callable[..., Array]
FLOW_SOLVERS = ("euler", "heun")
DIFFUSION_SOLVERS = ("ddim", "ddpm")
MULTISTEP_SOLVERS = M.SOLVERS  # flow or diffusion, by ``time``
SOLVERS = FLOW_SOLVERS + DIFFUSION_SOLVERS + MULTISTEP_SOLVERS
TIMES = ("unit", "sd3", "sit", "ddpm")
_Point = SV.Point  # the name the tests and notebooks know


@struct.dataclass
class Sampler:
    """How to integrate: solver, grid and the model's parameterisation.

    Static (they shape the program): solver, steps, prediction, learned_sigma, time, the
    diffusion schedule (beta_schedule .. fixed_variance), the multistep settings (order ..
    disable_corrector). Traced: shift (even flow grid), eta (DDIM), grid, model_times.

    Attributes:
      solver: "euler" or "heun" (flow), "ddim" or "ddpm" (diffusion), "unipc" or
        "dpmpp_2m" (either: diffusion where time is "ddpm", else flow).
      steps: number of solver steps.
      prediction: what the model outputs: "velocity" (flow), "eps", "v" or "x0".
      learned_sigma: the output has 2C channels, the last C DiT's variance interpolation.
      time: the model's native timestep: "unit" (t), "sd3" (1000 t), "sit" (1 - t, SiT's
        data-at-1 convention, whose velocity is negated), "ddpm" (the integer step).
      beta_schedule: "linear" (scaled by 1000 / num_train_steps), "scaled_linear", "cosine".
      beta_start, beta_end: the linear schedules' end points.
      alpha_to_one: the abar after the last step is 1; False: abar_0 (DDIM's
        set_alpha_to_one=False; a multistep solver's final_sigmas_type "sigma_min").
      float32_betas: betas and alphas rounded to float32 before their product (diffusers).
      fixed_variance: DDPM uses the fixed small variance even when the model outputs its
        own (learned_sigma), as diffusers' DiT pipeline with variance_type fixed_small.
      clip_x0: DDIM / DDPM only: the guided x0 estimate is clipped to [-clip_x0, clip_x0]
        before the update, its noise estimate left as it was (diffusers' clip_sample /
        clip_sample_range without use_clipped_model_output); None: never.
      grid: None (our grids), or a reference scheduler's. Flow: (steps + 1,) float32 noise
        levels t_0 > ... > t_steps (a multistep run may repeat the last). Diffusion: (2,
        steps) int32, row 0 the model's steps k_i, row 1 the step whose abar is "prev" for
        step i (-1: the final abar; multistep: row 0's next step); noise (DDPM) wherever
        k_i > 0. Guiders see t (flow) or k / (T - 1) (diffusion).
      order: multistep: the highest order, 1 or 2 (diffusers' solver_order).
      lower_order_final: multistep: UniPC takes order min(order, steps - i) at step i;
        DPM-Solver++ ends with a first-order step when the run has fewer than 15 steps
        (always when it ends on sigma 0).
      solver_type: UniPC "bh2" (B(h) = e^h - 1) or "bh1" (B(h) = h); DPM-Solver++
        "midpoint" or "heun"; "" = the first of these.
      disable_corrector: UniPC: the steps whose result UniC leaves uncorrected.
      model_times: flow, one model evaluation per step (euler, unipc, dpmpp_2m): None, or
        (steps,) the model's timestep at each step in its own units (``time``), where a
        scheduler hands the model other than ``time`` of the grid (UniPC / DPM-Solver++
        on flow sigmas: the integer int(T t)); guiders still see the grid's t.
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
    order: int = struct.field(pytree_node=False, default=2)
    lower_order_final: bool = struct.field(pytree_node=False, default=True)
    solver_type: str = struct.field(pytree_node=False, default="")
    disable_corrector: tuple[int, ...] = struct.field(pytree_node=False, default=())
    model_times: Any = None

    @property
    def is_flow(self) -> bool:
        return self.solver in FLOW_SOLVERS or (
            self.solver in MULTISTEP_SOLVERS and self.time != "ddpm"
        )

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
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    multistep = solver in MULTISTEP_SOLVERS
    if multistep:
        default_time = "ddpm" if kw.get("prediction") in ("eps", "v") else "unit"
        flow = kw.get("time", default_time) != "ddpm"
    else:
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
        if steps > s.num_train_steps:
            raise ValueError(f"steps must be in [1, {s.num_train_steps}], got {steps}")
        if not 0.0 < s.beta_start <= s.beta_end < 1.0:
            raise ValueError(
                f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                f"got {s.beta_start!r}, {s.beta_end!r}"
            )
    if s.clip_x0 is not None and (flow or multistep or not float(s.clip_x0) > 0):
        raise ValueError(f"clip_x0 must be > 0 or None, and None unless ddim/ddpm: {s.clip_x0!r}")
    if float(jnp.asarray(s.shift)) <= 0:
        raise ValueError(f"shift must be > 0, got {s.shift!r}")
    if not 0.0 <= float(jnp.asarray(s.eta)) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {s.eta!r}")
    s = _checked_multistep(s)
    if s.grid is not None:
        s = s.replace(grid=SV.check_grid(s))
    if s.solver == "unipc":
        _check_unipc_ends(s)
    if s.model_times is not None:
        m = np.asarray(s.model_times, np.float32)
        if not flow or solver == "heun" or m.shape != (steps,) or not np.all(np.isfinite(m)):
            raise ValueError(
                f"model_times must be None or (steps,) = ({steps},) finite times, for a flow "
                f"solver with one evaluation a step (euler, unipc, dpmpp_2m), got {m.shape} "
                f"for {solver!r}"
            )
        s = s.replace(model_times=jnp.asarray(m))
    return s


def _checked_multistep(s: Sampler) -> Sampler:
    """The multistep fields checked, solver_type resolved, disable_corrector a tuple."""
    types = M.SOLVER_TYPES.get(s.solver, ("",))
    solver_type = s.solver_type or types[0]
    if solver_type not in types:
        raise ValueError(
            f"solver_type for {s.solver!r} must be one of {types}, got {solver_type!r}"
        )
    if s.order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {s.order!r}")
    off = tuple(int(j) for j in s.disable_corrector)
    if off and s.solver != "unipc":
        raise ValueError(f"disable_corrector applies to unipc only, got {off} for {s.solver!r}")
    return s.replace(solver_type=solver_type, disable_corrector=off)


def _check_unipc_ends(s: Sampler) -> None:
    """UniPC settings whose steps meet an infinite lambda (noise level 0, or a flow grid
    starting at 1, which diffusers moves to 1 - 1e-6) and turn the samples inf / NaN."""
    if s.is_flow:
        grid = np.asarray(P.flow_grid(s.steps, s.shift) if s.grid is None else s.grid)
        to_zero, from_one = grid[-1] == 0.0, grid[0] == 1.0
    else:
        to_zero = s.alpha_to_one and (s.grid is None or int(s.grid[1][-1]) == -1)
        from_one = False
    if to_zero and not s.lower_order_final:
        raise ValueError(
            "lower_order_final=False: UniPC's second-order step onto noise level 0 divides "
            "by an infinite step; keep it True or end above 0 (final_sigmas_type sigma_min)"
        )
    if (to_zero or from_one) and s.solver_type == "bh1":
        raise ValueError(
            "solver_type='bh1': UniPC's steps from noise level 1 or onto 0 weigh by B(h) = "
            "-inf; use 'bh2', or a grid inside (0, 1) (final_sigmas_type sigma_min)"
        )


def _flow_point(sampler: Sampler, t) -> SV.Point:
    return SV.flow_point(sampler, t)


def evaluate(
    denoisers: Sequence[Denoiser],
    x,
    point: SV.Point,
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


def _to_x0(raw: list, x, point: SV.Point, sampler: Sampler):
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


def initial_carry(guider: Guider, x: Array, denoiser=None, sampler: Sampler | None = None):
    """The carry ``make_step`` starts from at x: (x, (guider state, weak-branch cache)),
    and a multistep sampler's (UniPC, DPM-Solver++) empty history third in the state.
    EMAG's state needs the denoiser (the shape of its image queries)."""
    queries = EMAG.query_shape(guider, denoiser, x)
    state = guider.init_state(x.astype(jnp.float32), queries)
    cache = None
    if guider.cache is not None:
        diffs = tuple(jnp.zeros(x.shape, jnp.float32) for _ in guider.terms)
        cache = (diffs, jnp.zeros((), jnp.int32))
    if sampler is not None and sampler.solver in MULTISTEP_SOLVERS:
        return x, (state, cache, M.init_history(x))
    return x, (state, cache)


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
    weak-branch cache[, multistep history])), from ``initial_carry``."""
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

    if sampler.solver in MULTISTEP_SOLVERS:
        return SV.multistep_step(sampler, guided)
    if sampler.is_flow:
        return SV.flow_step(sampler, guided)
    return SV.diffusion_step(sampler, guided, keys)


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
    carry = initial_carry(guider, noise, denoiser, sampler)
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
