"""A feature network as the metrics use it: parameters, a pure forward, a host-side prepare.

Every network here (Inception-v3 for FID and KID, DINOv2 for FD-DINOv2, CLIP's image tower
for CLIP score) is a ``FeatureExtractor``: ``prepare`` runs on the host (numpy or PIL, per
image; the identity where the network resizes on the device), ``apply(params, x)`` is a
pure function of the prepared batch, jittable and shardable over its batch axis, and the
object itself is callable on uint8 NHWC images for use in a notebook:

    net = erg_jax.metrics.load_inception("pt_inception-2015-12-05-6726825d.pth")
    feats = net(images_uint8)   # (n, 2048) float32
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """uint8 (n, H, W, 3) images, or a clear error naming what is wrong."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 in [0, 255], got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} must be (n, H, W, 3) RGB, got shape {x.shape}")
    return x


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureExtractor:
    """A feature network: ``apply(params, prepare(images)) -> (n, dim)`` float32.

    Attributes:
      name: what the features are called in a report ("inception", "dinov2", "clip").
      dim: the feature width.
      params: the network's parameters (a pytree of arrays).
      apply: ``(params, x) -> (n, dim)``, pure and jittable; x is what ``prepare`` returns.
      prepare: host-side preprocessing of uint8 (n, H, W, 3) images, per image so that any
        batch split gives the same rows; the identity when the network takes uint8.
      settings: how the network was loaded and how it preprocesses (for the report).
    """

    name: str
    dim: int
    params: Any
    apply: Callable[[Any, jax.Array], jax.Array]
    prepare: Callable[[np.ndarray], np.ndarray] = lambda images: images
    settings: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "_jitted", jax.jit(self.apply))

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(n, dim) float32 features of uint8 (n, H, W, 3) images, in batches."""
        x = check_images(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = [
            np.asarray(self._jitted(self.params, jnp.asarray(self.prepare(x[i : i + batch_size]))))
            for i in range(0, len(x), batch_size)
        ]
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out).astype(np.float32)


class Sharded:
    """A feature network jitted over this process's devices: the batch split along them."""

    def __init__(self, net: FeatureExtractor, batch_size: int, devices=None):
        devices = list(devices if devices is not None else jax.local_devices())
        if batch_size < 1 or batch_size % len(devices):
            raise ValueError(
                f"batch_size must be a positive multiple of the {len(devices)} devices, "
                f"got {batch_size}"
            )
        mesh = Mesh(np.array(devices), ("data",))
        self.net, self.batch_size = net, batch_size
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.split = NamedSharding(mesh, PartitionSpec("data"))
        self.params = jax.device_put(net.params, self.replicated)
        self.fn = jax.jit(net.apply, in_shardings=(self.replicated, self.split))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(n, dim) float32 features of uint8 (n, H, W, 3) images, in padded batches."""
        out = []
        for lo in range(0, len(images), self.batch_size):
            batch = images[lo : lo + self.batch_size]
            n = len(batch)
            if n < self.batch_size:  # one program for every batch: pad with the last image
                batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - n, 0)])
            x = jax.device_put(np.asarray(self.net.prepare(batch)), self.split)
            out.append(np.asarray(self.fn(self.params, x), np.float32)[:n])
        return np.concatenate(out) if out else np.zeros((0, self.net.dim), np.float32)
