"""Denoisers, VAE and text encoders; ``load_denoiser`` opens a converted checkpoint.

A denoiser is ``denoiser(x, t, cond, attention=None)`` on NHWC latents
(docs/INTERFACES.md), with ``.config`` and ``.params``. The model code is imported only
when a checkpoint of its kind is loaded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from erg_jax.models import registry

# Fields that change how a model runs but not its parameters' structure.
RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "precision",
    "attention_implementation",
    "scan_blocks",
    "remat",
)


def relayout(params: dict, old: dict, new: dict) -> dict:
    """Params stored under config ``old`` in the block layout (scanned or not) of ``new``."""
    if bool(old.get("scan_blocks")) == bool(new.get("scan_blocks")):
        return params
    module = registry.get(new.get("kind")).module()
    if new.get("scan_blocks"):
        return module.stack_blocks(params, new)
    return module.unstack_blocks(params, new)


def load_denoiser(directory: str, shardings: Any = None, **overrides: Any):
    """The denoiser stored in a checkpoint directory (``launch.convert`` writes them).

    Args:
      directory: an erg_jax checkpoint (Orbax params + config.json).
      shardings: passed to ``erg_jax.checkpoint.restore`` (None: default device).
      **overrides: runtime config fields (``RUNTIME_FIELDS``: dtype, param_dtype,
        precision, attention_implementation, scan_blocks, remat); the params are cast
        to a new param_dtype and restacked for a new scan_blocks.

    Returns:
      A callable ``(x, t, cond, attention=None) -> raw output`` with .config, .params.
    """
    from erg_jax import checkpoint
    from erg_jax.shipped_models import resolve

    directory = resolve(directory)  # models/... : the shipped copy outside a checkout

    unknown = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"load_denoiser can override only {RUNTIME_FIELDS}, not {unknown}")
    params, stored = checkpoint.restore(directory, shardings)
    config = dict(stored, **overrides)
    if "param_dtype" in overrides:
        dtype = jnp.dtype(overrides["param_dtype"])
        params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    kind = config.get("kind")
    if kind not in registry.KINDS:
        raise ValueError(
            f"{directory} holds a {kind!r} model, not a denoiser ({', '.join(registry.KINDS)})"
        )
    module = registry.get(kind).module()
    return module.make_denoiser(config, relayout(params, stored, config))


__all__ = ["RUNTIME_FIELDS", "load_denoiser", "relayout"]
