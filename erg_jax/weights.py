"""Reading PyTorch / safetensors state dicts and mapping their tensors onto Flax params.

The one reader below every loader: the pipeline converters (``erg_jax.convert``) and the
text encoders (``erg_jax.models.text``, whose own modules map their weights) both use it.
Every loader goes through ``StateDict``: it reads local files only, and a missing file,
a missing or unused tensor, or a shape that does not fit is a ValueError that names the
key, never a silent skip.

Safetensors files (an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes) are memory-mapped and viewed in
their stored dtype, bfloat16 included (as ``ml_dtypes.bfloat16``): nothing is read from
disk until a converter touches a tensor (or, loading onto a mesh, one shard of it), and
converters cast leaf by leaf, so converting a bf16 checkpoint never holds a float32 copy
of the whole state dict.

PyTorch files are read with torch.load (weights only) where torch is installed; without
it, ``read_torch_zip`` reads the zip format (torch >= 1.6) itself, rebuilding the tensors
of a state dict as numpy arrays and refusing any other object in the pickle.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np
from flax import traverse_util

_SAFETENSORS_DTYPES = {
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

# A Hugging Face (transformers) folder's weights, single file or sharded.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped tensors (``np.memmap`` views) of one .safetensors file, any dtype.

    Raises:
      ValueError: the file is missing, truncated or corrupt ("cannot read safetensors
        file ..."), or holds a dtype numpy cannot view.
    """
    if not os.path.exists(path):
        raise ValueError(f"checkpoint file not found: {path}")

    def fail(why: str) -> ValueError:
        return ValueError(f"cannot read safetensors file {path}: {why}")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise fail("shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise fail(f"header length {n} runs past the end of the file (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise fail(f"corrupt header ({e})") from e
    header.pop("__metadata__", None)
    start = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    out = {}
    for key, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise fail(f"tensor '{key}' has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        lo, hi = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        if start + hi > size:
            raise fail(f"tensor '{key}' runs past the end of the file (truncated?)")
        need = dtype.itemsize * int(np.prod(shape))
        if hi - lo != need:
            raise fail(f"tensor '{key}' has {hi - lo} bytes, its shape {shape} needs {need}")
        out[key] = data[start + lo : start + hi].view(dtype).reshape(shape)
    return out


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
    """All tensors of a sharded safetensors checkpoint, from its .index.json."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read checkpoint index {index_path}: {e!r}") from e
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
    if missing:
        raise ValueError(f"missing checkpoint shard(s) {missing} named in {index_path}")
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        out.update(read_state_dict(os.path.join(folder, shard)))
    absent = sorted(set(weight_map) - set(out))
    if absent:
        raise ValueError(f"{index_path} names tensors that no shard holds: {absent[:5]}")
    return out


def _torch_to_numpy(v) -> np.ndarray:
    """A CPU torch tensor as numpy in its own dtype (bfloat16 as ml_dtypes.bfloat16)."""
    import torch

    if v.dtype == torch.bfloat16:
        return v.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return v.detach().numpy()


# The storage classes a torch.save'd zip names, by the numpy dtype of their elements.
_TORCH_STORAGES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
}


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 in numpy: a strided view of the storage, copied."""
    size, stride = tuple(size), tuple(stride)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if 0 in size:
        return np.zeros(size, storage.dtype)
    if offset < 0 or min(stride, default=0) < 0 or last >= len(storage):
        raise pickle.UnpicklingError(f"a tensor {size} runs past its storage of {len(storage)}")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], size, [s * itemsize for s in stride], writeable=False
    )
    return view.copy()


class _TorchZipUnpickler(pickle.Unpickler):
    """Rebuilds a state dict's tensors as numpy arrays and refuses every other global."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _TORCH_STORAGES:
            return np.dtype(_TORCH_STORAGES[name])
        raise pickle.UnpicklingError(f"refusing the global {module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        if key not in self.storages:
            data = self.archive.read(f"{self.prefix}data/{key}")
            self.storages[key] = np.frombuffer(data, dtype, count=numel)
        return self.storages[key]


def read_torch_zip(path: str):
    """A torch.save'd object (PyTorch >= 1.6 zip format) without torch: tensors as numpy.

    Reads state dicts of float32, float16, bfloat16 and int64 tensors (bfloat16 as
    ``ml_dtypes.bfloat16``), in dicts and OrderedDicts; any other class in the pickle is
    refused, so reading a file runs none of its code.

    Raises:
      ValueError: not a zip checkpoint (the legacy format needs torch), a big-endian one,
        or a pickle holding anything else.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a zip PyTorch checkpoint; reading it needs torch")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in archive.namelist():
            if archive.read(prefix + "byteorder").strip() != b"little":
                raise ValueError(f"{path} holds big-endian tensors; reading it needs torch")
        try:
            return _TorchZipUnpickler(archive, prefix).load()
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read PyTorch checkpoint {path} without torch: {e}") from e


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        obj = read_torch_zip(path)
        is_tensor, to_numpy = (lambda v: isinstance(v, np.ndarray)), (lambda v: v)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read PyTorch checkpoint {path}: {e}") from e
        is_tensor, to_numpy = (lambda v: isinstance(v, torch.Tensor)), _torch_to_numpy
    for key in ("ema", "model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return {k: to_numpy(v) for k, v in obj.items() if is_tensor(v)}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads one .safetensors, .pt/.pth/.bin file, or a sharded safetensors index.

    Tensors keep the dtype they are stored in (bfloat16 as ``ml_dtypes.bfloat16``);
    safetensors ones are memory-mapped views, read from disk only when used.
    """
    if not os.path.exists(path):
        raise ValueError(f"checkpoint file not found: {path}")
    if path.endswith(".index.json"):
        return _read_sharded(path)
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return _read_torch(path)


def find_weights(folder: str, stem: str = "diffusion_pytorch_model") -> str:
    """The weights file of a Hugging Face / diffusers folder (single or sharded)."""
    if not os.path.isdir(folder):
        raise ValueError(f"model folder not found: {folder}")
    for name in (
        f"{stem}.safetensors",
        f"{stem}.safetensors.index.json",
        f"{stem}.bin",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    ):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise ValueError(f"no weights file ({stem}.safetensors or model.safetensors) in {folder}")


def read_folder(folder: str) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of a Hugging Face folder (single file or sharded index) and their source.

    Raises:
      ValueError: no weights file, or a shard named in the index is missing (named).
    """
    for name in HF_WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return read_state_dict(path), path
    raise ValueError(
        f"no weights in {folder}: expected {HF_WEIGHT_FILES[0]} or {HF_WEIGHT_FILES[1]}"
    )


def read_config(folder: str, name: str = "config.json") -> dict:
    """A folder's JSON config (diffusers' or transformers' config.json) as a dict."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise ValueError(f"missing {name} in {folder}")
    with open(path) as f:
        return json.load(f)


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


class StateDict:
    """A state dict that checks every key it hands out and every key left over.

    Usage::

        sd = StateDict(tensors)
        w = sd.take("blocks.0.attn.qkv.weight", shape=(3 * d, d), transform=np.transpose)
        sd.finish()   # raises if any tensor was not used
    """

    def __init__(self, tensors: dict[str, np.ndarray], source: str = "checkpoint"):
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(
        self,
        key: str,
        shape: Iterable[int] | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        """The tensor under key (after transform), checked against the expected shape."""
        if key not in self.tensors:
            raise ValueError(f"{self.source}: missing tensor '{key}'")
        self.used.add(key)
        x = np.asarray(self.tensors[key])
        if transform is not None:
            x = transform(x)
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(
                f"{self.source}: tensor '{key}' has shape {tuple(x.shape)} after conversion, "
                f"the model expects {tuple(shape)}"
            )
        return x

    def skip(self, *keys: str) -> None:
        """Marks tensors as deliberately unused (for example buffers we recompute)."""
        self.used.update(k for k in keys if k in self.tensors)

    def finish(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise ValueError(f"{self.source}: unknown tensor(s) {unused[:5]}{more}")


def linear(sd: StateDict, prefix: str, d_in: int, d_out: int, bias: bool = True) -> dict:
    """A torch nn.Linear (weight (out, in)) as a flax Dense {'kernel': (in, out), 'bias'}."""
    out = {"kernel": sd.take(f"{prefix}.weight", (d_in, d_out), np.transpose)}
    if bias:
        out["bias"] = sd.take(f"{prefix}.bias", (d_out,))
    return out


def conv2d(sd: StateDict, prefix: str, c_in: int, c_out: int, k: int, bias: bool = True) -> dict:
    """A torch Conv2d (out, in, kh, kw) as a flax Conv {'kernel': (kh, kw, in, out)}."""
    out = {
        "kernel": sd.take(
            f"{prefix}.weight", (k, k, c_in, c_out), lambda w: np.transpose(w, (2, 3, 1, 0))
        )
    }
    if bias:
        out["bias"] = sd.take(f"{prefix}.bias", (c_out,))
    return out


def norm(sd: StateDict, prefix: str, dim: int, bias: bool = True) -> dict:
    """A torch LayerNorm / GroupNorm / RMSNorm affine as flax {'scale', 'bias'}."""
    out = {"scale": sd.take(f"{prefix}.weight", (dim,))}
    if bias:
        out["bias"] = sd.take(f"{prefix}.bias", (dim,))
    return out


def embedding(sd: StateDict, prefix: str, num: int, dim: int) -> dict:
    """A torch Embedding (num, dim) as a flax Embed {'embedding': (num, dim)}."""
    return {"embedding": sd.take(f"{prefix}.weight", (num, dim))}


def place_leaves(
    abstract: dict, read: Callable, param_dtype, groups: Iterable[tuple[str, Iterable[str]]]
) -> dict:
    """Params from abstract unscanned params, read leaf by leaf and cast, each written
    straight into its slot of a stacked run where ``groups`` names one.

    Args:
      abstract: the model's abstract params in the per-block layout.
      read: (path tuple, abstract leaf) -> the tensor of that leaf.
      param_dtype: the dtype the params are stored in.
      groups: (stacked name, the per-block names it stacks, in order) per scanned run;
        empty for the per-block layout.

    The host holds one copy of the params, in their dtype: no per-block copy is stacked
    afterwards.
    """
    slot = {}
    for name, blocks in groups:
        blocks = list(blocks)
        slot.update({b: (name, j, len(blocks)) for j, b in enumerate(blocks)})
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        w = np.asarray(read(path, leaf)).astype(param_dtype)
        if path[0] not in slot:
            out[path] = w
            continue
        name, j, n = slot[path[0]]
        key = (name,) + path[1:]
        if key not in out:
            out[key] = np.empty((n,) + w.shape, param_dtype)
        out[key][j] = w
    return traverse_util.unflatten_dict(out)
