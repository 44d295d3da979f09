"""CADS (Sadat et al. 2024, eq. 2-3) on a condition: its floating leaves annealed toward
noise at high noise levels, then moved back to their own mean and std (``guider.CADS``
holds the settings)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from erg_jax.rules import per_sample


def anneal(cond, cads, t, keys, step):
    """CADS on every floating leaf of a condition (b, ...), noise from each sample's key."""
    g = jnp.clip((cads.tau2 - t) / jnp.maximum(cads.tau2 - cads.tau1, 1e-12), 0.0, 1.0)
    g = jnp.where(t <= cads.tau1, 1.0, jnp.where(t >= cads.tau2, 0.0, g))
    leaves, treedef = jax.tree_util.tree_flatten(cond)
    if not any(jnp.issubdtype(jnp.asarray(c).dtype, jnp.floating) for c in leaves):
        raise ValueError("CADS anneals condition embeddings: pass float conditions, not labels")
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    out = []
    for i, c in enumerate(leaves):
        c = jnp.asarray(c)
        if not jnp.issubdtype(c.dtype, jnp.floating):
            out.append(c)
            continue
        noise = jax.vmap(
            lambda k, ci, i=i: jax.random.normal(jax.random.fold_in(k, i), ci.shape, ci.dtype)
        )(step_keys, c)
        hat = jnp.sqrt(g) * c + cads.noise_scale * jnp.sqrt(1.0 - g) * noise
        mean_c, std_c = per_sample(jnp.mean, c), jnp.sqrt(per_sample(jnp.var, c))
        mean_h, std_h = per_sample(jnp.mean, hat), jnp.sqrt(per_sample(jnp.var, hat))
        moved = (hat - mean_h) / jnp.maximum(std_h, 1e-12) * std_c + mean_c
        hat = cads.psi * moved + (1.0 - cads.psi) * hat
        out.append(jnp.where(g >= 1.0, c, hat).astype(c.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
