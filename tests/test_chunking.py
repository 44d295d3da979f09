"""Query chunks of energy attention at lengths with no good divisor: the chosen chunks
keep the logits within the backend's budget (in the plan and in the compiled program's
memory), and the uneven last chunk leaves every output row as the einsum path has it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import Energy, attention_kernels, energy_attention
from erg_jax.energy import _chunk_size, _pick_implementation, chunk_budget


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("n", [4429, 4099, 8191])  # SD3 at 1024 px (43 x 103); primes
def test_the_chunk_plan_stays_within_the_budget(n, backend):
    # SD3-sized self-attention in float32: the full logits are past both budgets, and the
    # largest divisor of n under either is below 64 (or is 1), where the chooser used to
    # give up and keep the whole length.
    b, h, d = 2, 24, 64
    q = jax.ShapeDtypeStruct((b, n, h, d), jnp.float32)
    budget = chunk_budget(backend)
    row = 4 * b * h * n  # float32 logits of one query row against n keys
    assert row * n > budget
    c = _chunk_size(q, q, budget)
    count = -(-n // c)
    assert c * row <= budget, (c, budget // row)
    assert count == -(-n // (budget // row))  # as few chunks as the budget allows
    assert count * c - n < count  # the last chunk recomputes fewer rows than chunks
    assert _pick_implementation(q, q, backend=backend) == "chunked"


def test_the_compiled_chunks_hold_less_than_the_full_logits(monkeypatch):
    # 1021 queries (prime) against 509 keys, budget 1 MiB: 128 rows a chunk. The full
    # logits are 8.3 MB; the compiled default path must hold a fraction of that, and be
    # the chunked loop (XLA on CPU may fuse the full path too, so compare with the
    # logits' byte count rather than with that path's own temp memory).
    b, n, m, h, d = 1, 1021, 509, 4, 16
    monkeypatch.setattr(attention_kernels, "CHUNK_BYTES", 2**20)
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, n, h, d))
    k = jax.random.normal(ks[1], (b, m, h, d))
    v = jax.random.normal(ks[2], (b, m, h, d))
    logits = 4 * b * h * n * m
    assert logits > 7 * 2**20
    assert _pick_implementation(q, k, backend="cpu") == "chunked"
    assert _chunk_size(q, k) * 4 * b * h * m <= 2**20

    fn = jax.jit(lambda q, k, v: energy_attention(q, k, v, Energy(tau=0.7)))
    lowered = fn.lower(q, k, v)
    assert "while" in lowered.as_text()  # the chunk loop, not one (n, m) product
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp < logits // 2, (temp, logits)
    ref = energy_attention(q, k, v, Energy(tau=0.7), implementation="einsum")
    np.testing.assert_allclose(np.asarray(fn(q, k, v)), np.asarray(ref), atol=1e-5)


def _inputs(b, n, m, h, hk, d, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in ((b, n, h, d), (b, m, hk, d), (b, m, hk, d))
    )
    bias = jnp.asarray(rng.standard_normal((b, h, n, m)), jnp.float32)
    mask = rng.random((b, 1, n, m)) < 0.6
    mask[..., 0] = True
    mask[1, 0, 46] = False  # a query that sees no key, in the last chunks' overlap (45-47)
    tau = jnp.asarray(rng.uniform(0.3, 1.5, (b, n, h)), jnp.float32)
    return q, k, v, bias, jnp.asarray(mask), tau


@pytest.mark.parametrize("per_query", [True, False])
def test_uneven_chunks_equal_the_einsum_path(per_query, monkeypatch):
    # 61 queries (prime), a budget of 16 rows: chunks start at 0, 16, 32 and 45, the last
    # overlapping the third by three rows. Temperature, bias and mask vary along the
    # queries (or broadcast over them), so a row paired with another row's settings, or
    # an overlap written from the wrong place, shows; with two energy steps too.
    b, n, m, h, hk, d = 2, 61, 23, 4, 2, 8
    monkeypatch.setattr(attention_kernels, "CHUNK_BYTES", 16 * 4 * b * h * m)
    q, k, v, bias, mask, tau = _inputs(b, n, m, h, hk, d)
    if not per_query:  # broadcast over the queries: a bias per key, key padding
        bias, mask, tau = bias[:, :, :1], mask[:, :, :1].at[..., -3:].set(False), 0.8
    assert _chunk_size(q, k) == 16

    @jax.jit  # one compilation for every path and step count
    def run(q, k, v, bias, mask):
        e = Energy(tau=tau, alpha=0.9, gamma=0.7)
        return {
            (str(impl), steps): energy_attention(
                q, k, v, e, bias=bias, mask=mask, steps=steps, implementation=impl
            )
            for impl in ("einsum", "chunked", None)  # None: the CPU default chunks here
            for steps in (1, 2)
        }

    outs = run(q, k, v, bias, mask)
    for (impl, steps), out in outs.items():
        ref = outs["einsum", steps]
        np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f"{impl} {steps}")
    if per_query:  # the query that sees no key reads the mean value (one step, gamma 1)
        out = energy_attention(q, k, v, Energy(tau=tau), bias=bias, mask=mask)
        want = jnp.repeat(v, h // hk, axis=2)[1].mean(0)
        np.testing.assert_allclose(np.asarray(out)[1, 46], np.asarray(want), atol=1e-5)


def test_a_budget_under_one_row_gives_one_row_chunks():
    q = jnp.zeros((2, 7, 4, 8))
    k = jnp.zeros((2, 1000, 4, 8))
    assert _chunk_size(q, k, budget=100) == 1  # a row needs 2 * 4 * 1000 * 4 bytes
    assert _chunk_size(q, k, budget=2 * 4 * 1000 * 4 * 3) == 3  # three rows: 3, 3, 1 -> 3


def test_shapes_that_do_not_fit_are_named_and_one_k_head_serves_all():
    q = jnp.ones((2, 5, 4, 8))
    with pytest.raises(ValueError, match="batch and head_dim must match"):
        energy_attention(q, jnp.ones((1, 5, 4, 8)), jnp.ones((1, 5, 4, 8)))
    with pytest.raises(ValueError, match="batch and head_dim must match"):
        energy_attention(q, jnp.ones((2, 5, 4, 6)), jnp.ones((2, 5, 4, 6)))
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k heads \(3\)"):
        energy_attention(q, jnp.ones((2, 5, 3, 8)), jnp.ones((2, 5, 3, 8)))
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k heads \(0\)"):
        energy_attention(q, jnp.ones((2, 5, 0, 8)), jnp.ones((2, 5, 0, 8)))
    with pytest.raises(ValueError, match=r"must be \(batch, length, heads, head_dim\)"):
        energy_attention(q, jnp.ones((2, 5, 32)), jnp.ones((2, 5, 32)))
    one = jnp.arange(2 * 5 * 8, dtype=jnp.float32).reshape(2, 5, 1, 8) / 80
    shared = energy_attention(q, one, one)  # multi-query: the one k / v head for every q head
    every = energy_attention(q, jnp.repeat(one, 4, axis=2), jnp.repeat(one, 4, axis=2))
    np.testing.assert_allclose(np.asarray(shared), np.asarray(every), rtol=1e-6, atol=1e-6)
