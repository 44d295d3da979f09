"""Reading Hugging Face text-encoder folders without torch: safetensors, bf16, shards.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. ``safetensors.numpy`` cannot
hand out bfloat16 (the dtype of real Llama 3 and T5 checkpoints), so this reader parses
the header itself and views the bytes, memory-mapped, as ``ml_dtypes`` types: nothing is
read from disk until a tensor (or, when loading onto a mesh, one shard of it) is used.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable

import ml_dtypes
import numpy as np

from erg_jax.convert.common import StateDict

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped tensors of one .safetensors file, any dtype including bfloat16.

    Raises:
      ValueError: the file is missing, truncated, or holds a dtype we cannot view.
    """
    if not os.path.exists(path):
        raise ValueError(f"checkpoint file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"cannot read safetensors file {path}: shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"cannot read safetensors file {path}: header length {n} too large")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    start = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    out = {}
    for key, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor '{key}' has unsupported dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        if start + hi > size:
            raise ValueError(f"{path}: tensor '{key}' runs past the end of the file (truncated?)")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        out[key] = data[start + lo : start + hi].view(dtype).reshape(info["shape"])
    return out


def read_folder(folder: str) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of a Hugging Face folder (single file or sharded index) and their source.

    Raises:
      ValueError: no weights file, or a shard named in the index is missing (named).
    """
    single, index = (os.path.join(folder, name) for name in WEIGHT_FILES)
    if os.path.exists(single):
        return read_safetensors(single), single
    if not os.path.exists(index):
        raise ValueError(f"no weights in {folder}: expected {WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}")
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
    if missing:
        raise ValueError(f"missing checkpoint shard(s) {missing} named in {index}")
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(read_safetensors(os.path.join(folder, shard)))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise ValueError(f"{index} names tensors that no shard holds: {absent[:5]}")
    return tensors, index


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
