"""Measurements behind ``python -m launch.benchmark``: times and memory as ratios.

Every comparison is taken in one run on one machine, the contenders interleaved round
by round (this machine is shared and noisy), and reported as medians. Peak memory is
XLA's own account of the compiled program (temporary buffers plus outputs).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from erg_jax.energy import Energy, energy_attention


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 7) -> dict:
    """Median seconds of each no-argument function, measured round-robin after a warm-up."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compiled_bytes(fn, *args) -> int:
    """Temporary plus output bytes of the compiled program (XLA's memory analysis)."""
    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    if mem is None:
        return -1
    return int(mem.temp_size_in_bytes + mem.output_size_in_bytes)


def reference_einsum_attention(q, k, v):
    """Textbook attention, softmax(q k^T / sqrt(d)) v, written out with einsum."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(logits, axis=-1), v)


def attention_table(
    lengths=(256, 1024, 4096), batch=1, heads=8, head_dim=64, repeats=7
) -> list[dict]:
    """energy_attention (steps 1, traced tau) against the einsum and jax.nn references."""
    rows = []
    for n in lengths:
        ks = jax.random.split(jax.random.key(n), 3)
        q, k, v = (jax.random.normal(kk, (batch, n, heads, head_dim)) for kk in ks)
        tau = jnp.float32(0.5)
        contenders = {
            "energy_attention": lambda q, k, v, tau: energy_attention(q, k, v, Energy(tau=tau)),
            "einsum": lambda q, k, v, tau: reference_einsum_attention(q * tau, k, v),
            "dot_product_attention": lambda q, k, v, tau: jax.nn.dot_product_attention(
                q * tau, k, v
            ),
        }
        jitted = {name: jax.jit(fn) for name, fn in contenders.items()}
        secs = interleaved_medians(
            {name: (lambda f=f, a=(q, k, v, tau): f(*a)) for name, f in jitted.items()}, repeats
        )
        mem = {name: compiled_bytes(fn, q, k, v, tau) for name, fn in contenders.items()}
        best = min(secs["einsum"], secs["dot_product_attention"])
        rows.append(
            {
                "tokens": n,
                **{f"{name}_ms": 1e3 * s for name, s in secs.items()},
                **{f"{name}_mib": b / 2**20 for name, b in mem.items()},
                "ratio_to_faster_reference": secs["energy_attention"] / best,
            }
        )
    return rows
