"""Energy attention: attention as a modern-Hopfield update with temperature.

Follows docs/METHOD.md ("Attention as an energy minimisation") and ERG (Berrada Ifriqi
et al., 2025, eq. 4-6).
For queries Q, keys K, values V, scale beta and additive bias B::

    logits(Q) = tau * (beta * Q K^T + B)           (masked entries excluded)
    Q_{i+1}   = (1 - gamma) * Q_i + gamma * alpha * softmax(logits(Q_i)) V

which is ``Q_i - gamma * (Q_i - alpha * softmax(.) V)`` written so that Energy() with one
step returns the attention output bit for bit. With V = K one step is a gradient step on

    E(xi) = -(alpha / (tau * beta)) * logsumexp_j(tau * (beta * xi.k_j + B_j)) + |xi|^2 / 2.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax import attention_kernels, context_parallel

# The settings and the path choice, importable from here as before (Energy is the one
# class); the chunk plan and the chooser also under the private names the tests import.
from erg_jax.attention_kernels import (  # noqa: F401  (re-exported)
    CHUNK_BYTES,
    LOCAL_IMPLEMENTATIONS,
    Energy,
    chunk_budget,
    concrete,
    cudnn_supports,
    default_implementation,
    known_one,
    per_query,
)
from erg_jax.attention_kernels import chunk_size as _chunk_size  # noqa: F401
from erg_jax.attention_kernels import pick_implementation as _pick_implementation

Array = jax.Array
Implementation = Literal["einsum", "chunked", "fused", "cudnn", "splash", "ring", "ulysses"]
IMPLEMENTATIONS = (*LOCAL_IMPLEMENTATIONS, "ring", "ulysses")


def check_positive(value: Any, name: str) -> None:
    """Raises ValueError when a concrete value is not a finite number > 0."""
    v = concrete(value)
    if v is not None and not (np.all(v > 0) and np.all(np.isfinite(v))):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_energy(energy: Energy, name: str = "energy") -> None:
    """Validates the concrete fields of an Energy (tracers are left alone)."""
    if not isinstance(energy, Energy):
        raise ValueError(f"{name} must be an erg_jax.Energy, got {type(energy).__name__}")
    check_positive(energy.tau, f"{name}.tau")
    check_positive(energy.gamma, f"{name}.gamma")
    alpha = concrete(energy.alpha)
    if alpha is not None and not np.all(np.isfinite(alpha)):
        raise ValueError(f"{name}.alpha must be finite, got {energy.alpha!r}")


def _check_qkv(q: Array, k: Array, v: Array | None) -> None:
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(
            "q and k must be (batch, length, heads, head_dim), got shapes "
            f"q={tuple(q.shape)} k={tuple(k.shape)}"
        )
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k shape {tuple(k.shape)} does not fit q shape {tuple(q.shape)}: batch and "
            "head_dim must match"
        )
    if k.shape[2] < 1 or h % k.shape[2]:
        raise ValueError(
            f"q heads ({h}) must be a multiple of k heads ({k.shape[2]}) (grouped-query)"
        )
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)} (the energy "
            "update maps values back into query space)"
        )


def _as4d(x: Array | None, name: str) -> Array | None:
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f"{name} must broadcast to (batch, heads, q_len, kv_len), got {x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def energy_attention(
    q: Array,
    k: Array,
    v: Array,
    energy: Energy = Energy(),
    *,
    steps: int = 1,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    implementation: Implementation | None = None,
    precision: str | jax.lax.Precision | None = None,
) -> Array:
    """Multi-step Hopfield attention update (docs/METHOD.md).

    Args:
      q: queries (b, n, h, d).
      k: keys (b, m, hk, d) with h a multiple of hk (grouped-query attention).
      v: values (b, m, hk, d).
      energy: tau, alpha, gamma; floats or arrays broadcastable to (b, n, h). Traced.
      steps: number of updates K (static); 1 with Energy() is standard attention.
      bias: additive logit bias broadcastable to (b, h, n, m); it is tempered too.
      mask: boolean, broadcastable to (b, h, n, m); True attends. Masked entries stay
        masked at any temperature; a query with every key masked attends to all m
        keys uniformly.
      scale: beta; defaults to 1 / sqrt(d). T5 passes 1.
      implementation: "einsum" (plain XLA), "chunked" (einsum over query chunks, bounded
        memory), "fused" (jax.nn.dot_product_attention), "cudnn" (its cuDNN flash
        kernel) or "splash" (the Pallas TPU flash kernel, ``erg_jax.splash``: TPU, or
        CPU in interpret mode for tests; float32 or bfloat16, no bias, a mask only as
        key padding (b, 1, 1, m); else ValueError); None picks the faster for the
        backend and the sequence length. The last three fold tau into the query
        (``erg_jax.fused``), which in bfloat16 costs accuracy as tau grows; the einsum
        paths do not (docs/INTERFACES.md, "Attention kernels"). "ring" and "ulysses"
        split the sequence over the mesh axis "context" of ``jax.set_mesh``
        (``erg_jax.context_parallel``).
      precision: matmul precision ("default", "high", "highest" or a lax.Precision);
        None follows jax's default. The splash kernel sets its own.

    Returns:
      The updated queries Q_steps, shaped and typed like q.
    """
    _check_qkv(q, k, v)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    chosen = implementation is None
    if chosen:
        implementation = _pick_implementation(q, k, bias, mask)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    check_energy(energy)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    bias, mask = _as4d(bias, "bias"), _as4d(mask, "mask")
    if mask is not None:
        mask = mask.astype(bool)
    kw = dict(steps=steps, bias=bias, mask=mask, scale=scale, precision=precision)
    if implementation in ("ring", "ulysses"):
        return context_parallel.attend(implementation, q, k, v, energy, **kw)
    return attention_kernels.local_energy_attention(
        q, k, v, energy, implementation=implementation, fallback=chosen, **kw
    )


def attention_weights(
    q: Array,
    k: Array,
    energy: Energy = Energy(),
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Softmax attention weights (b, h, n, m) at the energy's temperature, in float32:
    the distribution ``energy_attention`` reads the values with. Masked keys weigh zero;
    a query with every key masked weighs all m keys equally, as the einsum, chunked,
    fused and splash paths do."""
    _check_qkv(q, k, None)
    check_energy(energy)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    logits = attention_kernels.logits(
        q, k, per_query(energy.tau, q), _as4d(bias, "bias"), _as4d(mask, "mask"), scale
    )
    return jax.nn.softmax(logits, axis=-1)


