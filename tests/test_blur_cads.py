"""SEG's query blur and CADS's condition annealing against hand-written numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.control import blur_queries, maybe_blur

HGT, WID = 3, 5  # a non-square grid: a blur along one axis only, or the axes swapped, fails


def _queries(seed=0, b=2, h=2, d=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, HGT * WID, h, d)).astype(np.float32)


def _numpy_blur(q, sigma):
    """A 2-D Gaussian over the row-major token grid, each output token's weights summing
    to 1 over the grid (no padding), applied as one dense (n, n) matrix."""
    rows, cols = np.divmod(np.arange(HGT * WID), WID)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    w = np.exp(-dist2 / (2.0 * sigma**2))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("nm,bmhd->bnhd", w, q.astype(np.float64))


@pytest.mark.parametrize("sigma", [0.7, 1.6])
def test_blur_is_a_normalised_2d_gaussian_over_the_token_grid(sigma):
    q = _queries()
    out = blur_queries(jnp.asarray(q), (HGT, WID), sigma)
    np.testing.assert_allclose(np.asarray(out), _numpy_blur(q, sigma), atol=1e-5)


def test_infinite_blur_is_the_mean_of_all_queries_and_zero_is_none():
    q = _queries(seed=1)
    out = blur_queries(jnp.asarray(q), (HGT, WID), math.inf)
    mean = np.broadcast_to(q.mean(axis=1, keepdims=True), q.shape)
    np.testing.assert_allclose(np.asarray(out), mean, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(blur_queries(jnp.asarray(q), (HGT, WID), 0.0)), q)


def test_seg_controls_blur_only_their_layers():
    q = _queries(seed=2)
    weak = G.seg(2.0, sigma=1.3, layers=[1]).controls(0.5, 3)[1]
    for i in range(3):
        out = np.asarray(maybe_blur(jnp.asarray(q), (HGT, WID), weak.layer(i)))
        ref = _numpy_blur(q, 1.3) if i == 1 else q
        np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f"layer {i}")


# ---- CADS (Sadat et al. 2024, eq. 2-3) -------------------------------------------------

B = 3
TAU1, TAU2, NOISE = 0.6, 0.9, 0.25


def _cads_conds():
    # Per-sample means and stds far from 0 and 1, so the rescale to c's moments shows.
    rng = np.random.default_rng(3)
    scale = np.array([0.5, 2.0, 3.0])
    shift = np.array([-1.0, 0.5, 4.0])
    a = rng.standard_normal((B, 16)) * scale[:, None] + shift[:, None]
    b = rng.standard_normal((B, 2, 3)) * scale[:, None, None] - shift[:, None, None]
    cond = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    null = jax.tree_util.tree_map(jnp.zeros_like, cond)
    return {"cond": cond, "null": null}


def _numpy_cads(c, n, t, psi):
    """c_hat = sqrt(g) c + s sqrt(1 - g) n with g linear from 1 at tau1 to 0 at tau2, then
    psi of it moved to each sample's mean and std of c (over all its non-batch axes)."""
    c, n = np.asarray(c, np.float64), np.asarray(n, np.float64)
    g = 1.0 if t <= TAU1 else 0.0 if t >= TAU2 else (TAU2 - t) / (TAU2 - TAU1)
    hat = np.sqrt(g) * c + NOISE * np.sqrt(1.0 - g) * n
    axes = tuple(range(1, c.ndim))

    def mean(x):
        return x.mean(axis=axes, keepdims=True)

    def std(x):
        return x.std(axis=axes, keepdims=True)

    moved = (hat - mean(hat)) / std(hat) * std(c) + mean(c)
    return psi * moved + (1.0 - psi) * hat


@pytest.mark.parametrize("psi", [0.0, 0.5, 1.0])
def test_cads_ramp_mixing_and_rescale_match_numpy(psi):
    conds = _cads_conds()
    keys = S.sample_keys(0, jnp.arange(B))
    step = 5
    g = G.with_cads(G.cfg(3.0), tau1=TAU1, tau2=TAU2, noise_scale=NOISE, psi=psi)
    # The noise of sample i, leaf j at a step: normal(fold_in(fold_in(key_i, step), j)),
    # leaves in the pytree's flattening order (here "a", "b").
    leaves = jax.tree_util.tree_leaves(conds["cond"])
    noise = [
        np.stack(
            [
                jax.random.normal(
                    jax.random.fold_in(jax.random.fold_in(keys[i], step), j), c.shape[1:]
                )
                for i in range(B)
            ]
        )
        for j, c in enumerate(leaves)
    ]
    for t in (0.3, 0.65, 0.75, 0.85, 0.95):
        cond, null = g.conditions(conds, jnp.float32(t), keys, step=step)
        out = jax.tree_util.tree_leaves(cond)
        for c, n, o in zip(leaves, noise, out, strict=True):
            ref = _numpy_cads(c, n, t, psi)
            np.testing.assert_allclose(np.asarray(o), ref, atol=2e-5, rtol=1e-4, err_msg=f"t={t}")
        for o, z in zip(jax.tree_util.tree_leaves(null), leaves, strict=True):
            np.testing.assert_array_equal(np.asarray(o), np.zeros(z.shape))
