"""The splash path (JAX's Pallas TPU kernel, interpret mode on CPU) against the einsum path.

Interpret mode runs the kernel's grid step by step on the host: sizes stay small.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from erg_jax import Energy, energy_attention, fused, splash
from erg_jax.energy import _pick_implementation

TAUS = (0.01, 0.5, 1.0, 10.0)


def _qkv(seed=0, b=4, n=128, m=128, h=2, hk=2, d=32, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, n, h, d), dtype)
    k = jax.random.normal(ks[1], (b, m, hk, d), dtype)
    v = jax.random.normal(ks[2], (b, m, hk, d), dtype)
    keep = jax.random.bernoulli(ks[3], 0.7, (b, 1, 1, m)).at[..., 0].set(True)
    if b > 1:  # no key kept at all: uniform over the m keys on either path
        keep = keep.at[1].set(False)
    return q, k, v, keep


def _energy(steps):
    # One temperature per batch element (b = 4): every tau of TAUS in one call.
    tau = jnp.asarray(TAUS).reshape(4, 1, 1)
    return Energy(tau) if steps == 1 else Energy(tau, alpha=1.3, gamma=0.6)


def _assert_close(got, ref, steps, tol):
    # Three steps at tau = 10 amplify rounding: jax.nn.dot_product_attention itself is
    # 2e-5 off the einsum path there in float32. That batch element gets 10x the tolerance.
    if steps > 1:
        np.testing.assert_allclose(got[3], ref[3], atol=10 * tol, rtol=10 * tol)
        got, ref = got[:3], ref[:3]
    np.testing.assert_allclose(got, ref, atol=tol, rtol=tol)


def _both(q, k, v, energy, steps, mask=None):
    # Under jit, with a traced energy: one compile beats op-by-op dispatch here.
    def run(impl, **kw):
        fn = lambda q, k, v, e, mask: energy_attention(
            q, k, v, e, steps=steps, mask=mask, implementation=impl, **kw
        )
        traced = jax.jit(fn).trace(q, k, v, energy, mask)
        # The Pallas kernel ran, not an XLA path: parity alone would not tell them apart.
        assert ("pallas_call" in str(traced.jaxpr)) == (impl == "splash")
        return traced.lower().compile()(q, k, v, energy, mask)

    got, ref = run("splash"), run("einsum", precision="highest")
    assert got.dtype == q.dtype and got.shape == q.shape
    return np.asarray(got, np.float32), np.asarray(ref, np.float32)


@pytest.mark.parametrize(
    "n, m, h, hk, d, steps, masked",
    [
        (128, 128, 2, 2, 64, 1, False),  # lengths on the 128-lane tiles
        (128, 128, 2, 2, 64, 3, True),
        (200, 200, 4, 2, 32, 3, True),  # ragged lengths, grouped-query heads
        (77, 300, 4, 1, 64, 3, True),  # cross-attention, one kv head (MQA kernel)
    ],
)
def test_splash_equals_einsum_in_float32(n, m, h, hk, d, steps, masked):
    q, k, v, keep = _qkv(seed=n + m + hk, n=n, m=m, h=h, hk=hk, d=d)
    got, ref = _both(q, k, v, _energy(steps), steps, keep if masked else None)
    _assert_close(got, ref, steps, 1e-5)


def _einsum_with_the_fold(q, k, v, energy, steps, mask):
    """The energy update on the einsum path, fed the query splash gets: tau * beta folded
    in and rounded to q's dtype (``fused.fold``). In bfloat16 only the kernel's own
    arithmetic then differs; the einsum path itself scales its float32 logits instead,
    which is more accurate than any fold (docs/INTERFACES.md)."""
    tau, alpha, gamma = (
        jnp.broadcast_to(jnp.asarray(x, jnp.float32), q.shape[:3])
        for x in (energy.tau, energy.alpha, energy.gamma)
    )
    x = q
    for _ in range(steps):
        folded = fused.fold(x, tau / q.shape[-1] ** 0.5)
        r = energy_attention(
            folded, k, v, scale=1.0, mask=mask, implementation="einsum", precision="highest"
        )
        x = (1 - gamma[..., None]) * x + gamma[..., None] * alpha[..., None] * r
        x = x.astype(q.dtype)
    return np.asarray(x, np.float32)


@pytest.mark.parametrize("steps", [1, 3])
def test_splash_equals_einsum_in_bfloat16(steps):
    q, k, v, keep = _qkv(seed=3, n=200, m=200, h=4, hk=4, d=64, dtype=jnp.bfloat16)
    energy = _energy(steps)
    got, _ = _both(q, k, v, energy, steps, keep)
    ref = _einsum_with_the_fold(q, k, v, energy, steps, keep)
    # Three sharp (tau = 10) steps amplify bfloat16 rounding on either path: about 0.3
    # off the float32 result on both. There splash must be as close to float32 as einsum
    # with the same fold.
    close = slice(None) if steps == 1 else slice(0, 3)
    np.testing.assert_allclose(got[close], ref[close], atol=2e-2, rtol=2e-2)
    f32 = energy_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)),
        energy,
        steps=steps,
        mask=keep,
        implementation="einsum",
        precision="highest",
    )
    err_splash = np.mean(np.abs(got - np.asarray(f32)))
    err_einsum = np.mean(np.abs(ref - np.asarray(f32)))
    assert err_splash <= 1.25 * err_einsum + 1e-4, (err_splash, err_einsum)


def test_one_kernel_serves_per_head_temperatures_and_every_step(monkeypatch):
    q, k, v, keep = _qkv(seed=5, b=2, n=128, m=256, h=4, hk=2, d=32)
    energy = Energy(tau=jnp.array([0.3, 1.0, 3.0, 7.0]), alpha=0.9, gamma=jnp.full((4,), 0.7))
    built = []
    make = splash._kernel
    monkeypatch.setattr(splash, "_kernel", lambda *a: built.append(a) or make(*a))
    got, ref = _both(q, k, v, energy, 2, keep[0, 0, 0])  # mask (m,): the same keys for all
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    # One kernel shape for both steps and all four temperatures: tau lives in the query.
    assert len(set(built)) == 1 and len(built) == 2


def test_gradients_through_the_kernel_equal_einsum():
    q, k, v, keep = _qkv(seed=6, b=1, n=128, m=200, h=2, hk=2, d=32)

    def grads(impl):
        def loss(q, k, v):
            out = energy_attention(q, k, v, Energy(0.7), mask=keep, implementation=impl)
            return jnp.sum(jnp.sin(out))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, ref in zip(grads("splash"), grads("einsum"), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def _mesh():
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    return jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))


def test_sharding_rules_of_the_kernel_call():
    mesh = _mesh()
    assert splash._specs(mesh, 4, 4, 2) == (
        P(("data", "fsdp"), None, "tensor", None),
        P(("data", "fsdp"), None),
    )
    assert splash._specs(mesh, 2, 4, 2)[0] == P(None, None, "tensor", None)  # 4 batch shards
    assert splash._specs(mesh, 8, 4, 1)[0] == P(("data", "fsdp"), None, None, None)
    small = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2, 1), mesh.axis_names)
    assert splash._specs(small, 2, 4, 4)[0] == P(("fsdp",), None, None, None)


@pytest.mark.parametrize("b, hk, masked", [(4, 2, True), (2, 1, False)])
def test_splash_under_a_mesh_equals_einsum(b, hk, masked):
    q, k, v, keep = _qkv(seed=7, b=b, n=128, m=200, h=4, hk=hk, d=32)
    mask = keep if masked else None
    energy = Energy(tau=jnp.array([0.5, 2.0, 1.0, 4.0]), alpha=1.2, gamma=0.8)

    def fn(q, k, v, mask):
        return energy_attention(q, k, v, energy, steps=2, mask=mask, implementation="splash")

    assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v, mask))
    with jax.set_mesh(_mesh()):
        traced = jax.jit(fn).trace(q, k, v, mask)
        assert "shard_map" in str(traced.jaxpr)
        got = traced.lower().compile()(q, k, v, mask)
    ref = energy_attention(
        q, k, v, energy, steps=2, mask=mask, implementation="einsum", precision="highest"
    )
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_the_tpu_default_takes_splash_where_it_can():
    half = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    keep = jnp.ones((2, 1, 1, 256), bool)
    assert _pick_implementation(half, half, backend="tpu") == "splash"
    assert _pick_implementation(half, half, mask=keep, backend="tpu") == "splash"
    bias = jnp.zeros((1, 4, 256, 256))
    assert _pick_implementation(half, half, bias, backend="tpu") == "einsum"
    per_query = jnp.ones((2, 1, 256, 256), bool)
    assert _pick_implementation(half, half, mask=per_query, backend="tpu") == "einsum"
    text = jax.ShapeDtypeStruct((2, 77, 4, 64), jnp.bfloat16)
    assert _pick_implementation(half, text, backend="tpu") == "einsum"  # under MIN_KV keys
    full = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.float32)
    assert _pick_implementation(full, full, backend="tpu") == "einsum"  # precision honoured
    longer = jax.ShapeDtypeStruct((2, 16384, 16, 64), jnp.bfloat16)
    assert _pick_implementation(longer, longer, backend="tpu") == "splash"  # not chunked
    assert _pick_implementation(half, half, backend="cpu") == "einsum"
    assert _pick_implementation(half, half, backend="gpu") == "cudnn"


@pytest.mark.parametrize(
    "case, words",
    [
        ("bias", "bias"),
        ("per-query mask", "key-padding mask"),
        ("per-head mask", "key-padding mask"),
        ("float16", "float16"),
        ("mixed dtypes", "one dtype"),
    ],
)
def test_named_splash_refuses_what_it_cannot_take(case, words, monkeypatch):
    q, k, v, _ = _qkv(b=1, dtype=jnp.float16 if case == "float16" else jnp.float32)
    if case == "mixed dtypes":
        k = k.astype(jnp.bfloat16)
    kw = {
        "bias": dict(bias=jnp.zeros((1, 2, 128, 128))),
        "per-query mask": dict(mask=jnp.ones((1, 1, 128, 128), bool)),
        "per-head mask": dict(mask=jnp.ones((1, 2, 1, 128), bool)),
    }.get(case, {})
    # Refused before a kernel is built or anything compiles.
    monkeypatch.setattr(splash, "_kernel", lambda *a: pytest.fail("kernel built"))
    with pytest.raises(ValueError, match=words) as err:
        energy_attention(q, k, v, implementation="splash", **kw)
    assert "splash" in str(err.value)


def test_splash_is_tpu_only_on_gpu():
    q, k, v, _ = _qkv(b=1)
    with pytest.raises(ValueError, match="TPU-only"):
        splash.check(q, k, v, backend="gpu")
    splash.check(q, k, v, backend="tpu")  # the same inputs pass on TPU
