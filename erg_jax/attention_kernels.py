"""Energy attention on one device: the Energy settings, the tempered logits, the paths
that compute softmax(logits) V, the choice among them per backend, and the multi-step
update ``Q <- (1 - gamma) Q + gamma * alpha * softmax(tau * (beta * Q K^T + B)) V``
(docs/METHOD.md; ERG, Berrada Ifriqi et al., 2025, eq. 4-6).

``erg_jax.energy`` checks the arguments and holds the public API; ``erg_jax.context_parallel``
builds its ring and Ulysses schemes from the pieces here.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from erg_jax import fused, splash

Array = jax.Array
LocalImplementation = Literal["einsum", "chunked", "fused", "cudnn", "splash"]
LOCAL_IMPLEMENTATIONS = ("einsum", "chunked", "fused", "cudnn", "splash")
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


def concrete(x: Any) -> np.ndarray | None:
    """The value of x as numpy when it is known before tracing, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def known_one(x: Any) -> bool:
    """True when x is known before tracing (not a tracer) to be 1 everywhere."""
    v = concrete(x)
    return v is not None and bool(np.all(v == 1.0))


def default_implementation(backend: str | None = None) -> LocalImplementation:
    """The faster attention path of a backend (default: jax's) for logits that fit.

    CPU and TPU: the plain einsum path, as fast as jax.nn.dot_product_attention or
    faster. GPU: jax.nn.dot_product_attention, whose default is XLA's own attention;
    ``pick_implementation`` moves half-precision inputs that cuDNN takes to its flash
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


def pick_implementation(
    q: Array, k: Array, bias: Array | None = None, mask: Array | None = None, backend=None
) -> LocalImplementation:
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
    if 4 * b * h * n * k.shape[1] > budget and chunk_size(q, k, budget) < n:
        return "chunked"
    return impl


def chunk_size(q: Array, k: Array, budget: int | None = None) -> int:
    """Query rows per chunk: (b, h, chunk, m) float32 logits within the budget, in as few
    chunks as the budget allows, of even size. Where the chunk does not divide n the last
    one starts at n - chunk and recomputes fewer rows than there are chunks (n = 4429,
    SD3's tokens at 1024 px, is 43 x 103: no divisor fits most budgets)."""
    b, n, h, _ = q.shape
    budget = chunk_budget() if budget is None else budget
    target = max(1, budget // (4 * b * h * k.shape[1]))
    count = -(-n // target)
    return -(-n // count)


def per_query(x: Any, q: Array) -> Array:
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
def logits(q, k, tau, bias, mask, scale, precision=None):
    """Tempered, masked logits tau * (beta * q.k + B) in float32, shape (b, h, n, m).

    Masked entries are float32's lowest value rather than -inf, so a row with every key
    masked is uniform over its m keys after the softmax (as on every other path) instead
    of 0 / 0.

    Args:
      q: (b, n, h, d) queries; k: (b, m, hk, d) keys, h a multiple of hk.
      tau: (b, n, h) float32 temperatures.
      bias, mask: None or 4-d, broadcastable to (b, h, n, m); True attends.
      scale: beta, a Python float.
      precision: matmul precision, or None for jax's default.
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


def weigh(p: Array, v: Array, precision=None) -> Array:
    """(b, h, n, m) weights times (b, m, hk, d) values -> (b, h, n, d) float32, each kv
    head serving h // hk query heads."""
    b, h, n, m = p.shape
    hk, d = v.shape[2], v.shape[3]
    p = p.astype(v.dtype)
    vt = _heads_first(v)
    if hk == h:
        return jnp.einsum(
            "bhnm,bhmd->bhnd", p, vt, preferred_element_type=jnp.float32, precision=precision
        )
    out = jnp.einsum(
        "bkgnm,bkmd->bkgnd",
        p.reshape(b, hk, h // hk, n, m),
        vt,
        preferred_element_type=jnp.float32,
        precision=precision,
    )
    return out.reshape(b, h, n, d)


def _attend_einsum(q, k, v, tau, bias, mask, scale, precision=None):
    p = jax.nn.softmax(logits(q, k, tau, bias, mask, scale, precision), axis=-1)
    return _heads_first(weigh(p, v, precision))


def _attend_chunked(q, k, v, tau, bias, mask, scale, precision=None):
    """The einsum path over query chunks (lax.scan): every row's softmax is the same, the
    (b, h, n, m) logits never exist at once. Queries are independent rows, so the last
    chunk, moved back to end at n, rewrites its overlap with the one before unchanged."""
    b, n, h, d = q.shape
    c = chunk_size(q, k)
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


def local_energy_attention(
    q: Array,
    k: Array,
    v: Array,
    energy: Energy,
    *,
    steps: int,
    bias: Array | None,
    mask: Array | None,
    scale: float,
    implementation: LocalImplementation | None = None,
    precision: Any = None,
    fallback: bool = False,
) -> Array:
    """``energy_attention`` on one device, its arguments already checked and normalised.

    Args:
      q: (b, n, h, d) queries; k, v: (b, m, hk, d), h a multiple of hk.
      energy: a checked Energy; fields broadcastable to (b, n, h).
      steps: number of energy updates (static), >= 1.
      bias: None or a 4-d additive logit bias broadcastable to (b, h, n, m).
      mask: None or 4-d booleans broadcastable to (b, h, n, m); True attends.
      scale: beta, a Python float.
      implementation: one of ``LOCAL_IMPLEMENTATIONS``, or None for
        ``pick_implementation``'s choice on these inputs.
      precision: matmul precision, or None for jax's default.
      fallback: run XLA's attention where cuDNN refuses the inputs instead of raising;
        always so for an implementation picked here.

    Returns:
      The updated queries Q_steps, shaped and typed like q.
    """
    if implementation is None:
        implementation, fallback = pick_implementation(q, k, bias, mask), True
    keep = None
    if implementation == "splash":
        splash.check(q, k, v, bias, mask)
        keep = splash.key_padding(mask, q.shape[0], k.shape[1])

    tau = per_query(energy.tau, q)
    alpha = per_query(energy.alpha, q)[..., None]
    gamma = per_query(energy.gamma, q)[..., None]
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
                x, k, v, tau, bias, mask, scale, implementation, precision, fallback=fallback
            )
        x = retrieved if plain else (1.0 - gamma) * x + gamma * alpha * retrieved
        x = x.astype(q.dtype)
    return x
