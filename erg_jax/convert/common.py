"""Reading PyTorch / safetensors state dicts and mapping them onto Flax params.

Every loader goes through ``StateDict``: it reads local files only, and a missing file,
a missing or unused tensor, or a shape that does not fit is a ValueError that names the
key, never a silent skip.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import numpy as np


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e
    except Exception as e:  # bfloat16 tensors need the torch reader
        if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
        return _read_torch_safetensors(path)


def _read_torch_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ValueError(f"{path} holds bfloat16 tensors; reading them needs torch") from e
    return {k: v.float().numpy() for k, v in load_file(path).items()}


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"reading the PyTorch checkpoint {path} needs torch installed") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read PyTorch checkpoint {path}: {e}") from e
    for key in ("ema", "model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return {
        k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
        for k, v in obj.items()
        if hasattr(v, "numpy")
    }


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads one .safetensors, .pt/.pth/.bin file, or a sharded safetensors index."""
    if not os.path.exists(path):
        raise ValueError(f"checkpoint file not found: {path}")
    if path.endswith(".index.json"):
        with open(path) as f:
            index = json.load(f)
        folder = os.path.dirname(path)
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(index["weight_map"].values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.exists(shard_path):
                raise ValueError(f"missing checkpoint shard {shard_path} named in {path}")
            out.update(read_state_dict(shard_path))
        return out
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
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


def read_config(folder: str, name: str = "config.json") -> dict:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise ValueError(f"missing {name} in {folder}")
    with open(path) as f:
        return json.load(f)


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
