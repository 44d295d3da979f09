"""TPG (token perturbation guidance): the weak branch's block updates moved to other
tokens by a permutation per step and layer, shared by the batch; the guided prediction
is the authors' eps_c + gamma (eps_c - eps_tpg) with gamma = w - 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.control import AttentionControl, shuffle_update
from tests.toys import make_toy_transformer


def _reference_toy(den, x, t, cond, perms):
    """The toy transformer in numpy, each layer l with a permutation perms[l] (or None)
    applied to its update: h <- h + S_l (layer(h) - h), S_l H = H[perm]."""
    b, size, _, channels = x.shape
    w_in, w_out = (np.asarray(w, np.float64) for w in den.io)
    h = np.asarray(x, np.float64).reshape(b, size * size, channels) @ w_in
    h = h + np.asarray(cond, np.float64)[:, None, :] + np.sin(np.asarray(t))[:, None, None]
    heads = den.heads
    for (wq, wk, wv, wo), perm in zip(den.layers, perms, strict=True):
        wq, wk, wv, wo = (np.asarray(w, np.float64) for w in (wq, wk, wv, wo))
        q, k, v = (np.reshape(h @ w, (b, -1, heads, h.shape[-1] // heads)) for w in (wq, wk, wv))
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        a = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(h.shape)
        update = np.tanh(a @ wo)
        h = h + (update if perm is None else update[:, perm])
    return (h @ w_out).reshape(x.shape)


def test_the_weak_branch_moves_the_chosen_blocks_updates():
    den, _ = make_toy_transformer(num_layers=3, heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
    cond = jax.random.normal(jax.random.key(1), (2, 16))
    t = jnp.full((2,), 0.6, jnp.float32)
    guider = G.make_guider("tpg", tpg={"layers": "0,2"})
    _, weak = guider.controls(jnp.float32(0.6), 3)
    seeds = np.asarray(weak.shuffle)
    assert seeds[1] == 0 and seeds[0] != seeds[2] and np.all(seeds[[0, 2]] != 0)
    perms = [
        None if s == 0 else np.asarray(jax.random.permutation(jax.random.key(int(s)), 16))
        for s in seeds
    ]
    got = den(x, t, cond, weak)
    ref = _reference_toy(den, x, t, cond, perms)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # a permutation keeps the update's norm, and the weak branch differs from the strong
    assert not np.allclose(got, den(x, t, cond))


def test_a_fresh_permutation_per_step_and_layer_shared_by_the_batch():
    guider = G.make_guider("tpg")
    a = np.asarray(guider.controls(jnp.float32(0.6), 4)[1].shuffle)
    b = np.asarray(guider.controls(jnp.float32(0.5), 4)[1].shuffle)
    assert len(set(a.tolist())) == 4 and not set(a.tolist()) & set(b.tolist())
    x = jnp.stack([jnp.arange(12.0).reshape(4, 3)] * 2)
    out = shuffle_update(x, x + 1.0 + x, AttentionControl(shuffle=jnp.int32(a[0])))
    np.testing.assert_array_equal(out[0], out[1])  # the same permutation for every sample
    np.testing.assert_allclose(jnp.sort((out - x)[0].ravel()), jnp.sort((x + 1.0)[0].ravel()))
    same = shuffle_update(x, x + 1.0, AttentionControl(shuffle=jnp.int32(0)))
    np.testing.assert_array_equal(same, x + 1.0)  # seed 0: the block as it is


def test_the_guided_prediction_is_the_authors_formula():
    """eps = eps_c + gamma (eps_c - eps_tpg), gamma = tpg_scale = w - 1."""
    ks = jax.random.split(jax.random.key(3), 2)
    strong, weak = (jax.random.normal(k, (2, 4, 4, 3)) for k in ks)
    guider = G.make_guider("tpg", scale=4.0)
    out, _ = guider.combine([strong, weak], jnp.float32(0.5), guider.init_state(strong))
    np.testing.assert_allclose(out, strong + 3.0 * (strong - weak), rtol=1e-6, atol=1e-6)


def test_a_samples_image_does_not_depend_on_its_batch():
    den, _ = make_toy_transformer(num_layers=3, heads=2)
    guider = G.make_guider("tpg", scale=3.0, tpg={"layers": "1"})

    def run(n):
        keys = S.sample_keys(0, jnp.arange(n))
        noise = S.initial_noise(keys, (4, 4, 2))
        cond = jnp.tile(jnp.linspace(-1, 1, 16)[None], (n, 1))
        conds = {"cond": cond, "null": jnp.zeros_like(cond)}
        return S.sample(
            den, noise, conds, guider, S.make_sampler("euler", 3), keys=keys, num_layers=3
        )

    np.testing.assert_allclose(run(3)[:2], run(2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["blocks.1", "1"])
def test_tpg_on_a_dit_from_its_layer_on(spec):
    from erg_jax.models import dit, dit_config

    config = dit.dit_config("tiny/2", num_layers=3)
    den = dit.make_denoiser(config, dit.init_params(config, jax.random.key(0)))
    layout = dit_config.layout(config)
    guider = G.resolve_targets(G.make_guider("tpg", tpg={"layers": spec}), layout)
    strong, weak = guider.controls(jnp.float32(0.5), 3)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, config["in_channels"]))
    t = jnp.full((2,), 500, jnp.int32)
    y = jnp.array([0, 1])
    plain, shuffled = den(x, t, y, strong), den(x, t, y, weak)
    assert not np.allclose(plain, shuffled)
    branched = den.branched(x, t, y, jax.tree_util.tree_map(lambda *a: jnp.stack(a), strong, weak))
    np.testing.assert_allclose(branched[1], shuffled, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(branched[0], plain, rtol=1e-4, atol=1e-4)
