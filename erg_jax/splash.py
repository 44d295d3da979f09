"""Splash attention: JAX's Pallas TPU flash kernel behind energy attention's "splash" path.

Computes softmax(Q K^T) V per head, blockwise with an online softmax (FlashAttention,
Dao et al., 2022), through ``jax.experimental.pallas.ops.tpu.splash_attention``, the
kernel maxdiffusion runs as its TPU "flash" attention. The kernel applies no scale:
``erg_jax.fused`` hands over queries already multiplied by tau * beta, so one kernel, built
once per shape, serves every temperature and every step of the update.

Of JAX's two Pallas TPU attention kernels this is the one with an interpret mode, so the
CPU tests run the very kernel a TPU compiles (``pallas.ops.tpu.flash_attention`` has
none and could only be checked on a TPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

Array = jax.Array
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# The kernel's tiles are multiples of the TPU's 128 lanes, along both sequences and the
# head dimension; shorter or ragged inputs are zero-padded to them.
LANES = 128
BLOCKS = (512, 256, 128)
# The default path takes splash from this many keys on. Below one 128-lane tile the padding
# is most of the kernel's work, while the (n, m) logits are small enough that the plain
# einsum costs little (the 77-token text encoders stay on it).
MIN_KV = 128


def _mask_shape(mask) -> tuple[int, ...]:
    shape = tuple(np.shape(mask))
    return (1,) * (4 - len(shape)) + shape


def is_key_padding(mask, b: int, m: int) -> bool:
    """Whether a mask broadcasts to (b, 1, 1, m): one set of kept keys per batch element,
    the same for every head and query."""
    shape = tuple(np.shape(mask))
    if len(shape) > 4:
        return False
    mb, mh, mn, mm = _mask_shape(mask)
    return mh == 1 and mn == 1 and mb in (1, b) and mm in (1, m)


def problem(q, k, v, bias=None, mask=None) -> str | None:
    """Why the splash path cannot take these inputs (shapes and dtypes only), or None.

    Args:
      q: (b, n, h, d) queries, or anything with .shape and .dtype.
      k, v: (b, m, hk, d) keys and values.
      bias: must be None.
      mask: None or a key-padding mask broadcastable to (b, 1, 1, m).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in DTYPES:
            return f"{name} dtype {jnp.dtype(x.dtype).name}: it takes float32 or bfloat16"
    if jnp.dtype(k.dtype) != jnp.dtype(q.dtype) or jnp.dtype(v.dtype) != jnp.dtype(q.dtype):
        return (
            f"q, k, v dtypes {jnp.dtype(q.dtype).name}, {jnp.dtype(k.dtype).name}, "
            f"{jnp.dtype(v.dtype).name}: it takes one dtype for all three"
        )
    if bias is not None:
        return (
            f"bias of shape {tuple(np.shape(bias))}: it takes no bias (use 'einsum', "
            "'chunked' or 'fused')"
        )
    if mask is not None and not is_key_padding(mask, q.shape[0], k.shape[1]):
        return (
            f"mask of shape {tuple(np.shape(mask))}: it takes only a key-padding mask, "
            "broadcastable to (b, 1, 1, m) (use 'einsum', 'chunked' or 'fused')"
        )
    return None


def check(q, k, v, bias=None, mask=None, backend: str | None = None) -> None:
    """Raises ValueError, naming the argument, when the splash path cannot take the inputs
    on this backend; static shape and dtype checks, so before anything compiles."""
    backend = backend or jax.default_backend()
    if backend not in ("tpu", "cpu"):
        raise ValueError(
            f"implementation='splash' is TPU-only (a Pallas TPU kernel; CPU runs it in "
            f"interpret mode for tests), got backend {backend!r}; on GPU use 'cudnn' or "
            "'fused'"
        )
    why = problem(q, k, v, bias, mask)
    if why is not None:
        raise ValueError(f"implementation='splash' cannot take {why}")


def key_padding(mask: Array | None, b: int, m: int) -> Array | None:
    """A key-padding mask (see ``is_key_padding``) as (b, m) booleans; True attends."""
    if mask is None:
        return None
    mask = jnp.asarray(mask).reshape(_mask_shape(mask))
    return jnp.broadcast_to(mask[:, 0, 0, :].astype(bool), (b, m))


