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
from flax import struct

from erg_jax import fused, splash

Array = jax.Array
Implementation = Literal["einsum", "chunked", "fused", "cudnn", "splash"]
IMPLEMENTATIONS = ("einsum", "chunked", "fused", "cudnn", "splash")
# Above this many bytes of float32 logits (b * h * n * m * 4) the default einsum path
# switches to query chunks, which bound the memory and run faster once the attention
# matrix no longer fits the caches (``python -m launch.benchmark --only=attention``).
CHUNK_BYTES = 64 * 2**20


@struct.dataclass
class Energy:
    """Hopfield energy settings of one attention (or a stack of them).

    Fields are floats or arrays broadcastable to the query's (b, n, h) (for example one
    value per head, shape (h,)), or carry leading axes that a vmap or scan strips (one
    value per layer or per guidance branch). ``Energy()`` is standard attention.

    Attributes:
      tau: logit temperature; < 1 flattens the attention, > 1 sharpens it.
      alpha: scale of the retrieved pattern.
      gamma: step size of the update.
    """

    tau: Any = 1.0
    alpha: Any = 1.0
    gamma: Any = 1.0


def _concrete(x: Any) -> np.ndarray | None:
    """The value of x as numpy when it is known before tracing, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def check_positive(value: Any, name: str) -> None:
    """Raises ValueError when a concrete value is not a finite number > 0."""
    v = _concrete(value)
    if v is not None and not (np.all(v > 0) and np.all(np.isfinite(v))):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_energy(energy: Energy, name: str = "energy") -> None:
    """Validates the concrete fields of an Energy (tracers are left alone)."""
    if not isinstance(energy, Energy):
        raise ValueError(f"{name} must be an erg_jax.Energy, got {type(energy).__name__}")
    check_positive(energy.tau, f"{name}.tau")
    check_positive(energy.gamma, f"{name}.gamma")
    alpha = _concrete(energy.alpha)
    if alpha is not None and not np.all(np.isfinite(alpha)):
        raise ValueError(f"{name}.alpha must be finite, got {energy.alpha!r}")


def default_implementation(backend: str | None = None) -> Implementation:
    """The faster attention path of a backend (default: jax's) for logits that fit.

    CPU and TPU: the plain einsum path, as fast as jax.nn.dot_product_attention or
    faster. GPU: jax.nn.dot_product_attention, whose default is XLA's own attention;
    ``_pick_implementation`` moves half-precision inputs that cuDNN takes to its flash
    kernel (``python scripts/gpu_check.py``; on an H100 in bfloat16 it ran 1.8x faster
    than XLA's attention at 1024 tokens and 6.9x at 4096).
    """
    return "fused" if (backend or jax.default_backend()) == "gpu" else "einsum"


def cudnn_supports(q: Array, k: Array, bias: Array | None, mask: Array | None) -> bool:
    """Whether jax.nn's cuDNN flash kernel takes these inputs as ``energy_attention``
    hands them over: float16 or bfloat16, head_dim a multiple of 8 up to 128, no bias
    and no mask (those stay on the XLA path, which takes any shape)."""
    d = q.shape[-1]
    half = q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
    return half and d % 8 == 0 and d <= 128 and bias is None and mask is None


def chunk_budget(backend: str | None = None) -> int:
    """Bytes of float32 logits above which the default path splits queries into chunks:
    ``CHUNK_BYTES`` on CPU (the caches), 16x that on accelerators (their memory)."""
    return CHUNK_BYTES if (backend or jax.default_backend()) == "cpu" else 16 * CHUNK_BYTES


def _pick_implementation(
    q: Array, k: Array, bias: Array | None = None, mask: Array | None = None, backend=None
) -> Implementation:
    """The backend's default; cuDNN for half-precision GPU inputs it takes; splash for
    bfloat16 TPU inputs it takes from ``splash.MIN_KV`` keys on; query chunks when the
    attention matrix would not fit the backend's budget."""
    backend = backend or jax.default_backend()
    impl = default_implementation(backend)
    if backend == "gpu" and cudnn_supports(q, k, bias, mask):
        return "cudnn"
    # Splash by default only in bfloat16, as cuDNN on GPU: the kernel sets its own matmul
    # precision, where the einsum path follows ``precision`` for float32 inputs. Named,
    # splash takes float32 too.
    if (
        backend == "tpu"
        and q.dtype == jnp.bfloat16
        and k.shape[1] >= splash.MIN_KV
        and splash.problem(q, k, k, bias, mask) is None
    ):
        return "splash"
    b, n, h, _ = q.shape
    budget = chunk_budget(backend)
    if 4 * b * h * n * k.shape[1] > budget and _chunk_size(q, k, budget) < n:
        return "chunked"
    return impl


def _chunk_size(q: Array, k: Array, budget: int | None = None) -> int:
    """Query rows per chunk: (b, h, chunk, m) float32 logits within the budget, in as few
    chunks as the budget allows, of even size. Where the chunk does not divide n the last
    one starts at n - chunk and recomputes fewer rows than there are chunks (n = 4429,
    SD3's tokens at 1024 px, is 43 x 103: no divisor fits most budgets)."""
    b, n, h, _ = q.shape
    budget = chunk_budget() if budget is None else budget
    target = max(1, budget // (4 * b * h * k.shape[1]))
    count = -(-n // target)
    return -(-n // count)


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


def _per_query(x: Any, q: Array) -> Array:
    """An Energy field broadcast to (b, n, h) in float32."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.broadcast_to(x, q.shape[:3])


def _bhn(x: Array) -> Array:
    """(b, n, h) -> (b, h, n, 1), the logit layout of one query row."""
    return jnp.transpose(x, (0, 2, 1))[..., None]


def _heads_first(x: Array) -> Array:
    """(b, n, h, d) <-> (b, h, n, d)."""
    return jnp.swapaxes(x, 1, 2)


# Both products run head-major, (b, h, n, d) x (b, h, m, d): XLA's CPU backend then uses
# its fast batched matmul, where the (b, n, h, d) einsums fell to a slower strided one
# (DiT-S/2 attention with its output projection, batch 8: 53 -> 19 ms; 1.5x faster at
# 4096 tokens). The transposes are cheap next to either product.
def _logits(q, k, tau, bias, mask, scale, precision=None):
    """Tempered, masked logits tau * (beta * q.k + B) in float32, shape (b, h, n, m).

    Masked entries are float32's lowest value rather than -inf, so a row with every key
    masked is uniform over its m keys after the softmax (as on every other path) instead
    of 0 / 0.
    """
    b, n, h, d = q.shape
    hk, m = k.shape[2], k.shape[1]
    # tau * beta scales a float32 query, whose rounding is then float32's own, and costs
    # (n, d) products instead of (n, m). A narrower query would round it to its own
    # precision, 8 bits in bfloat16: a logit error that grows with tau (head_dim 72, tau
    # 100: 0.57 off a float64 reference where jax.nn is 0.013; docs/INTERFACES.md), so
    # there tau * beta scales the float32 product instead.
    fold = jnp.finfo(q.dtype).bits >= 32
    qs = _heads_first(q * (tau * scale)[..., None].astype(q.dtype) if fold else q)
    kt = _heads_first(k)
    if hk == h:
        s = jnp.einsum(
            "bhnd,bhmd->bhnm", qs, kt, preferred_element_type=jnp.float32, precision=precision
        )
    else:  # grouped-query: each kv head serves h // hk query heads
        qg = qs.reshape(b, hk, h // hk, n, d)
        s = jnp.einsum(
            "bkgnd,bkmd->bkgnm", qg, kt, preferred_element_type=jnp.float32, precision=precision
        )
        s = s.reshape(b, h, n, m)
    tau = _bhn(tau)
    if not fold:
        s = s * (tau * scale)
    if bias is not None:
        s = s + tau * bias.astype(jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    return s


def _attend_einsum(q, k, v, tau, bias, mask, scale, precision=None):
    p = jax.nn.softmax(_logits(q, k, tau, bias, mask, scale, precision), axis=-1)
    b, n, h, d = q.shape
    hk, m = k.shape[2], k.shape[1]
    p = p.astype(v.dtype)
    vt = _heads_first(v)
    if hk == h:
        out = jnp.einsum(
            "bhnm,bhmd->bhnd", p, vt, preferred_element_type=jnp.float32, precision=precision
        )
    else:
        out = jnp.einsum(
            "bkgnm,bkmd->bkgnd",
            p.reshape(b, hk, h // hk, n, m),
            vt,
            preferred_element_type=jnp.float32,
            precision=precision,
        )
    return _heads_first(out.reshape(b, h, n, d))


def _attend_chunked(q, k, v, tau, bias, mask, scale, precision=None):
    """The einsum path over query chunks (lax.scan): every row's softmax is the same, the
    (b, h, n, m) logits never exist at once. Queries are independent rows, so the last
    chunk, moved back to end at n, rewrites its overlap with the one before unchanged."""
    b, n, h, d = q.shape
    c = _chunk_size(q, k)
    if c == n:
        return _attend_einsum(q, k, v, tau, bias, mask, scale, precision)
    starts = np.minimum(np.arange(0, n, c), n - c)

    def rows(x, axis, start):
        # x carries the query axis at `axis` (length n) or broadcasts over it (length 1).
        if x is None or x.shape[axis] == 1:
            return x
        return jax.lax.dynamic_slice_in_dim(x, start, c, axis)

    def one(out, start):
        part = _attend_einsum(
            rows(q, 1, start),
            k,
            v,
            rows(tau, 1, start),
            rows(bias, 2, start),
            rows(mask, 2, start),
            scale,
            precision,
        )
        return jax.lax.dynamic_update_slice_in_dim(out, part.astype(out.dtype), start, 1), None

    out, _ = jax.lax.scan(one, jnp.zeros((b, n, h, d), jnp.float32), starts)
    return out


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
        paths do not (docs/INTERFACES.md, "Attention kernels").
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
    keep = None
    if implementation == "splash":
        splash.check(q, k, v, bias, mask)
        keep = splash.key_padding(mask, q.shape[0], k.shape[1])

    tau = _per_query(energy.tau, q)
    alpha = _per_query(energy.alpha, q)[..., None]
    gamma = _per_query(energy.gamma, q)[..., None]
    # Known alpha = gamma = 1 (standard attention, or a temperature alone): the update is
    # the retrieved pattern itself, so skip two passes over (b, n, h, d).
    plain = known_one(energy.alpha) and known_one(energy.gamma)
    x = q
    for _ in range(steps):
        if implementation == "einsum":
            retrieved = _attend_einsum(x, k, v, tau, bias, mask, scale, precision)
        elif implementation == "chunked":
            retrieved = _attend_chunked(x, k, v, tau, bias, mask, scale, precision)
        elif implementation == "splash":
            retrieved = fused.splash_attend(x, k, v, tau, keep, scale)
        else:
            retrieved = fused.dot_product(
                x, k, v, tau, bias, mask, scale, implementation, precision, fallback=chosen
            )
        x = retrieved if plain else (1.0 - gamma) * x + gamma * alpha * retrieved
        x = x.astype(q.dtype)
    return x


def known_one(x: Any) -> bool:
    """True when x is known before tracing (not a tracer) to be 1 everywhere."""
    v = _concrete(x)
    return v is not None and bool(np.all(v == 1.0))


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
    logits = _logits(
        q, k, _per_query(energy.tau, q), _as4d(bias, "bias"), _as4d(mask, "mask"), scale
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
    tau = _per_query(energy.tau, q)
    alpha = _per_query(energy.alpha, q)
    logits = _logits(q, k, tau, _as4d(bias, "bias"), None, scale)
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
