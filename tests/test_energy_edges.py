"""Energy attention at its edges: queries with every key masked, and bfloat16 at high
temperature, against float64 numpy references that share no code with erg_jax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import Energy, attention_entropy, energy_attention, hopfield_energy

TAUS = np.array([0.5, 1.0, 2.0, 4.0])  # one per query head


def _inputs(seed=0, b=2, n=7, m=9, h=4, hk=2, d=8, dtype=jnp.float32):
    """q, k, v, bias and a mask (b, 1, n, m) with some rows fully and some partly masked."""
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, n, h, d), dtype)
    k = jax.random.normal(ks[1], (b, m, hk, d), dtype)
    v = jax.random.normal(ks[2], (b, m, hk, d), dtype)
    bias = jax.random.normal(ks[3], (b, h, n, m))
    mask = jax.random.bernoulli(ks[4], 0.6, (b, 1, n, m)).at[..., 0].set(True)
    mask = mask.at[0, 0, 2].set(False).at[1, 0, 5].set(False)  # two queries see no key
    return q, k, v, bias, mask


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _np_logits(q, k, tau, bias=None):
    """tau * (q.k / sqrt(d) + B), (b, h, n, m), kv head j // (h / hk); tau per head."""
    q, k = _f64(q), _f64(k)
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    s = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        s = s + _f64(bias)
    return np.asarray(tau, np.float64).reshape(1, -1, 1, 1) * s


def _np_weights(s, mask):
    """Softmax over the kept keys; a row with none kept is uniform over all m."""
    mask = np.broadcast_to(np.asarray(mask), s.shape)
    z = np.where(mask, s, -np.inf)
    z = np.where(mask.any(-1, keepdims=True), z, 0.0)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _np_entropy(p):
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -plogp.sum(-1).transpose(0, 2, 1)


def test_a_fully_masked_query_has_the_free_energy_of_its_uniform_attention():
    # E = -(alpha / (tau beta)) L + |xi|^2 / 2 with L the log-sum-exp over the kept keys,
    # or, for a query that keeps none, mean_j l_j + log m: the uniform p it attends with.
    q, k, _, bias, mask = _inputs()
    alpha = 1.3
    got = hopfield_energy(q, k, Energy(tau=jnp.asarray(TAUS), alpha=alpha), bias=bias, mask=mask)
    s = _np_logits(q, k, TAUS, bias)
    mb = np.broadcast_to(np.asarray(mask), s.shape)
    with np.errstate(divide="ignore", invalid="ignore"):  # the rows that keep no key
        z = np.where(mb, s, -np.inf)
        top = z.max(-1, keepdims=True)
        lse = np.log(np.exp(z - top).sum(-1)) + top[..., 0]
    lse = np.where(mb.any(-1), lse, s.mean(-1) + np.log(s.shape[-1])).transpose(0, 2, 1)
    want = -(alpha * np.sqrt(q.shape[-1]) / TAUS) * lse + 0.5 * (_f64(q) ** 2).sum(-1)
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the fully masked queries are there, and masking all keys changed their energy
    assert not np.asarray(mask)[0, 0, 2].any() and not np.asarray(mask)[1, 0, 5].any()
    plain = hopfield_energy(q, k, Energy(tau=jnp.asarray(TAUS), alpha=alpha), bias=bias)
    assert not np.allclose(np.asarray(got)[0, 2], np.asarray(plain)[0, 2])


@pytest.mark.parametrize("impl", ["einsum", "chunked", "fused"])
def test_the_gradient_step_identity_holds_for_fully_masked_queries(impl):
    # With v = k one energy_attention step is q - gamma * grad E for every query; a query
    # that sees no key reads the mean key, so grad E there must be xi - alpha * mean_j k_j.
    q, k, _, bias, mask = _inputs(seed=1)
    e = Energy(tau=jnp.asarray(TAUS), alpha=0.8, gamma=0.7)
    grad = jax.grad(lambda x: jnp.sum(hopfield_energy(x, k, e, bias=bias, mask=mask)))(q)
    step = energy_attention(q, k, k, e, bias=bias, mask=mask, implementation=impl)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(step, q - 0.7 * grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype, tau, tol", [(jnp.float32, 0.6, 1e-5), (jnp.bfloat16, 30.0, 1e-4)])
def test_entropy_is_of_the_distribution_energy_attention_reads_with(dtype, tau, tol):
    # Masked keys weigh zero; a query that sees no key is uniform over all m keys, entropy
    # log m, and its output is the mean value on every path that takes a mask. In
    # bfloat16 at tau = 30 the entropy holds to 1e-4 nats only with tau applied to
    # float32 logits (folded into the bfloat16 query it was 0.02 off).
    q, k, v, bias, mask = _inputs(seed=2, hk=4, dtype=dtype)
    p = _np_weights(_np_logits(q, k, [tau] * 4, bias), mask)
    got = attention_entropy(q, k, Energy(tau=tau), bias=bias, mask=mask)
    np.testing.assert_allclose(got, _np_entropy(p), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(got)[0, 2], np.log(9.0), rtol=1e-6)
    if dtype == jnp.float32:
        want = np.einsum("bhnm,bmhd->bnhd", p, _f64(v))
        for impl in ("einsum", "chunked", "fused"):
            out = energy_attention(
                q, k, v, Energy(tau=tau), bias=bias, mask=mask, implementation=impl
            )
            np.testing.assert_allclose(out, want, atol=1e-5, err_msg=impl)
        np.testing.assert_allclose(out[0, 2], _f64(v)[0].mean(0), atol=1e-5)


def _bf16(seed, b=2, n=128, m=128, h=4, d=72):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, n, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, m, h, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, m, h, d), jnp.bfloat16)
    return q, k, v


