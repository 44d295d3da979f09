"""Shared-prefix evaluation of guidance branches: no work done twice on the branch axis.

When every branch of a step has the same condition and input (class-conditional or
unconditional ERG, PAG, SEG, SLG), the branches differ only from the first layer whose
attention control differs between them. Everything before that layer is the same
computation, so it runs once; only the rest is vmapped over the branches:

    first  = min { i : control_j(i) != control_0(i) for some branch j }   (data)
    h      = embed(x, t, c)                                                once
    h_i+1  = block_i(h_i)              once, broadcast,   i < first
    h_i+1  = map(block_i)(h_i, c_i)    per branch,        i >= first
    out    = map(head)(h_L)

(map: ``samplers.map_branches``, a vmap on accelerators, branch by branch on CPU).

``first`` is found from the controls at run time: each block is a ``lax.cond`` between
its shared and its per-branch form (inside one ``lax.scan`` over the blocks when the
model's blocks are stacked, ``scan_blocks``), so the layer choice, I-ERG's kickoff
(before it no layer is perturbed and the whole network runs once) and every other
number stay traced, and a sweep still compiles once. The result equals the plain
``vmap`` over the branches up to float rounding (``tests/test_shared_prefix.py``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from erg_jax.control import AttentionControl
from erg_jax.models.dit import Block, DiT
from erg_jax.samplers import map_branches

Array = jax.Array


def first_perturbed_layer(controls: AttentionControl | None, num_layers: int) -> Array:
    """The first layer where some branch's control differs from branch 0's.

    Args:
      controls: stacked controls, every leaf (branches, layers, ...), or None.
      num_layers: L, returned when no layer differs (all branches are the same network).

    Returns:
      int32 scalar in [0, L].
    """
    differs = jnp.zeros((num_layers,), bool)
    for a in jax.tree_util.tree_leaves(controls):
        a = a.reshape(a.shape[0], a.shape[1], -1)
        differs = differs | jnp.any(a[1:] != a[:1], axis=(0, 2))
    return jnp.where(jnp.any(differs), jnp.argmax(differs), num_layers).astype(jnp.int32)


def dit_branched(
    module: Any, params: dict, x: Array, t: Array, cond: Any, controls: AttentionControl | None
) -> Array:
    """Every branch's DiT output, the prefix before the first perturbed layer run once.

    Args:
      module: the ``DiT`` Flax module (its ``s`` Spec); params: its params.
      x: (b, H, W, C) latents, the same for every branch.
      t: (b,) or scalar timestep.
      cond: the one condition all branches share: (b,) labels or (b, D) embeddings.
      controls: the branches' AttentionControls stacked (leaves (B, L)), or None when
        no branch perturbs the attention (then the branches are one network).

    Returns:
      (B, b, H, W, out) raw outputs, B = branches (1 when controls is None).
    """
    if controls is None:  # the branches are one network: its own forward
        return module.apply({"params": params}, x, t, cond)[None]
    s = module.s
    grid = (x.shape[1] // s.patch, x.shape[2] // s.patch)
    h, y = module.apply({"params": params}, x, t, cond, method=DiT.embed)

    def head(h):
        return module.apply({"params": params}, h, y, x.shape, method=DiT.head)

    block = Block(s, grid)
    branches = jax.tree_util.tree_leaves(controls)[0].shape[0]
    first = first_perturbed_layer(controls, s.num_layers)
    hb = jnp.broadcast_to(h, (branches,) + h.shape)

    def layer(hb, i, p_i, ctl):
        """Block i on every branch: once and broadcast before `first`, else mapped."""

        def run(h, c):
            return block.apply({"params": p_i}, h, y, c)[0]

        def shared(hb):
            # Before `first` every branch holds the same state and the same control.
            out = run(hb[0], jax.tree_util.tree_map(lambda a: a[0], ctl))
            return jnp.broadcast_to(out, hb.shape)

        def split(hb):
            return map_branches(run, hb, ctl)

        return jax.lax.cond(i < first, shared, split, hb)

    if s.scan:
        # One scanned body, so compile time does not grow with depth (DiT-XL: 28 blocks).
        per_layer = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 1, 0), controls)
        hb, _ = jax.lax.scan(
            lambda hb, xs: (layer(hb, *xs), None),
            hb,
            (jnp.arange(s.num_layers), params["blocks"], per_layer),
        )
    else:
        for i in range(s.num_layers):
            ctl = jax.tree_util.tree_map(lambda a, i=i: a[:, i], controls)
            hb = layer(hb, i, params[f"blocks_{i}"], ctl)
    return map_branches(head, hb)
