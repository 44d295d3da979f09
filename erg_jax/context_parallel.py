"""Context parallelism for energy attention: the sequence split over a "context" mesh axis.

Energy attention (``erg_jax.energy``) updates the queries by
``Q <- Q - gamma * (Q - alpha * softmax(tau * (beta * Q K^T + B)) V)``. When one device
cannot hold a long sequence, its tokens are split over the devices of a mesh axis named
"context" (every array sharded along its length), and one of two schemes computes the
same update as a single device would:

- "ring" (Ring Attention; Liu, Zaharia and Abbeel, 2023): every device keeps its block of
  queries; the key and value blocks are passed around the ring of devices
  (``lax.ppermute``), one hop per block, and each device folds every block into a running
  softmax (running maximum, sum and weighted values in float32, as in blockwise flash
  attention). The queries change with every energy step while K and V do not, so each
  step is one more trip of the blocks around the ring. No device holds more than one
  (n/P, m/P) block of logits at a time (a bias or mask: its n/P rows, all m columns).
- "ulysses" (DeepSpeed-Ulysses; Jacobs et al., 2023): one all-to-all trades the sequence
  split for a head split, so that each device holds the whole sequence for h/P of the
  heads; the ordinary single-device energy attention runs there (all steps, with any
  local implementation), and a second all-to-all trades back. Needs the heads to divide
  by the context size; takes two all-to-alls per call whatever the number of steps.

Both are entered through ``energy_attention(..., implementation="ring" | "ulysses")``
under ``jax.set_mesh(mesh)``. Lengths that do not divide the context size are padded
inside and the padding never attends or is attended to, so the results equal the
unsharded ones (a query whose keys are all masked attends to all m real keys uniformly,
as on the other paths).

Mesh axes (``_axes``), by the fixed convention of the splash kernel's shard_map
(``erg_jax.splash``): the sequence goes over "context", the batch over "data" and "fsdp",
the heads over "tensor", each only where present in the mesh, not manual and of size > 1,
and only where they divide the dimension (else that dimension is not split); any other
mesh axis holds copies. Bias and mask rows go with the queries; the ring keeps all their
columns on the device and slices the block of the keys in hand, Ulysses keeps whole
(n, m) planes for its heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from erg_jax import attention_kernels as kernels

Array = jax.Array
AXIS = "context"
# The mesh axes the batch and the heads go over, where present (``_axes``): those of
# ``erg_jax.splash``'s shard_map, and the default logical-axis rules of ``erg_jax.sharding``.
BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)


def attend(
    implementation: str,
    q: Array,
    k: Array,
    v: Array,
    energy: kernels.Energy,
    *,
    steps: int,
    bias: Array | None,
    mask: Array | None,
    scale: float,
    precision: Any = None,
) -> Array:
    """``energy_attention`` with the sequence sharded over the mesh axis "context".

    Called by ``energy_attention`` with its arguments checked and normalised.

    Args:
      implementation: "ring" or "ulysses".
      q: (b, n, h, d) queries; k, v: (b, m, hk, d), h a multiple of hk.
      energy: a checked Energy; fields broadcastable to (b, n, h).
      steps: number of energy updates (static).
      bias: None or (b or 1, h or 1, n or 1, m or 1) additive logit bias.
      mask: None or booleans shaped like a bias; True attends.
      scale: beta, a Python float.
      precision: matmul precision or None.

    Returns:
      The updated queries, shaped and typed like q.

    Raises:
      ValueError: no mesh axis "context" in the current mesh (``jax.set_mesh``), a call
        inside a shard_map that already split "context", a bias or mask dimension other
        than 1 or the full size, or (Ulysses) heads the context size does not divide.
    """
    mesh = jax.sharding.get_abstract_mesh()
    names = () if mesh.empty else tuple(mesh.axis_names)
    if AXIS not in names:
        raise ValueError(
            f"implementation={implementation!r} splits the sequence over a mesh axis named "
            f"{AXIS!r}: call it under jax.set_mesh(mesh) with such an axis (current mesh "
            f"axes: {names or 'none'})"
        )
    if AXIS in mesh.manual_axes:
        raise ValueError(
            f"implementation={implementation!r} was called inside a shard_map over "
            f"{AXIS!r}: it shards over that axis itself; call it outside, or call another "
            "implementation on the local blocks"
        )
    b, n, h, _ = q.shape
    m = k.shape[1]
    full = (b, h, n, m)
    for name, x in (("bias", bias), ("mask", mask)):
        if x is not None and any(s not in (1, f) for s, f in zip(x.shape, full, strict=True)):
            raise ValueError(
                f"{name} of shape {tuple(x.shape)}: implementation={implementation!r} takes "
                f"each dimension of (batch, heads, q_len, kv_len) = {full} or 1"
            )
    run = _ring if implementation == "ring" else _ulysses
    return run(mesh, q, k, v, energy, steps, bias, mask, scale, precision)


def _axes(mesh, wanted: tuple[str, ...], sizes: tuple[int, ...]) -> tuple[str, ...]:
    """The mesh axes among ``wanted`` that split every one of ``sizes``: present, not
    manual, not "context", of size > 1; none unless their product divides each size."""
    shape = dict(mesh.shape)
    axes = tuple(
        a for a in wanted if a in shape and a != AXIS and a not in mesh.manual_axes and shape[a] > 1
    )
    count = math.prod(shape[a] for a in axes)
    return axes if axes and all(s % count == 0 for s in sizes) else ()


def _entry(*axes: str) -> Any:
    """A PartitionSpec entry for a tuple of mesh axes (None for none)."""
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _round_up(x: int, size: int) -> int:
    return -(-x // size) * size


def _pad(x: Array, axis: int, size: int) -> Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _fields(energy: kernels.Energy, q: Array, n_to: int) -> tuple[dict, dict]:
    """Energy fields split into Python floats (values known before tracing, the same for
    every query: no array to shard, and the local attention can still see alpha = gamma
    = 1) and (b, n_to, h) float32 arrays, padded along the queries."""
    static, arrays = {}, {}
    for name in ("tau", "alpha", "gamma"):
        value = getattr(energy, name)
        known = kernels.concrete(value)
        if known is not None and known.size == 1:
            static[name] = float(known.reshape(()))
        else:
            arrays[name] = _pad(kernels.per_query(value, q), 1, n_to)
    return static, arrays


def _shard_map(body: Callable, mesh, args: dict, specs: dict, out_spec: P, pad: int, vma=True):
    """body over the mesh on args (a dict), its (b, n + pad, h, d) output cut to n rows.
    ``vma=False`` where body may hold a Pallas kernel (splash), whose outputs carry no
    varying-axes types."""
    if mesh.explicit_axes:  # sharding in types: shard_map takes inputs as specified only
        args = jax.reshard(args, specs)
    run = jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=out_spec, check_vma=vma)
    out = run(args)
    n = args["q"].shape[1] - pad
    if pad and mesh.explicit_axes:  # no uneven slice of a sharded length: gather it first
        out = jax.reshard(out, P(out_spec[0], None, *out_spec[2:]))
    return out[:, :n]


def _ring(mesh, q, k, v, energy, steps, bias, mask, scale, precision):
    b, n, h, _ = q.shape
    m, hk = k.shape[1], k.shape[2]
    size = mesh.shape[AXIS]
    batch = _axes(mesh, BATCH_AXES, (b,))
    heads = _axes(mesh, HEAD_AXES, (h, hk))
    n_to, m_to = _round_up(n, size), _round_up(m, size)
    static, arrays = _fields(energy, q, n_to)
    plain = kernels.known_one(energy.alpha) and kernels.known_one(energy.gamma)

    row = P(_entry(*batch), AXIS, _entry(*heads), None)
    args = {"q": _pad(q, 1, n_to), "k": _pad(k, 1, m_to), "v": _pad(v, 1, m_to)}
    specs = {"q": row, "k": row, "v": row}
    for name, x in arrays.items():
        args[name], specs[name] = x, P(*row[:3])
    for name, x in (("bias", bias), ("mask", mask)):
        if x is None:
            continue
        # Rows (if any) travel with their queries; all m columns stay on every device.
        rows, cols = x.shape[2] == n, x.shape[3] == m
        args[name] = _pad(_pad(x, 2, n_to if rows else 1), 3, m_to if cols else 1)
        specs[name] = P(
            _entry(*batch) if x.shape[0] == b else None,
            _entry(*heads) if x.shape[1] == h else None,
            AXIS if rows else None,
            None,
        )

    def body(a):
        x = a["q"]
        field = lambda name: kernels.per_query(a.get(name, static.get(name)), x)
        tau, alpha, gamma = field("tau"), field("alpha")[..., None], field("gamma")[..., None]
        for _ in range(steps):
            retrieved = _ring_pass(
                x, a["k"], a["v"], tau, a.get("bias"), a.get("mask"), scale, precision, m
            )
            x = retrieved if plain else (1.0 - gamma) * x + gamma * alpha * retrieved
            x = x.astype(q.dtype)
        return x

    return _shard_map(body, mesh, args, specs, row, n_to - n)


def _ring_pass(x, k, v, tau, bias, mask, scale, precision, m):
    """softmax(tau * (beta * x k^T + B)) v for the local queries over every key block.

    Args:
      x: (b, nl, h, d) this device's queries; tau (b, nl, h) float32.
      k, v: (b, ml, hk, d) this device's key and value blocks; they go round the ring.
      bias, mask: None or (b or 1, h or 1, nl or 1, m_to or 1): all key columns.
      m: the real key count; columns from m on are padding.

    Returns:
      (b, nl, h, d) float32.
    """
    ml = k.shape[1]
    size = jax.lax.axis_size(AXIS)
    me = jax.lax.axis_index(AXIS)
    low = jnp.finfo(jnp.float32).min
    # Each device hands its blocks to the next one: after t hops device i holds block
    # i - t (mod size).
    hop = [(j, (j + 1) % size) for j in range(size)]

    def columns(a, start):
        if a is None or a.shape[3] == 1:
            return a
        return jax.lax.dynamic_slice_in_dim(a, start, ml, axis=3)

    def fold_in(stats, kb, vb, t):
        # Legend: top (b, h, nl) running maximum logit, total (b, h, nl) running sum of
        # exp(logit - top), acc (b, h, nl, d) running sum of exp(logit - top) * v;
        # stats None before the first block.
        start = ((me - t) % size) * ml
        s = kernels.logits(x, kb, tau, columns(bias, start), columns(mask, start), scale, precision)
        real = None
        if size * ml > m:
            real = start + jnp.arange(ml) < m
            s = jnp.where(real, s, low)
        # Masked keys sit at float32's lowest, as on the single-device path: a row with
        # every real key masked keeps top at that value and weighs them all exp(0) = 1
        # (uniform); a row with any key kept weighs them exp(lowest - top) = 0. The shift
        # cancels in acc / total, so it carries no gradient.
        top = jax.lax.stop_gradient(jnp.max(s, axis=-1))
        if stats is not None:
            top = jnp.maximum(stats[0], top)
        p = jnp.exp(s - top[..., None])
        if real is not None:
            p = jnp.where(real, p, 0.0)
        total, acc = jnp.sum(p, axis=-1), kernels.weigh(p, vb, precision)
        if stats is not None:
            carry = jnp.exp(stats[0] - top)
            total, acc = stats[1] * carry + total, stats[2] * carry[..., None] + acc
        return top, total, acc

    send = lambda a: jax.lax.ppermute(a, AXIS, hop)

    def hop_and_fold(state, t):
        kb, vb, stats = state
        # Send first: the transfer of the next blocks can overlap this block's work.
        return (send(kb), send(vb), fold_in(stats, kb, vb, t)), None

    stats = fold_in(None, k, v, 0)
    if size > 1:
        state = (send(k), send(v), stats)
        (kb, vb, stats), _ = jax.lax.scan(hop_and_fold, state, jnp.arange(1, size - 1))
        stats = fold_in(stats, kb, vb, size - 1)
    _, total, acc = stats
    return jnp.swapaxes(acc / total[..., None], 1, 2)


def _ulysses(mesh, q, k, v, energy, steps, bias, mask, scale, precision):
    b, n, h, _ = q.shape
    m, hk = k.shape[1], k.shape[2]
    size = mesh.shape[AXIS]
    batch = _axes(mesh, BATCH_AXES, (b,))
    heads = _axes(mesh, HEAD_AXES, (h, hk))
    per_device = h // math.prod(mesh.shape[a] for a in heads)
    if per_device % size:
        where = f" ({per_device} per device after {'x'.join(heads)})" if heads else ""
        raise ValueError(
            f"implementation='ulysses' splits the heads over mesh axis {AXIS!r}: q heads "
            f"({h}{where}) must be a multiple of mesh.{AXIS} ({size}); use 'ring'"
        )
    kv_per_device = hk // math.prod(mesh.shape[a] for a in heads)
    # Fewer kv heads than devices (grouped-query): repeat each kv head over as few of
    # its query heads as make the count divisible; r = h / hk always does.
    groups = per_device // kv_per_device
    fits = lambda r: groups % r == 0 and kv_per_device * r % size == 0
    repeat = next(r for r in range(1, groups + 1) if fits(r))
    n_to, m_to = _round_up(n, size), _round_up(m, size)
    static, arrays = _fields(energy, q, n)
    split = _entry(*heads, AXIS)

    row = P(_entry(*batch), AXIS, _entry(*heads), None)
    args = {"q": _pad(q, 1, n_to), "k": _pad(k, 1, m_to), "v": _pad(v, 1, m_to)}
    specs = {"q": row, "k": row, "v": row}
    for name, x in arrays.items():
        args[name], specs[name] = x, P(_entry(*batch), None, split)
    for name, x in (("bias", bias), ("mask", mask)):
        if x is not None:
            # Whole (n, m) planes of this device's heads, as the local attention needs.
            args[name] = x
            specs[name] = P(
                _entry(*batch) if x.shape[0] == b else None,
                split if x.shape[1] == h else None,
                None,
                None,
            )

    def body(a):
        # (b, n/P, h, d) -> (b, n, h/P, d) and back; the padding is cut off in between.
        gather = lambda x: jax.lax.all_to_all(x, AXIS, 2, 1, tiled=True)
        kv = lambda x: gather(jnp.repeat(x, repeat, axis=2) if repeat > 1 else x)[:, :m]
        fields = {name: a.get(name, static.get(name)) for name in ("tau", "alpha", "gamma")}
        # The local path as energy_attention would pick it for these (b, n, h/P, d) blocks.
        out = kernels.local_energy_attention(
            gather(a["q"])[:, :n],
            kv(a["k"]),
            kv(a["v"]),
            kernels.Energy(**fields),
            steps=steps,
            bias=a.get("bias"),
            mask=a.get("mask"),
            scale=scale,
            precision=precision,
        )
        return jax.lax.all_to_all(_pad(out, 1, n_to), AXIS, 1, 2, tiled=True)

    return _shard_map(body, mesh, args, specs, row, n_to - n, vma=False)
