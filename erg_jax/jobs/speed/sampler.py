"""The sampler as a program: one scan against a loop, compile time, compiles per sweep.

- ``scan_vs_loop``: ``samplers.sample`` (one jitted ``lax.scan`` over the steps) against a
  Python loop calling the same jitted, donated step once per step.
- ``compile_times``: lowering plus compiling a whole CFG sampler at 25 and 250 steps; the
  scan body is compiled once, so the step count should not matter.
- ``sweep_compiles``: one jitted sampling function called with 8 guidance settings
  (weights, temperatures, kickoffs and layer masks are traced data): its compile count.
"""

from __future__ import annotations

import dataclasses
import statistics

import jax
import jax.numpy as jnp

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.jobs.speed import setups
from erg_jax.jobs.speed.timing import interleaved_medians, timed


def _sample_fn(setup: setups.Setup, sampler: S.Sampler):
    keys, _ = setup.noise()

    def run(noise, guider):
        return S.sample(
            setup.den, noise, setup.conds, guider, sampler, keys=keys, num_layers=setup.num_layers
        )

    return run


def scan_vs_loop(setup: setups.Setup, steps: int = 8, repeats: int = 3) -> dict:
    """Seconds of a whole CFG sampling run: one scan against a loop of the jitted step."""
    sampler = S.make_sampler(setup.sampler.solver, steps, **_sampler_fields(setup.sampler))
    setup = dataclasses.replace(setup, sampler=sampler)
    guider = setups.guiders(setup.num_layers)["cfg"]
    _, noise = setup.noise()
    scan = jax.jit(_sample_fn(setup, sampler))
    step, carry = setups.jitted_step(setup, guider)

    def loop():
        c = jax.tree_util.tree_map(jnp.copy, carry)
        for i in range(steps):
            c = step(c, jnp.int32(i))
        return c[0]

    secs = interleaved_medians({"scan": lambda: scan(noise, guider), "loop": loop}, repeats)
    same = float(jnp.max(jnp.abs(scan(noise, guider) - loop())))
    return {
        "model": setup.name,
        "batch": setup.batch,
        "steps": steps,
        "scan_s": secs["scan"],
        "loop_s": secs["loop"],
        "scan_over_loop": secs["scan"] / secs["loop"],
        "max_abs_difference": same,
    }


def _sampler_fields(s: S.Sampler) -> dict:
    return dict(
        prediction=s.prediction,
        learned_sigma=s.learned_sigma,
        time=s.time,
        shift=s.shift,
        eta=s.eta,
    )


def compile_times(setup: setups.Setup, steps=(25, 250), rounds: int = 2) -> dict:
    """Median seconds to lower and compile a CFG sampler of each step count (interleaved)."""
    guider = setups.guiders(setup.num_layers)["cfg"]
    _, noise = setup.noise()
    times = {n: [] for n in steps}
    for _ in range(rounds):
        for n in steps:
            sampler = S.make_sampler(setup.sampler.solver, n, **_sampler_fields(setup.sampler))
            fn = _sample_fn(setup, sampler)  # a new function: nothing is cached
            times[n].append(timed(lambda fn=fn: jax.jit(fn).lower(noise, guider).compile()))
    med = {n: statistics.median(ts) for n, ts in times.items()}
    lo, hi = min(steps), max(steps)
    return {
        "model": setup.name,
        **{f"compile_s_{n}_steps": med[n] for n in steps},
        "ratio": med[hi] / med[lo],
    }


def sweep_guiders(num_layers: int) -> list[G.Guider]:
    """8 ERG settings that differ only in traced numbers (scale, tau, kappa, layers)."""
    out = []
    for i in range(8):
        mask = jnp.arange(num_layers) >= (i % num_layers)
        erg = dict(tau=0.3 + 0.1 * i, layers=mask, kappa=0.1 * (i % 4), condition="cond")
        out.append(G.make_guider("erg", scale=2.0 + 0.5 * i, erg=erg))
    return out


def sweep_compiles(setup: setups.Setup, steps: int = 2) -> dict:
    """Compiles of one jitted sampler over a sweep of 8 guidance settings."""
    sampler = S.make_sampler(setup.sampler.solver, steps, **_sampler_fields(setup.sampler))
    run = jax.jit(_sample_fn(setup, sampler))
    _, noise = setup.noise()
    sweep = sweep_guiders(setup.num_layers)
    for g in sweep:
        jax.block_until_ready(run(noise, g))
    return {"settings": len(sweep), "compiles": int(run._cache_size())}
