"""Shared-prefix evaluation of guidance branches: no work done twice on the branch axis.

When every branch of a step has the same condition and input (class-conditional or
unconditional ERG, PAG, SEG, SLG), the branches differ only from the first layer whose
attention control differs between them. Everything before that layer is the same
computation, so it runs once; only the rest is mapped over the branches:

    first  = min { i : control_j(i) != control_0(i) for some branch j }   (data)
    h      = embed(x, t, c)                                                once
    h_i+1  = layer_i(h_i)              once, broadcast,   i < first
    h_i+1  = map(layer_i)(h_i, c_i)    per branch,        i >= first
    out    = map(head)(h_L)

(map: ``branches.map_branches``, a vmap on accelerators, branch by branch on CPU).

``first`` is found from the controls at run time: each layer is a ``lax.cond`` between
its shared and its per-branch form (inside one ``lax.scan`` over a run of layers whose
params are stacked, ``scan_blocks``), so the layer choice, I-ERG's kickoff (before it
no layer is perturbed and the whole network runs once) and every other number stay
traced, and a sweep still compiles once. The result equals the plain map over the
branches up to float rounding (``tests/test_shared_prefix.py``).

This module knows no model: the DiT and the MMDiT (``DiTDenoiser.branched``, the
MMDiT denoiser's ``branched``) embed, describe their blocks as ``Layers`` and apply
their head; the state a layer carries is any pytree (the MMDiT's: image and text
tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from erg_jax.branches import map_branches
from erg_jax.control import AttentionControl

Array = jax.Array


class Layers(NamedTuple):
    """A run of consecutive layers that share one apply function.

    Attributes:
      apply: ``(params_i, state, control_i) -> state`` of one layer on one branch, the
        control's fields scalars.
      params: the layers' params, a sequence with one tree per layer, or (stacked) one
        tree whose leaves have a leading layer axis.
      stacked: whether params are stacked; then the run is one ``lax.scan``.
    """

    apply: Callable[[Any, Any, AttentionControl], Any]
    params: Any
    stacked: bool = False

    @property
    def length(self) -> int:
        if self.stacked:
            return int(jax.tree_util.tree_leaves(self.params)[0].shape[0])
        return len(self.params)


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


def branched_layers(state: Any, runs: Sequence[Layers], controls: AttentionControl | None) -> Any:
    """Every branch's state after all layers, those before the first perturbed one run once.

    Args:
      state: the state entering layer 0, the same for every branch (a pytree, e.g. the
        tokens (b, n, D)).
      runs: the model's layers in order, as runs of like layers; L layers in all.
      controls: the branches' AttentionControls stacked, every leaf (B, L, ...), or None
        when no branch perturbs the attention (B = 1: the network runs once, plain).

    Returns:
      the state after layer L-1 of every branch: each leaf (B, ...) of the state's.
    """
    num_layers = sum(run.length for run in runs)
    branches = 1 if controls is None else jax.tree_util.tree_leaves(controls)[0].shape[0]
    first = first_perturbed_layer(controls, num_layers)
    states = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (branches,) + a.shape), state)

    def layer(apply, states, i, p_i, ctl):
        """Layer i on every branch: once and broadcast before `first`, else mapped."""

        def shared(states):
            # Before `first` every branch holds the same state and the same control.
            one = jax.tree_util.tree_map(lambda a: a[0], (states, ctl))
            out = apply(p_i, *one)
            return jax.tree_util.tree_map(lambda a, s: jnp.broadcast_to(a, s.shape), out, states)

        def split(states):
            return map_branches(lambda s, c: apply(p_i, s, c), states, ctl)

        if controls is None:
            return shared(states)
        return jax.lax.cond(i < first, shared, split, states)

    start = 0
    for run in runs:
        n = run.length
        ctl = jax.tree_util.tree_map(lambda a, s=start, n=n: a[:, s : s + n], controls)
        if run.stacked:
            # One scanned body, so compile time does not grow with depth.
            per_layer = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 1, 0), ctl)
            states, _ = jax.lax.scan(
                lambda st, xs, apply=run.apply: (layer(apply, st, *xs), None),
                states,
                (jnp.arange(start, start + n), run.params, per_layer),
            )
        else:
            for j, p_j in enumerate(run.params):
                ctl_j = jax.tree_util.tree_map(lambda a, j=j: a[:, j], ctl)
                states = layer(run.apply, states, start + j, p_j, ctl_j)
        start += n
    return states
