"""Attention controls: what a neutral control compiles in, the per-layer step count of
the energy loop against a numpy Hopfield update, and SEG's blur switched off."""

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax import Energy
from erg_jax.control import AttentionControl, attend, blur_queries


def test_neutral_compiles_in_only_the_perturbations_asked_for():
    bare = AttentionControl.neutral(4)
    assert (bare.energy, bare.steps, bare.identity, bare.blur, bare.skip) == (None,) * 5
    assert bare.num_layers == 0 and bare.max_steps == 1 and bare.energy_update
    seg = AttentionControl.neutral(4, blur=True)
    assert (seg.energy, seg.identity, seg.skip) == (None,) * 3
    np.testing.assert_array_equal(seg.blur, np.zeros(4))
    assert seg.num_layers == 4
    ierg = AttentionControl.neutral(5, energy=True, max_steps=3)
    np.testing.assert_array_equal(ierg.steps, np.ones(5))
    assert (ierg.identity, ierg.blur) == (None, None) and ierg.num_layers == 5


def _numpy_energy_steps(q, k, v, tau, alpha, gamma, steps):
    """Q <- (1 - gamma) Q + gamma alpha softmax(tau Q K^T / sqrt(d)) V, steps times."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    for _ in range(steps):
        s = tau * np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        q = (1.0 - gamma) * q + gamma * alpha * np.einsum("bhnm,bmhd->bnhd", p, v)
    return q


def test_each_layer_runs_its_own_number_of_energy_steps():
    b, n, h, d = 2, 5, 2, 4
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in "qkv")
    tau, alpha, gamma = 0.4, 1.3, 0.7
    steps = [1, 2, 3]
    ctl = AttentionControl(
        energy=Energy(*(jnp.full((3,), x, jnp.float32) for x in (tau, alpha, gamma))),
        steps=jnp.asarray(steps, jnp.int32),
        max_steps=3,
    )
    for i, s in enumerate(steps):
        out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), ctl.layer(i))
        want = _numpy_energy_steps(q, k, v, tau, alpha, gamma, s)
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, err_msg=f"layer {i}")


def test_blur_switched_off_is_the_identity_in_value_and_gradient():
    # sigma <= 0 must not reach the kernel: a 0 width there is 0 / 0, which the final
    # select hides in the value but not in the gradient.
    q = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 2, 3)), jnp.float32)
    for sigma in (0.0, -1.0):
        out, grad = jax.value_and_grad(lambda x, s=sigma: jnp.sum(blur_queries(x, (2, 3), s)))(q)
        np.testing.assert_allclose(out, jnp.sum(q), rtol=1e-6)
        np.testing.assert_array_equal(grad, np.ones(q.shape, np.float32))
