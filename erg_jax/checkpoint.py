"""Saving and restoring model params with Orbax, plus the model config beside them.

A checkpoint directory holds::

    DIR/config.json     the model config dict (kind, architecture, sampling metadata;
                        docs/INTERFACES.md)
    DIR/params/         an Orbax (OCDBT) checkpoint of the params pytree

Restoring builds an abstract target (jax.ShapeDtypeStruct with a sharding) from the
checkpoint's own metadata, so params land straight on the devices or shards asked for,
never gathered on one host first. A missing or corrupt directory is a ValueError saying
what is wrong.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PARAMS = "params"
CONFIG = "config.json"


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, bool | int | float | str):
        return x
    raise ValueError(f"config value {x!r} ({type(x).__name__}) cannot be written as JSON")


def save(directory: str, params: Any, config: dict) -> None:
    """Writes params (Orbax) and config (config.json) to directory, replacing both.

    Args:
      directory: a local path or a path Orbax understands (gs://...).
      params: a pytree of arrays (numpy or jax, any sharding).
      config: the model config dict; tuples are written as lists.
    """
    import orbax.checkpoint as ocp

    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError("config must be a dict with a 'kind' field (docs/INTERFACES.md)")
    text = json.dumps(jsonable(config), indent=2, sort_keys=True)
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, PARAMS), params, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(directory, CONFIG), "w") as f:
        f.write(text + "\n")


def to_host_device(tree: Any) -> Any:
    """Moves the numpy leaves of a nested dict onto the host's CPU device, one at a time.

    Orbax copies numpy leaves while saving, so a converted 8B model written from numpy
    needs twice its size in host memory; from CPU-device jax arrays it writes in place.
    The dicts are changed in place, so each numpy array is freed as soon as its copy
    exists (when nothing else holds it). Several processes keep numpy leaves (Orbax's
    numpy path writes them once, from the primary host), as does a JAX without a CPU
    backend.
    """
    if jax.process_count() > 1:
        return tree
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return tree

    def walk(node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value)
            elif isinstance(value, np.ndarray):
                node[key] = jax.device_put(value, cpu)
                del value

    if isinstance(tree, dict):
        walk(tree)
    return tree


def read_config(directory: str) -> dict:
    """The config dict of a checkpoint directory."""
    path = os.path.join(directory, CONFIG)
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint directory not found: {directory}")
    if not os.path.isfile(path):
        raise ValueError(f"{directory} is not an erg_jax checkpoint: no {CONFIG}")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt {path}: {e}") from e
    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError(f"{path} must hold a dict with a 'kind' field")
    return config


def _metadata_tree(checkpointer, path: str) -> Any:
    meta = checkpointer.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    return getattr(meta, "tree", meta)


def _is_meta(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def restore(directory: str, shardings: Any = None, dtype: Any = None) -> tuple[Any, dict]:
    """Reads a checkpoint written by ``save``.

    Args:
      directory: the checkpoint directory.
      shardings: None (every array on the default device), one jax.sharding.Sharding for
        all arrays, or a pytree of shardings matching the params.
      dtype: restore floating-point leaves in this dtype (Orbax casts while reading, so
        a float32 checkpoint restored in bfloat16 never exists in float32 on device);
        None keeps the stored dtypes.

    Returns:
      (params, config): params as jax arrays with the given shardings.
    """
    import orbax.checkpoint as ocp

    config = read_config(directory)
    path = os.path.abspath(os.path.join(directory, PARAMS))
    if not os.path.isdir(path):
        raise ValueError(f"{directory} has no Orbax params checkpoint ({PARAMS}/)")
    checkpointer = ocp.StandardCheckpointer()
    try:
        meta = _metadata_tree(checkpointer, path)
    except Exception as e:
        raise ValueError(f"cannot read the Orbax metadata of {path}: {e}") from e
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        leaves = jax.tree_util.tree_map(lambda _: shardings, meta, is_leaf=_is_meta)
    else:
        leaves = shardings

    def as_dtype(stored):
        if dtype is None or not jnp.issubdtype(stored, jnp.floating):
            return stored
        return jnp.dtype(dtype)

    try:
        target = jax.tree_util.tree_map(
            lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), as_dtype(m.dtype), sharding=s),
            meta,
            leaves,
            is_leaf=_is_meta,
        )
    except ValueError as e:
        raise ValueError(f"shardings do not match the params tree of {path}: {e}") from e
    try:
        params = checkpointer.restore(path, target)
    except Exception as e:
        raise ValueError(f"cannot restore the params in {path}: {e}") from e
    return params, config