def hopfield_energy(
    q: Array,
    k: Array,
    energy: Energy = Energy(),
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
) -> Array:
    """The energy E(xi) of every query (docs/METHOD.md), shape (b, n, h), float32.

    Its gradient in q is ``q - alpha * p K`` with p the ``attention_weights`` (keys
    repeated over query groups), so with v = k one ``energy_attention`` step is
    ``q - gamma * grad E`` for every query.

    A query with every key masked: ``energy_attention`` attends to all m keys uniformly
    there (on every path that takes a mask), so E is the free energy at that uniform p,
    with l_j = tau * (beta * xi.k_j + B_j) the logits before masking::

        E(xi) = -(alpha / (tau * beta)) * (mean_j l_j + log m) + |xi|^2 / 2.

    That is E's own variational form, log sum_j exp l_j = max_p (sum_j p_j l_j + H(p)),
    held at the p the update uses (for any other query the max is the softmax, and the
    two agree), so it is finite and keeps the gradient identity above. The log-sum-exp
    over no key would be -inf, and E +inf.
    """
    _check_qkv(q, k, None)
    check_energy(energy)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    tau = per_query(energy.tau, q)
    alpha = per_query(energy.alpha, q)
    logits = attention_kernels.logits(q, k, tau, _as4d(bias, "bias"), None, scale)
    mask = _as4d(mask, "mask")
    if mask is None:
        lse = jax.nn.logsumexp(logits, axis=-1)
    else:
        mask = jnp.broadcast_to(mask.astype(bool), logits.shape)
        # float32's lowest, not -inf, for masked keys: the branch a fully masked row
        # leaves unselected stays finite, and so does its (zero) share of the gradient.
        kept = jax.nn.logsumexp(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
        uniform = jnp.mean(logits, axis=-1) + math.log(k.shape[1])
        lse = jnp.where(jnp.any(mask, axis=-1), kept, uniform)
    lse = jnp.transpose(lse, (0, 2, 1))
    sq = 0.5 * jnp.sum(jnp.square(q.astype(jnp.float32)), axis=-1)
    return -(alpha / (tau * scale)) * lse + sq


def attention_entropy(
    q: Array,
    k: Array,
    energy: Energy = Energy(),
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
) -> Array:
    """Shannon entropy (nats) of each query's attention distribution, (b, n, h), float32.

    The distribution is ``attention_weights``, the one ``energy_attention`` reads with:
    masked keys weigh zero, so a query keeping j keys has entropy at most log(j); a
    query with every key masked attends to all m keys uniformly (the einsum, chunked,
    fused and splash paths agree), so its entropy is log(m): finite, like its output.
    """
    p = attention_weights(q, k, energy, bias=bias, mask=mask, scale=scale)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.transpose(-jnp.sum(plogp, axis=-1), (0, 2, 1))