def _np_attend(q, k, v, tau):
    p = _np_weights(_np_logits(q, k, [tau] * q.shape[2]), np.ones((1, 1, 1, 1), bool))
    return np.einsum("bhnm,bmhd->bnhd", p, _f64(v))


@pytest.mark.parametrize("impl", ["einsum", "chunked"])
def test_bfloat16_at_tau_100_is_as_accurate_as_jax_nn(impl):
    # With tau * beta applied to the float32 logits, what is left is rounding the weights
    # p and the output to bfloat16, each at most 2^-8 of max |v| (8 significant bits):
    # bound 2^-7 max |v|, 0.023 here, where jax.nn.dot_product_attention (its scale
    # applied to float32 logits too) is 0.012 off. Folded into the bfloat16 query,
    # tau * beta cost 0.38 (head_dim 72: beta is not a power of two).
    q, k, v = _bf16(seed=3)
    tau = 100.0
    want = _np_attend(q, k, v, tau)
    got = energy_attention(q, k, v, Energy(tau=tau), implementation=impl)
    err = np.abs(_f64(got) - want).max()
    ref = jax.nn.dot_product_attention(q, k, v, scale=tau / np.sqrt(q.shape[-1]))
    err_nn = np.abs(_f64(ref) - want).max()
    bound = 2.0**-7 * np.abs(_f64(v)).max()
    assert err <= bound, (err, bound, err_nn)
    assert err <= 1.1 * err_nn + 1e-3, (err, err_nn)


def test_a_later_bfloat16_energy_step_is_as_accurate_as_the_first():
    # Step 2 starts from step 1's bfloat16 output x1 and must compute its own logits as
    # accurately: (1 - gamma) x1 + gamma alpha softmax(tau beta x1 K^T) V in float64, off
    # by at most the weights' and output's bfloat16 rounding, 2^-8 (gamma alpha max |v|
    # + max |x2|).
    q, k, v = _bf16(seed=4)
    tau, alpha, gamma = 100.0, 1.3, 0.6
    e = Energy(tau, alpha, gamma)
    x1 = energy_attention(q, k, v, e, implementation="einsum")
    x2 = energy_attention(q, k, v, e, steps=2, implementation="einsum")
    want = (1 - gamma) * _f64(x1) + gamma * alpha * _np_attend(x1, k, v, tau)
    bound = 2.0**-8 * (gamma * alpha * np.abs(_f64(v)).max() + np.abs(want).max())
    assert np.abs(_f64(x2) - want).max() <= bound


def test_bfloat16_hopfield_energy_at_tau_100_matches_float64():
    # The energy divides the log-sum-exp by tau * beta: a logit error of the folded query
    # (about 0.1 at tau = 100) would show as 1e-2 here; float32 logits leave 1e-4.
    q, k, _ = _bf16(seed=5, n=32, m=32)
    tau = 100.0
    got = hopfield_energy(q, k, Energy(tau=tau))
    s = _np_logits(q, k, [tau] * 4)
    top = s.max(-1, keepdims=True)
    lse = (np.log(np.exp(s - top).sum(-1)) + top[..., 0]).transpose(0, 2, 1)
    want = -(np.sqrt(q.shape[-1]) / tau) * lse + 0.5 * (_f64(q) ** 2).sum(-1)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-5)


def test_fused_standard_attention_is_jax_nn_bit_for_bit_in_bfloat16():
    # The fused path hands beta to jax.nn as its scale and folds only tau into q: at
    # tau = 1 (the strong branch of every guider, even with tau traced) nothing is
    # rounded. head_dim 72: 1 / sqrt(72) is not a power of two, folding it was not exact.
    q, k, v = _bf16(seed=6, n=16, m=24)
    _, _, _, bias, mask = _inputs(seed=6, b=2, n=16, m=24, h=4, hk=4)
    ref = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
    got = energy_attention(q, k, v, Energy(), bias=bias, mask=mask, implementation="fused")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    traced = jax.jit(
        lambda t: energy_attention(
            q, k, v, Energy(tau=t), bias=bias, mask=mask, implementation="fused"
        )
    )(jnp.ones((4,)))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(ref))
