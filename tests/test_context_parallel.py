"""Ring and Ulysses energy attention over a "context" mesh axis against the single-device
einsum path (erg_jax.context_parallel), on the 8 fake CPU devices of conftest.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from erg_jax import Energy, energy_attention, sharding

IMPLS = ("ring", "ulysses")
# The collective that shows each scheme ran sharded rather than on gathered arrays.
COLLECTIVE = {"ring": "ppermute", "ulysses": "all_to_all"}
MESHES = ({"context": 8}, {"data": 2, "context": 4})

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS set by tests/conftest.py)"
)


def _inputs(seed=0, b=4, n=37, m=37, h=8, hk=8, d=16):
    # numpy, not jax.random: eager jax ops compile one by one, seconds on 2 busy cores.
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    q, k, v = normal(b, n, h, d), normal(b, m, hk, d), normal(b, m, hk, d)
    bias = normal(1, h, n, m)
    keep = rng.random((b, 1, n, m)) < 0.7
    # Batch 0: query 3 keeps no key (uniform over the m real keys on every path), query
    # 5 only the last key (in the block that holds the padding), query 2 only the first.
    keep[0, 0, 2:6] = False
    keep[0, 0, 5, m - 1] = keep[0, 0, 2, 0] = True
    return q, k, v, bias, keep


def _assert_close(got, ref, tol=1e-5):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err < tol, err


_REFERENCES = {}


def _reference(fn, *args):
    """fn(*args, impl="einsum") jitted, once per test function (its parameters share it)."""
    key = fn.__code__
    if key not in _REFERENCES:
        _REFERENCES[key] = jax.jit(functools.partial(fn, impl="einsum"))(*args)
    return _REFERENCES[key]


def _run(impl, mesh, fn, *args):
    """fn(*args) jitted under the mesh; asserts the scheme's collective is in the program."""
    with jax.set_mesh(mesh):
        traced = jax.jit(fn).trace(*args)
        assert COLLECTIVE[impl] in str(traced.jaxpr)
        return traced.lower().compile()(*args)


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "x".join(f"{k}{v}" for k, v in a.items()))
@pytest.mark.parametrize("impl", IMPLS)
def test_energy_steps_with_bias_mask_ragged_length_and_grouped_query(impl, axes):
    # n = 37 on 4 or 8 devices: padded inside. Two kv heads for eight query heads: fewer
    # than the devices, so Ulysses repeats them. One tau per batch element: all three
    # temperatures in one compile; alpha, gamma != 1 and three steps.
    q, k, v, bias, keep = _inputs(hk=2)
    tau = np.asarray([0.3, 1.0, 2.0, 1.0], np.float32).reshape(4, 1, 1)
    energy = Energy(tau=tau, alpha=1.3, gamma=0.6)

    def fn(q, k, v, energy, bias, keep, impl=impl):
        return energy_attention(q, k, v, energy, steps=3, bias=bias, mask=keep, implementation=impl)

    ref = _reference(fn, q, k, v, energy, bias, keep)
    got = _run(impl, sharding.make_mesh(axes), fn, q, k, v, energy, bias, keep)
    _assert_close(got, ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_attention_one_step_with_per_token_temperatures(impl):
    # 37 queries against 21 keys (padded to 24 on 4 devices); a bias per key; a
    # key-padding mask with a batch element that keeps no key; tau varying over tokens
    # and heads, so a field sharded or padded along the wrong axis shows.
    q, k, v, _, _ = _inputs(seed=3, n=37, m=21)
    rng = np.random.default_rng(4)
    bias = rng.standard_normal((4, 1, 1, 21), dtype=np.float32)
    keep = np.arange(21) < np.asarray([21, 13, 1, 0])[:, None, None, None]
    tau = rng.uniform(0.3, 2.0, (1, 37, 8)).astype(np.float32)

    def fn(q, k, v, tau, bias, keep, impl=impl):
        return energy_attention(q, k, v, Energy(tau), bias=bias, mask=keep, implementation=impl)

    ref = jax.jit(functools.partial(fn, impl="einsum"))(q, k, v, tau, bias, keep)
    mesh = sharding.make_mesh({"data": 2, "context": 4})
    _assert_close(_run(impl, mesh, fn, q, k, v, tau, bias, keep), ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_in_q_matches_the_unsharded_one(impl):
    q, k, v, bias, keep = _inputs(seed=5, b=2, n=19, m=19, h=4, hk=4, d=8)
    energy = Energy(tau=0.3, alpha=1.2, gamma=0.5)

    def loss(q, impl=impl):
        out = energy_attention(q, k, v, energy, steps=2, bias=bias, mask=keep, implementation=impl)
        return jnp.sum(jnp.sin(out))

    ref = jax.jit(jax.grad(functools.partial(loss, impl="einsum")))(q)
    got = _run(impl, sharding.make_mesh({"data": 2, "context": 4}), jax.grad(loss), q)
    _assert_close(got, ref)


def test_explicit_mesh_keeps_the_sequence_sharded():
    # jax.make_mesh gives explicit axes: inputs sharded (data, context) come back so.
    q, k, v, bias, keep = _inputs(seed=6, n=40, m=40)
    mesh = jax.make_mesh((2, 4), ("data", "context"))
    fn = lambda q, k, v, impl="ring": energy_attention(
        q, k, v, Energy(tau=2.0), bias=bias, mask=keep, implementation=impl
    )
    ref = jax.jit(functools.partial(fn, impl="einsum"))(q, k, v)
    with jax.set_mesh(mesh):
        q, k, v = (jax.device_put(x, P("data", "context")) for x in (q, k, v))
        got = jax.jit(fn)(q, k, v)
    assert got.sharding.spec[:2] == ("data", "context")
    _assert_close(got, ref)


def test_refusals():
    q = k = v = jnp.zeros((4, 8, 6, 16))
    bias = jnp.zeros((1, 1, 3, 8))
    call = lambda impl, **kw: energy_attention(q, k, v, implementation=impl, **kw)
    for impl in IMPLS:
        with pytest.raises(ValueError, match="mesh axis named 'context'.*none"):
            call(impl)
        with jax.set_mesh(sharding.make_mesh({"data": 8})):
            with pytest.raises(ValueError, match="mesh axis named 'context'.*data"):
                call(impl)
    mesh = sharding.make_mesh({"data": 2, "context": 4})
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"q heads \(6\).*mesh.context \(4\)"):
            call("ulysses")
        with pytest.raises(ValueError, match="bias of shape"):
            call("ring", bias=bias)

    @jax.shard_map(mesh=mesh, in_specs=P(None, "context"), out_specs=P(None, "context"))
    def inside(x):
        return energy_attention(x, x, x, implementation="ring")

    with jax.set_mesh(mesh), pytest.raises(ValueError, match="inside a shard_map"):
        inside(q)
