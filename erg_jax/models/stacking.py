"""Per-block parameters <-> the stacked layout ``nn.scan`` runs over.

A model that scans runs of like blocks stores each run's params stacked on a leading
layer axis under one name (DiT: "blocks"; MMDiT: "blocks_{first}_to_{last}"; FLUX.1:
"double_blocks_0_to_18", ...). ``groups`` lists, per scanned run, its stacked name and
the per-block names it holds, in layer order; blocks outside every run stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Groups = Iterable[tuple[str, Sequence[str]]]


def _stack(*leaves):
    # numpy stays numpy (a converted checkpoint on the host), device arrays stay on device
    return np.stack(leaves) if isinstance(leaves[0], np.ndarray) else jnp.stack(leaves)


def stack_groups(params: dict, groups: Groups) -> dict:
    """Per-block params -> each group's blocks stacked under its name."""
    out = dict(params)
    for name, blocks in groups:
        out[name] = jax.tree_util.tree_map(_stack, *[out.pop(b) for b in blocks])
    return out


def unstack_groups(params: dict, groups: Groups) -> dict:
    """The inverse of ``stack_groups``."""
    out = dict(params)
    for name, blocks in groups:
        stacked = out.pop(name)
        for j, b in enumerate(blocks):
            out[b] = jax.tree_util.tree_map(lambda a, j=j: a[j], stacked)
    return out