def _round_up(x: int) -> int:
    return -(-x // LANES) * LANES


def _block(length: int) -> int:
    """The largest tile in BLOCKS dividing a padded length (a multiple of LANES)."""
    return next(b for b in BLOCKS if length % b == 0)


def _kernel(heads: int, n: int, m: int, mqa: bool, interpret: bool):
    """The splash kernel for (heads, n, d) queries against (m, d) keys per kv head, padded
    lengths n and m (the mask analysis runs in numpy). Built afresh in every trace: a
    kernel cached across traces can hold a tracer of the first (its block tables are jax
    arrays), which a scanned or partially evaluated body then finds out of scope."""
    bq, bkv = _block(n), _block(m)
    blocks = sa.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        # Backward tiles too, so training differentiates through the kernel.
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    mask = sa.MultiHeadMask([sa.FullMask((n, m))] * heads)
    make = sa.make_splash_mqa if mqa else sa.make_splash_mha
    return make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _pad(x: Array, axis: int, size: int) -> Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _local(q: Array, k: Array, v: Array, keep: Array | None = None, *, interpret: bool) -> Array:
    """The kernel on one device's (b, n, h, d) / (b, m, hk, d) blocks; see ``attend``."""
    b, n, h, d = q.shape
    m, hk = k.shape[1], k.shape[2]
    np_, mp, dp = _round_up(n), _round_up(m), _round_up(d)
    # Zero head-dim columns leave q.k unchanged and give zero output columns (sliced off);
    # padded keys get kv segment 0 so no query (segment 1) sees them; padded query rows
    # attend like any other and are dropped.
    q = _pad(_pad(q, 1, np_), 3, dp)
    k = _pad(_pad(k, 1, mp), 3, dp)
    v = _pad(_pad(v, 1, mp), 3, dp)
    if keep is None and mp > m:
        keep = jnp.ones((b, m), bool)
    elif keep is not None:
        # A batch element with every key masked: the einsum path's softmax is uniform over
        # its m keys, the kernel's would spread over the padding too. Zero queries against
        # all m keys give the einsum path's answer.
        empty = ~jnp.any(keep, axis=1)
        keep = keep | empty[:, None]
        q = jnp.where(empty[:, None, None, None], jnp.zeros_like(q), q)
    kv_ids = None if keep is None else _pad(keep.astype(jnp.int32), 1, mp)
    q_ids = jnp.ones((np_,), jnp.int32)
    mqa = hk != h
    kernel = _kernel(h // hk if mqa else h, np_, mp, mqa, interpret)

    def one(qb, kb, vb, ids):
        # qb (h, n, d), kb and vb (hk, m, d), ids (m,) or None: one batch element.
        seg = None if ids is None else sa.SegmentIds(q_ids, ids)
        if not mqa:
            return kernel(qb, kb, vb, segment_ids=seg)
        # Grouped-query: the MQA kernel per kv head, over the query heads it serves.
        qg = qb.reshape(hk, h // hk, np_, dp)
        out = jax.vmap(lambda qi, ki, vi: kernel(qi, ki, vi, segment_ids=seg))(qg, kb, vb)
        return out.reshape(h, np_, dp)

    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    out = jax.vmap(one)(heads_first(q), heads_first(k), heads_first(v), kv_ids)
    return heads_first(out)[:, :n, :, :d]


def _specs(mesh, b: int, h: int, hk: int) -> tuple[P, P]:
    """shard_map specs of (b, n, h, d) and (b, m) arrays: batch over the data axes ("data",
    "fsdp", those of size > 1) when they divide it, heads over "tensor" when it divides
    both head counts; anything else replicated."""
    size = dict(mesh.shape)
    batch = tuple(a for a in ("data", "fsdp") if size.get(a, 1) > 1)
    if not batch or b % math.prod(size[a] for a in batch):
        batch = None
    t = size.get("tensor", 1)
    heads = "tensor" if t > 1 and h % t == 0 and hk % t == 0 else None
    return P(batch, None, heads, None), P(batch, None)


def attend(q: Array, k: Array, v: Array, keep: Array | None = None, *, interpret=None) -> Array:
    """softmax(q k^T) v per head with the splash kernel; no scale is applied.

    Under a mesh (``jax.set_mesh``) of more than one device the call is wrapped in a
    shard_map, since GSPMD does not partition a Pallas kernel: batch over "data"/"fsdp",
    heads over "tensor", where they divide (``_specs``). Inside a shard_map that already
    made some mesh axes manual it runs as is on the local blocks.

    Args:
      q: (b, n, h, d) queries, tau * beta already folded in; float32 or bfloat16.
      k: (b, m, hk, d) keys, h a multiple of hk, q's dtype.
      v: (b, m, hk, d) values, q's dtype.
      keep: (b, m) booleans, True attends (a key-padding mask), or None. A batch
        element with no key kept attends uniformly to all m, as the einsum path does.
      interpret: Pallas interpret mode; None means on CPU only. Interpret mode is for
        tests and is slow: its timings say nothing of the kernel's speed.

    Returns:
      (b, n, h, d) in q's dtype.
    """
    interpret = jax.default_backend() == "cpu" if interpret is None else bool(interpret)
    local = functools.partial(_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return local(q, k, v, keep)
    qspec, kspec = _specs(mesh, q.shape[0], q.shape[2], k.shape[2])
    args, specs = (q, k, v), (qspec, qspec, qspec)
    if keep is not None:
        args, specs = args + (keep,), specs + (kspec,)
    # check_vma off: the kernel declares its outputs without the varying-axes types that
    # check_vma asks of every pallas_call inside a shard_map.
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=specs,
        out_specs=qspec,
        check_vma=False,
    )(*args)
