"""Fused attention kernels behind energy attention's "fused", "cudnn" and "splash" paths.

A fused kernel takes one static scale and computes softmax(scale * q k^T + B) V in one
pass, with no (n, m) logits in memory. The temperature of ERG (Berrada Ifriqi et al.,
2025, eq. 4) is traced, so it cannot be that scale: it is folded into the query (and the
bias), ``tau * (beta * q.k + B) = beta * (tau q).k + tau B``, and one kernel serves every
temperature and every energy step.

The fold has a price in half precision: ``tau * q`` is rounded to q's dtype (8
significant bits in bfloat16), and that relative error of the query becomes a logit
error proportional to tau. The einsum paths (``energy.py``) scale the float32 logits of
a half-precision query instead and pay nothing; docs/INTERFACES.md ("Attention kernels")
tabulates what each path costs against a float64 reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from erg_jax import splash

Array = jax.Array


def fold(q: Array, factor: Array) -> Array:
    """q * factor with a single rounding to q's dtype.

    Args:
      q: (b, n, h, d) queries in any float dtype.
      factor: (b, n, h) float32, one multiplier per query and head.

    Returns:
      (b, n, h, d) in q's dtype. The product is formed in float32 (or q's wider dtype)
      and rounded once: casting the factor to bfloat16 first would round it too,
      doubling the error.
    """
    wide = jnp.promote_types(q.dtype, jnp.float32)
    return (q.astype(wide) * factor[..., None]).astype(q.dtype)


def dot_product(q, k, v, tau, bias, mask, scale, implementation, precision=None, fallback=False):
    """tau-tempered attention through ``jax.nn.dot_product_attention``, float32 output.

    Args:
      q: (b, n, h, d); k, v: (b, m, hk, d), h a multiple of hk.
      tau: (b, n, h) float32 temperatures.
      bias: None or float32-castable, broadcastable to (b, h, n, m); tempered here.
      mask: None or booleans broadcastable to (b, h, n, m) (4-d); True attends.
      scale: beta, a Python float: the kernel's own static scale, applied by XLA to its
        float32 logits (and by cuDNN to its accumulator), so only tau is folded and
        tau = 1 is jax.nn's attention bit for bit.
      implementation: "fused" (XLA's attention) or "cudnn" (jax.nn's cuDNN kernel).
      precision: matmul precision, or None for jax's default.
      fallback: when cuDNN refuses the inputs, use XLA's attention instead of raising
        (for a cuDNN path picked by default rather than named).

    Returns:
      (b, n, h, d) float32.
    """
    qt = fold(q, tau)
    tau_rows = jnp.transpose(tau, (0, 2, 1))[..., None]  # (b, h, n, 1)
    # XLA's attention adds the bias to its float32 logits, so it keeps float32; cuDNN
    # takes it in q's dtype.
    xla_bias = cudnn_bias = None
    if bias is not None:
        xla_bias = tau_rows * bias.astype(jnp.float32)
        xla_bias = jnp.broadcast_to(xla_bias, jnp.broadcast_shapes(xla_bias.shape, (1,) * 4))
        cudnn_bias = xla_bias.astype(q.dtype)

    def attend(impl=None, b=xla_bias):
        return jax.nn.dot_product_attention(
            qt, k, v, bias=b, mask=mask, scale=scale, implementation=impl
        )

    if implementation == "cudnn":
        try:
            return with_precision(precision, lambda: attend("cudnn", cudnn_bias))
        except (NotImplementedError, ValueError, RuntimeError):
            # cuDNN refuses some shapes (or is missing) when traced: a default choice
            # falls back to XLA's attention; a cuDNN path the caller named raises.
            if not fallback:
                raise
    return with_precision(precision, attend)


def splash_attend(q, k, v, tau, keep, scale):
    """tau-tempered attention through the splash kernel (``erg_jax.splash``).

    The kernel applies no scale at all, so tau * beta is folded into the query: one
    kernel, built once per shape, serves every temperature and every step.

    Args:
      q: (b, n, h, d); k, v: (b, m, hk, d); float32 or bfloat16, one dtype.
      tau: (b, n, h) float32 temperatures.
      keep: (b, m) key-padding booleans (True attends) or None.
      scale: beta, a Python float.

    Returns:
      (b, n, h, d) float32.
    """
    return splash.attend(fold(q, tau * scale), k, v, keep).astype(jnp.float32)


def with_precision(precision, fn):
    """fn() in float32, under ``precision`` when one is given; None keeps jax's default,
    including one the user set globally."""
    if precision is None:
        return fn().astype(jnp.float32)
    with jax.default_matmul_precision(precision_name(precision)):
        return fn().astype(jnp.float32)


def precision_name(precision) -> str | None:
    """A precision as ``jax.default_matmul_precision`` spells it."""
    if precision is None or isinstance(precision, str):
        return precision
    if isinstance(precision, jax.lax.Precision):
        return {"DEFAULT": "default", "HIGH": "high", "HIGHEST": "highest"}[precision.name]
    return None
