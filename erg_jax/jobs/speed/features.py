"""The evaluation's feature networks: images per second per device, float32 and bfloat16.

Inception-v3 (FID and KID: the 2015-12-05 graph's architecture) and DINOv2 ViT-S/14 and
ViT-L/14 (FD-DINOv2: the shapes of the published facebook/dinov2-small and -large), each
run as the evaluation job runs it: a ``metrics.features.Sharded`` over the devices takes
uint8 images, ``apply(params, images)`` is jitted with the resize inside (Inception to
299 px, TensorFlow 1 bilinear; DINOv2 to 224 px, then ImageNet normalisation), and the
features come back to the host. DINOv2's position embeddings are made for the published
518 px training grid (37 x 37) and resampled to 224 px's (16 x 16) as ``load_dinov2``
resamples them. float32 runs at the highest matmul precision and bfloat16 at the
default, as the loaders set them; params are float32 in both.

The weights are random, in the shapes and scales of the modules' own init (Flax's
LeCun-normal kernels, unit scales and variances, zeros elsewhere) but drawn in numpy:
XLA on a 2-core CPU takes 15 to 35 s to compile Inception's init, and the cost of a
forward pass does not depend on the values.

Every contender is timed interleaved with the others (medians); memory is XLA's account
of the compiled program (temporaries plus outputs; the params come on top of it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax.jobs.speed.timing import compiled_bytes, interleaved_medians
from erg_jax.metrics import dinov2, inception
from erg_jax.metrics.features import FeatureExtractor, Sharded

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# The published checkpoints' shapes (their config.json): patch 14, MLP ratio 4, GELU,
# LayerNorm eps 1e-6, position embeddings for 518 px; evaluated at 224 px.
DINOV2 = {
    "DINOv2 ViT-S/14": dinov2.Dinov2Config(hidden_size=384, num_layers=12, num_heads=6),
    "DINOv2 ViT-L/14": dinov2.Dinov2Config(hidden_size=1024, num_layers=24, num_heads=16),
}
TRAIN_SIZE, IMAGE_SIZE = 518, 224
# --small: two tiny ViTs trained at 56 px (4 x 4 patches), evaluated at 28 px (2 x 2).
TINY_DINOV2 = {
    "DINOv2 ViT-S/14": dinov2.Dinov2Config(hidden_size=32, num_layers=1, num_heads=2),
    "DINOv2 ViT-L/14": dinov2.Dinov2Config(hidden_size=64, num_layers=2, num_heads=4),
}
TINY_TRAIN_SIZE, TINY_IMAGE_SIZE = 56, 28
# Variables that Flax initialises to ones (BatchNorm and LayerNorm scales, BatchNorm's
# running variance, DINOv2's LayerScales); every other non-kernel variable starts at zero.
_ONES = ("scale", "var", "layer_scale1", "layer_scale2")


def random_variables(abstract: Any, seed: int = 0) -> Any:
    """float32 numpy values for a module's abstract variables (``jax.eval_shape`` of its
    init), as Flax's initialisers draw them: kernels normal with variance 1 / fan-in,
    the variables of ``_ONES`` ones, the others zeros."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            # a convolution's (kh, kw, in, out); a dense layer's (in, out) or, scanned,
            # (layers, in, out)
            fan_in = np.prod(leaf.shape[:-1]) if leaf.ndim == 4 else leaf.shape[-2]
            x = rng.standard_normal(leaf.shape, np.float32)
            return x * np.float32(1 / np.sqrt(fan_in))
        return (np.ones if name in _ONES else np.zeros)(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def inception_variables(seed: int = 0) -> dict:
    """Random variables {"params", "batch_stats"} of ``InceptionV3``."""
    images = jax.ShapeDtypeStruct((1, inception.SIZE, inception.SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0), images)
    return random_variables(abstract, seed)


def dinov2_params(
    c: dinov2.Dinov2Config,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    train_size: int = TRAIN_SIZE,
) -> dict:
    """Random ``Dinov2`` params made for train_size px, position embeddings resampled to
    image_size px as ``load_dinov2`` resamples a checkpoint's (torch hub's offset 0.1)."""
    pixels = jax.ShapeDtypeStruct((1, train_size, train_size, 3), jnp.float32)
    abstract = jax.eval_shape(dinov2.Dinov2(c).init, jax.random.key(0), pixels)["params"]
    params = random_variables(abstract, seed)
    grid = (image_size // c.patch_size,) * 2
    pos = dinov2.interpolate_position_embeddings(params["position_embeddings"], grid, 0.1)
    return params | {"position_embeddings": pos}


def networks(small: bool = False, seed: int = 0) -> dict[str, dict[str, FeatureExtractor]]:
    """name -> {"f32": extractor, "bf16": extractor}: the benchmarked networks, one set of
    random float32 weights per network shared by its two dtypes."""
    out = {}
    variables = inception_variables(seed)
    out["Inception-v3"] = {
        k: inception.from_variables(variables, dtype=dt, weights=f"random, seed {seed}")
        for k, dt in DTYPES.items()
    }
    configs = TINY_DINOV2 if small else DINOV2
    image_size = TINY_IMAGE_SIZE if small else IMAGE_SIZE
    train_size = TINY_TRAIN_SIZE if small else TRAIN_SIZE
    for name, c in configs.items():
        params = dinov2_params(c, seed, image_size, train_size)
        out[name] = {
            k: dinov2.from_params(
                c, params, dtype=dt, image_size=image_size, weights=f"random, seed {seed}"
            )
            for k, dt in DTYPES.items()
        }
    return out


def _mib(tree: Any) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def feature_rates(
    small: bool = False,
    batch: int = 32,
    repeats: int = 5,
    image_px: int | None = None,
    devices=None,
) -> dict:
    """Images per second per device of every network in float32 and bfloat16.

    Args:
      small: the test suite's sizes (tiny DINOv2s, 16 px images; Inception is full size).
      batch: images per device in one call.
      repeats: interleaved timed rounds (medians).
      image_px: side of the uint8 input images (default 256, a 256 px sample's).
      devices: the devices to shard the batch over (default: this process's).

    Returns:
      {"batch_per_device", "devices", "image_px", "networks": rows}, a row per network:
      its input side, params in MiB, images/s per device in each dtype, bf16 images/s over
      f32 images/s, and each compiled program's peak MiB (temporaries plus outputs).
    """
    devices = list(devices if devices is not None else jax.local_devices())
    image_px = image_px or (16 if small else 256)
    n = batch * len(devices)
    images = np.random.default_rng(0).integers(0, 256, (n, image_px, image_px, 3), np.uint8)
    sharded = {
        (name, k): Sharded(net, n, devices)
        for name, by_dtype in networks(small).items()
        for k, net in by_dtype.items()
    }
    fns = {f"{name} {k}": (lambda s=s: s(images)) for (name, k), s in sharded.items()}
    secs = interleaved_medians(fns, repeats)
    rows = {}
    for (name, k), s in sharded.items():
        # Arguments placed as Sharded places them give jit its shardings: the program
        # timed above (its compile is cached), not one of its own.
        x = jax.device_put(images, s.split)
        row = rows.setdefault(name, {"network": name})
        row.setdefault("network_px", s.net.settings.get("image_size", inception.SIZE))
        row.setdefault("params_mib", _mib(s.net.params))
        row[f"{k}_images_per_s"] = batch / secs[f"{name} {k}"]
        row[f"{k}_peak_mib"] = compiled_bytes(s.net.apply, s.params, x) / 2**20
    for row in rows.values():
        row["bf16_over_f32"] = row["bf16_images_per_s"] / row["f32_images_per_s"]
    return {
        "batch_per_device": batch,
        "devices": len(devices),
        "image_px": image_px,
        "networks": list(rows.values()),
    }
