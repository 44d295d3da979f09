"""Weak-branch caching (guidance.cache): exact at every=1, the forwards its window
implies, the reused difference as a hand-written loop computes it, one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import make_toy_transformer

from erg_jax import Energy
from erg_jax import guidance as G
from erg_jax import samplers as S

L, SIZE, C, W, B, STEPS = 3, 4, 2, 16, 2, 10


def _setup():
    den, _ = make_toy_transformer(L, SIZE, C, W, seed=0)
    keys = S.sample_keys(0, jnp.arange(B))
    noise = S.initial_noise(keys, (SIZE, SIZE, C))
    cond = jax.random.normal(jax.random.key(1), (B, W))
    conds = {"cond": cond, "null": jnp.zeros_like(cond), "tempered": 0.5 * cond}
    return den, keys, noise, conds


def _sample(den, guider, sampler, keys, noise, conds):
    return S.sample(den, noise, conds, guider, sampler, keys=keys, num_layers=L)


@pytest.mark.parametrize(
    "make",
    [
        lambda: G.cfg(3.0),
        lambda: G.erg(3.0, energy=Energy(0.3), layers=[1, 2], kappa=0.2),
        lambda: G.with_apg(G.cfg(2.5), momentum=-0.5),
    ],
)
@pytest.mark.parametrize("solver", ["euler", "ddim"])
def test_every_one_is_the_uncached_sampler(make, solver):
    den, keys, noise, conds = _setup()
    sampler = S.make_sampler(solver, 6)
    plain = _sample(den, make(), sampler, keys, noise, conds)
    cached = _sample(den, G.cache(make(), every=1, window=(0.0, 1.0)), sampler, keys, noise, conds)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(plain))


def _counting(den):
    """The toy denoiser that counts its calls on the null condition (CFG's weak branch)
    and on any other condition, at run time."""
    counts = {"weak": 0, "strong": 0}

    def record(is_null):
        counts["weak" if bool(is_null) else "strong"] += 1

    def counted(x, t, cond, attention=None):
        jax.debug.callback(record, jnp.all(cond == 0.0), ordered=True)
        return den(x, t, cond, attention)

    return counted, counts


# windows whose ends lie between grid points: float32 rounding decides at a grid point
@pytest.mark.parametrize("every, window", [(2, (0.25, 0.75)), (3, (0.15, 0.75)), (2, (0.0, 1.0))])
def test_weak_forwards_are_what_the_window_implies(every, window):
    den, keys, noise, conds = _setup()
    counted, counts = _counting(den)
    sampler = S.make_sampler("euler", STEPS)
    guider = G.cache(G.cfg(3.0), every=every, window=window)
    jax.block_until_ready(_sample(counted, guider, sampler, keys, noise, conds))
    # the even grid t_i = 1 - i / STEPS; inside the window the weak branch runs at the
    # first evaluation and every `every`-th after it, outside at every step
    ts = 1.0 - np.arange(STEPS) / STEPS
    inside = (ts >= window[0]) & (ts <= window[1])
    expected = int(np.sum(~inside)) + -(-int(np.sum(inside)) // every)
    assert counts == {"weak": expected, "strong": STEPS}


def test_skipped_steps_reuse_the_last_difference_as_a_plain_loop_does():
    den, keys, noise, conds = _setup()
    every, window, w, steps = 2, (0.3, 0.85), 3.0, 8
    sampler = S.make_sampler("euler", steps)
    guider = G.cache(G.cfg(w), every=every, window=window)
    got = _sample(den, guider, sampler, keys, noise, conds)
    # the reference: Euler on the even flow grid, x0 = x - t v, written out here
    ts = np.linspace(1.0, 0.0, steps + 1)
    x = np.asarray(noise, np.float64)
    diff, count = None, 0

    def x0_of(x, t, cond):
        v = np.asarray(den(jnp.asarray(x, jnp.float32), jnp.full((B,), t), cond), np.float64)
        return x - t * v

    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        strong = x0_of(x, t, conds["cond"])
        inside = window[0] <= t <= window[1]
        if not inside or count % every == 0:
            diff = strong - x0_of(x, t, conds["null"])
        count = count + 1 if inside else 0
        x0 = strong + (w - 1.0) * diff
        x = x + (t_next - t) * (x - x0) / t
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)
    uncached = _sample(den, G.cfg(w), sampler, keys, noise, conds)
    assert np.max(np.abs(np.asarray(got) - np.asarray(uncached))) > 1e-3  # reuse matters


def test_heun_counts_both_evaluations_of_a_step():
    den, keys, noise, conds = _setup()
    counted, counts = _counting(den)
    sampler = S.make_sampler("heun", 4)
    guider = G.cache(G.cfg(3.0), every=2, window=(0.0, 1.0))
    jax.block_until_ready(_sample(counted, guider, sampler, keys, noise, conds))
    # 4 steps: 3 with two evaluations (the last step is Euler) = 7, weak at 1st, 3rd, ...
    assert counts == {"weak": 4, "strong": 7}


def test_a_sweep_over_every_and_the_window_compiles_once():
    den, keys, noise, conds = _setup()
    sampler = S.make_sampler("euler", 6)
    traces = []

    @jax.jit
    def run(guider):
        traces.append(1)
        return _sample(den, guider, sampler, keys, noise, conds)

    base = G.erg(3.0, energy=Energy(0.3))
    outs = [
        run(G.cache(base, every=np.float32(k), window=(np.float32(lo), np.float32(0.9))))
        for k, lo in [(1, 0.0), (2, 0.0), (3, 0.0), (2, 0.5)]
    ]
    assert len(traces) == 1
    assert len({float(jnp.sum(o)) for o in outs}) == 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"every": 0}, "cache every"),
        ({"every": 1.5}, "whole number"),
        ({"window": (0.8, 0.2)}, r"window\[0\] <= window\[1\]"),
        ({"window": (-0.1, 1.0)}, r"window\[0\]"),
        ({"window": (0.0, 1.2)}, r"window\[1\]"),
    ],
)
def test_bad_cache_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        G.cache(G.cfg(3.0), **kwargs)
    with pytest.raises(ValueError, match="compose guiders first"):
        G.compose(G.cache(G.cfg(2.0)), G.pag(2.0))
