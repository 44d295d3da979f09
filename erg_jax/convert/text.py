"""Reading Hugging Face text-encoder folders without torch: safetensors, bf16, shards.

The tensors come from ``erg_jax.convert.common.read_state_dict``: memory-mapped, in their
stored dtype (bfloat16 included), so nothing is read from disk until a tensor (or, when
loading onto a mesh, one shard of it) is used. The helpers map them onto Flax params.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from erg_jax.convert.common import StateDict, read_state_dict

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def read_folder(folder: str) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of a Hugging Face folder (single file or sharded index) and their source.

    Raises:
      ValueError: no weights file, or a shard named in the index is missing (named).
    """
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return read_state_dict(path), path
    raise ValueError(f"no weights in {folder}: expected {WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}")


def strip_prefix(
    tensors: dict[str, np.ndarray], prefix: str, drop: Callable[[str], bool] = lambda k: False
) -> dict[str, np.ndarray]:
    """Keys under ``prefix`` with the prefix removed (if any key has it); ``drop`` filters.

    Lets one converter read a bare model (``layers.0...``) and its task wrapper
    (``model.layers.0...`` beside ``lm_head.weight``) alike.
    """
    if any(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {k: v for k, v in tensors.items() if not drop(k)}


def linear(sd: StateDict, key: str, d_in: int, d_out: int, bias: bool) -> dict:
    """A torch Linear (out, in) as a flax Dense {'kernel': (in, out), 'bias': (out,)}."""
    out = {"kernel": sd.take(f"{key}.weight", (d_in, d_out), np.transpose)}
    if bias:
        out["bias"] = sd.take(f"{key}.bias", (d_out,))
    return out


def layer_norm(sd: StateDict, key: str, dim: int, bias: bool = True) -> dict:
    """A torch LayerNorm / RMSNorm weight (and bias) as flax {'scale', 'bias'}."""
    out = {"scale": sd.take(f"{key}.weight", (dim,))}
    if bias:
        out["bias"] = sd.take(f"{key}.bias", (dim,))
    return out


def embedding(sd: StateDict, key: str, num: int, dim: int) -> dict:
    """A torch Embedding (num, dim) as flax Embed {'embedding': (num, dim)}."""
    return {"embedding": sd.take(f"{key}.weight", (num, dim))}
