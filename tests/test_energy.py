"""Energy attention against jax.nn.dot_product_attention, jax.grad and explicit loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import Energy, attention_entropy, energy_attention, hopfield_energy
from erg_jax.energy import attention_weights

IMPLS = ("einsum", "fused")


def _qkv(seed=0, b=2, n=6, m=9, h=4, hk=2, d=8, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, n, h, d), dtype)
    k = jax.random.normal(ks[1], (b, m, hk, d), dtype)
    v = jax.random.normal(ks[2], (b, m, hk, d), dtype)
    bias = jax.random.normal(ks[3], (b, h, n, m))
    mask = jax.random.bernoulli(ks[4], 0.7, (b, 1, n, m)).at[..., 0].set(True)
    return q, k, v, bias, mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hk", [4, 2, 1])
def test_standard_energy_is_dot_product_attention(impl, hk):
    q, k, v, bias, mask = _qkv(hk=hk)
    ref = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
    out = energy_attention(q, k, v, Energy(), bias=bias, mask=mask, implementation=impl)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    plain = energy_attention(q, k, v, implementation=impl)
    np.testing.assert_allclose(plain, jax.nn.dot_product_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_temperature_scales_scores_and_bias(impl):
    q, k, v, bias, mask = _qkv(hk=4)
    tau = 0.37
    d = q.shape[-1]
    out = energy_attention(q, k, v, Energy(tau=tau), bias=bias, mask=mask, implementation=impl)
    ref = jax.nn.dot_product_attention(q, k, v, bias=tau * bias, mask=mask, scale=tau / d**0.5)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_bias", [False, True])
def test_one_step_is_a_gradient_step_on_the_energy(impl, use_bias):
    q, k, _, bias, mask = _qkv(seed=1, hk=2)
    bias = bias if use_bias else None
    rng = np.random.default_rng(0)
    for _ in range(3):
        e = Energy(*[float(x) for x in rng.uniform(0.2, 3.0, 3)])
        grad = jax.grad(lambda x, e=e: jnp.sum(hopfield_energy(x, k, e, bias=bias, mask=mask)))(q)
        step = energy_attention(q, k, k, e, bias=bias, mask=mask, implementation=impl)
        np.testing.assert_allclose(step, q - e.gamma * grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_k_steps_equal_k_explicit_updates(impl):
    q, k, v, bias, mask = _qkv(seed=2, hk=4)
    e = Energy(tau=0.7, alpha=1.3, gamma=0.6)
    x = q
    for _ in range(3):
        x = energy_attention(x, k, v, e, bias=bias, mask=mask, implementation=impl)
    out = energy_attention(q, k, v, e, steps=3, bias=bias, mask=mask, implementation=impl)
    np.testing.assert_allclose(out, x, atol=1e-6)
    # the update rule itself, written out
    p = jax.nn.softmax(
        0.7 * (jnp.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5 + bias)
        + jnp.where(mask, 0.0, -jnp.inf),
        axis=-1,
    )
    manual = 0.4 * q + 0.6 * 1.3 * jnp.einsum("bhnm,bmhd->bnhd", p, v)
    one = energy_attention(q, k, v, e, bias=bias, mask=mask, implementation=impl)
    np.testing.assert_allclose(one, manual, atol=1e-5)


def test_lower_tau_raises_entropy_and_masks_stay_masked():
    q, k, _, bias, mask = _qkv(seed=3)
    taus = [0.1, 0.3, 1.0, 3.0, 10.0]
    ent = np.stack([attention_entropy(q, k, Energy(tau=t), bias=bias, mask=mask) for t in taus])
    assert np.all(np.diff(ent, axis=0) <= 1e-5)
    assert np.mean(ent[0]) > np.mean(ent[-1]) + 0.5
    # a masked key gets no weight at any temperature
    q2, k2, v2, _, _ = _qkv(seed=4, hk=4)
    m = jnp.ones((1, 1, 1, 9), bool).at[..., 3].set(False)
    v_big = v2.at[:, 3].set(1e4)
    for tau in (0.01, 100.0):
        out = energy_attention(q2, k2, v_big, Energy(tau=tau), mask=m)
        assert float(jnp.max(jnp.abs(out))) < 100.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_temperatures_are_finite(impl, dtype):
    q, k, v, bias, mask = _qkv(seed=5, hk=2, dtype=dtype)
    q = q * 30  # large logits
    for tau in (0.01, 100.0):
        out = energy_attention(q, k, v, Energy(tau=tau), bias=bias, mask=mask, implementation=impl)
        assert out.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
        assert bool(jnp.all(jnp.isfinite(hopfield_energy(q, k, Energy(tau=tau), mask=mask))))


def test_vmap_over_stacked_energy_equals_separate_calls():
    q, k, v, bias, mask = _qkv(seed=6)
    es = [Energy(0.5, 1.0, 1.0), Energy(2.0, 0.8, 0.5), Energy(1.0, 1.0, 1.0)]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.asarray(x), *es)
    out = jax.vmap(lambda e: energy_attention(q, k, v, e, bias=bias, mask=mask))(stacked)
    for i, e in enumerate(es):
        np.testing.assert_allclose(
            out[i], energy_attention(q, k, v, e, bias=bias, mask=mask), atol=1e-6
        )


def test_per_head_energy_broadcasts():
    q, k, v, _, _ = _qkv(seed=7, hk=4)
    taus = jnp.array([0.5, 1.0, 2.0, 4.0])
    out = energy_attention(q, k, v, Energy(tau=taus))
    for h in range(4):
        ref = energy_attention(q, k, v, Energy(tau=float(taus[h])))
        np.testing.assert_allclose(out[:, :, h], ref[:, :, h], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(energy=Energy(tau=0.0)), "tau"),
        (dict(energy=Energy(tau=-1.0)), "tau"),
        (dict(energy=Energy(gamma=0.0)), "gamma"),
        (dict(steps=0), "steps"),
        (dict(steps=True), "steps"),  # a bool is not a step count
        (dict(steps=2.0), "steps"),
        (dict(implementation="flash"), "implementation"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    q, k, v, _, _ = _qkv()
    with pytest.raises(ValueError, match=field):
        energy_attention(q, k, v, **kwargs)


def test_shape_mismatch_is_a_clear_error():
    q, k, v, _, _ = _qkv()
    with pytest.raises(ValueError, match="head_dim"):
        energy_attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="multiple"):
        energy_attention(q, jnp.zeros((2, 9, 3, 8)), jnp.zeros((2, 9, 3, 8)))
    with pytest.raises(ValueError, match="v shape"):
        energy_attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="batch, length, heads"):
        energy_attention(q[0], k, v)


def test_the_default_path_per_backend():
    from erg_jax.energy import _pick_implementation

    half = jnp.zeros((2, 64, 4, 64), jnp.bfloat16)
    full = half.astype(jnp.float32)
    assert _pick_implementation(half, half, backend="gpu") == "cudnn"
    assert _pick_implementation(full, full, backend="gpu") == "fused"  # cuDNN wants 16 bits
    assert _pick_implementation(half, half, bias=jnp.zeros((1,)), backend="gpu") == "fused"
    wide = jnp.zeros((2, 64, 4, 256), jnp.bfloat16)
    assert _pick_implementation(wide, wide, backend="gpu") == "fused"
    assert _pick_implementation(half, half, backend="cpu") == "einsum"
    assert _pick_implementation(half, half, backend="tpu") == "einsum"
    # Logits past the backend's budget go to query chunks: 64 MiB on CPU, 1 GiB elsewhere.
    long = jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.float32)
    assert _pick_implementation(long, long, backend="cpu") == "chunked"
    assert _pick_implementation(long, long, backend="gpu") == "fused"
    longer = jax.ShapeDtypeStruct((2, 16384, 16, 64), jnp.float32)
    assert _pick_implementation(longer, longer, backend="gpu") == "chunked"
    assert _pick_implementation(longer, longer, backend="tpu") == "chunked"


def test_the_default_falls_back_to_xla_where_cudnn_refuses(monkeypatch):
    from erg_jax import energy

    # head_dim 12: cuDNN refuses it on a GPU (not a multiple of 8); here it is missing.
    q, k, v, _, _ = _qkv(seed=8, hk=2, d=12, dtype=jnp.bfloat16)
    ref = energy_attention(q, k, v, Energy(0.5), implementation="fused")
    with pytest.raises((RuntimeError, NotImplementedError)):  # named, it is an error
        energy_attention(q, k, v, Energy(0.5), implementation="cudnn")
    monkeypatch.setattr(energy, "_pick_implementation", lambda *a, **kw: "cudnn")
    got = energy_attention(q, k, v, Energy(0.5))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_a_global_matmul_precision_reaches_every_path():
    # A user's jax.default_matmul_precision must not be reset inside the fused path.
    q = jnp.ones((1, 4, 2, 8))
    for impl in ("einsum", "chunked", "fused"):
        fn = jax.jit(
            lambda q, impl=impl: energy_attention(q, q, q, Energy(0.5), implementation=impl)
        )
        with jax.default_matmul_precision("highest"):
            assert "HIGHEST" in fn.lower(q).as_text(), impl
        assert "HIGHEST" not in fn.lower(q).as_text(), impl


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("hk", [4, 2])
def test_cudnn_path_equals_einsum_in_bfloat16(hk):
    q, k, v, _, _ = _qkv(seed=9, n=128, m=128, h=4, hk=hk, d=64, dtype=jnp.bfloat16)
    for energy in (Energy(), Energy(tau=0.3), Energy(tau=2.0, alpha=0.8, gamma=0.5)):
        got = energy_attention(q, k, v, energy, steps=2, implementation="cudnn")
        ref = energy_attention(q, k, v, energy, steps=2, implementation="einsum")
        np.testing.assert_allclose(
            got.astype(jnp.float32), ref.astype(jnp.float32), atol=3e-2, rtol=3e-2
        )


def test_attention_weights_and_entropy_match_numpy():
    # softmax(tau (q.k / sqrt(d) + B)) over the unmasked keys (kv head j // (h / hk)),
    # and its Shannon entropy in nats, the default scale 1 / sqrt(d) left implicit
    q, k, _, bias, mask = _qkv(seed=4, hk=2)
    tau = 0.6
    kr = np.repeat(np.asarray(k, np.float64), 2, axis=2)
    s = np.einsum("bnhd,bmhd->bhnm", np.asarray(q, np.float64), kr) / np.sqrt(q.shape[-1])
    s = np.where(np.asarray(mask), tau * (s + np.asarray(bias)), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    got = attention_weights(q, k, Energy(tau=tau), bias=bias, mask=mask)
    np.testing.assert_allclose(got, p, atol=1e-6)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = attention_entropy(q, k, Energy(tau=tau), bias=bias, mask=mask)
    np.testing.assert_allclose(entropy, -plogp.sum(-1).transpose(0, 2, 1), atol=1e-5)
