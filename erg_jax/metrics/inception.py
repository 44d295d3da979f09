"""Inception-v3 as FID computes it: the 2015-12-05 TensorFlow graph's 2048-d pool features.

The network is the one Heusel et al. (2017) used for FID, as torch-fidelity's
``FeatureExtractorInceptionV3`` and pytorch-fid's ``fid_inception_v3`` rebuild it (Szegedy
et al. 2016, with the graph's quirks): every convolution is BasicConv (no bias, BatchNorm
with eps 0.001 on running statistics, ReLU); the 3x3 average pools of the A, C and first E
blocks leave the zero padding out of the mean (count_include_pad=False); the last E block
(Mixed_7c) pools its fourth branch with a 3x3 max-pool instead; the features are the mean
over the final 8x8 grid. Layout NHWC.

Preprocessing, two pipelines (``load_inception``'s ``resize``):

- "tf1" (torch-fidelity, and the original TensorFlow FID): uint8 images of any size go to
  the device as they are; the network casts them to float32, resizes them to 299x299 with
  TensorFlow 1.x's bilinear resize (``resize.bilinear_tf1``) and maps [0, 255] to [-1, 1]
  by (x - 128) / 128.
- "clean" (clean-fid's default mode): the host resizes each image with PIL's bicubic
  filter in float32 (``resize.clean_resize``), the network skips its own resize and
  normalises the same way, (x - 128) / 128, as clean-fid's InceptionV3W does before the
  layers of its TorchScript graph.

Weights: the PyTorch ports of the TensorFlow graph's weights, read without torch if need
be (``erg_jax.weights.read_state_dict``):

- torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` and pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth``: both name the tensors as torchvision's
  ``Inception3`` does (``Mixed_5b.branch1x1.conv.weight``, ...), which torch-fidelity's
  module keeps;
- the state dict of pytorch-fid's ``InceptionV3`` module itself, which holds the same
  layers in four ``nn.Sequential`` blocks (``blocks.2.0.branch1x1.conv.weight``, ...).

BatchNorm's ``num_batches_tracked`` and the 1008-class ``fc`` layer are accepted and
unused; a missing tensor, an unknown one (torchvision's ``AuxLogits``), or a shape that
does not fit is refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from erg_jax import weights
from erg_jax.metrics.features import FeatureExtractor
from erg_jax.metrics.resize import bilinear_tf1, clean_resize

SIZE = 299
DIM = 2048
RESIZE_MODES = ("tf1", "clean")


class BasicConv(nn.Module):
    """Convolution without bias, BatchNorm on running statistics (eps 0.001), ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (ph, pw), s = self.padding, self.strides
        x = nn.Conv(
            self.features,
            self.kernel,
            (s, s),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool divides by the number of pixels inside the image.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), (stride, stride), pad)


class _Block(nn.Module):
    """The dtype and precision an Inception block hands its convolutions."""

    dtype: Any = dataclasses.field(default=jnp.float32, kw_only=True)
    precision: Any = dataclasses.field(default=None, kw_only=True)

    def conv(self):
        return functools.partial(BasicConv, dtype=self.dtype, precision=self.precision)


class InceptionA(_Block):
    """35x35 block: 1x1, 5x5, double 3x3 and average-pool branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = self.conv()
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """35x35 -> 17x17 reduction: strided 3x3, double 3x3 and max-pool branches."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = self.conv()
        b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(_Block):
    """17x17 block: 1x1, factorised 7x7, double factorised 7x7 and average-pool branches."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv, c7 = self.conv(), self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, **row, name="branch7x7_2")(b7)
        b7 = conv(192, **col, name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = conv(192, **row, name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """17x17 -> 8x8 reduction: 3x3, factorised 7x7 then 3x3, and max-pool branches."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = self.conv()
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(_Block):
    """8x8 block: 1x1, split 3x3, double split 3x3 and pool branches.

    ``pool`` is "avg" in Mixed_7b and "max" in Mixed_7c, as in the TensorFlow graph.
    """

    pool: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = self.conv()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = [conv(384, **row, name="branch3x3_2a")(b3), conv(384, **col, name="branch3x3_2b")(b3)]
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = [
            conv(384, **row, name="branch3x3dbl_3a")(bd),
            conv(384, **col, name="branch3x3dbl_3b")(bd),
        ]
        pooled = _max_pool_3x3(x, 1) if self.pool == "max" else _avg_pool_3x3(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


# (name, width of the pool branch) of the 35x35 blocks, (name, width of the 7x7 branches)
# of the 17x17 ones.
_A_BLOCKS = (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64))
_C_BLOCKS = (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192))


class InceptionV3(nn.Module):
    """Images (n, H, W, 3) with values in [0, 255] -> (n, 2048) float32 pool features.

    Attributes:
      resize_input: resize to 299x299 with ``bilinear_tf1`` (any H, W); when False the
        input must already be 299x299.
      dtype: the dtype of the computation (params stay float32; features come out float32).
      precision: the convolutions' precision.
    """

    resize_input: bool = True
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = bilinear_tf1(x, (SIZE, SIZE))
        elif x.shape[1:3] != (SIZE, SIZE):
            raise ValueError(f"images must be (n, {SIZE}, {SIZE}, 3), got shape {x.shape}")
        x = ((x - 128) / 128).astype(self.dtype)
        conv = functools.partial(BasicConv, dtype=self.dtype, precision=self.precision)
        block = dict(dtype=self.dtype, precision=self.precision)
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # 149x149
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147x147
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)  # 73x73
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71x71
        x = _max_pool_3x3(x, 2)  # 35x35
        for name, pool_features in _A_BLOCKS:
            x = InceptionA(pool_features, **block, name=name)(x)
        x = InceptionB(**block, name="Mixed_6a")(x)  # 17x17
        for name, c7 in _C_BLOCKS:
            x = InceptionC(c7, **block, name=name)(x)
        x = InceptionD(**block, name="Mixed_7a")(x)  # 8x8
        x = InceptionE("avg", **block, name="Mixed_7b")(x)
        x = InceptionE("max", **block, name="Mixed_7c")(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# A Flax leaf (collection, module, variable) and its tensor's name in a BasicConv2d.
_TORCH_LEAVES = {
    ("params", "conv", "kernel"): "conv.weight",
    ("params", "bn", "scale"): "bn.weight",
    ("params", "bn", "bias"): "bn.bias",
    ("batch_stats", "bn", "mean"): "bn.running_mean",
    ("batch_stats", "bn", "var"): "bn.running_var",
}

# pytorch-fid's InceptionV3 keeps Inception3's layers in four nn.Sequential blocks, its
# max and average pools (no tensors) in the places between and after them.
_PYTORCH_FID_BLOCKS = (
    "Conv2d_1a_3x3 Conv2d_2a_3x3 Conv2d_2b_3x3",
    "Conv2d_3b_1x1 Conv2d_4a_3x3",
    "Mixed_5b Mixed_5c Mixed_5d Mixed_6a Mixed_6b Mixed_6c Mixed_6d Mixed_6e",
    "Mixed_7a Mixed_7b Mixed_7c",
)
_PYTORCH_FID_NAMES = {
    layer: f"blocks.{i}.{j}"
    for i, layers in enumerate(_PYTORCH_FID_BLOCKS)
    for j, layer in enumerate(layers.split())
}
# The state dict layouts: their names and how a top-level layer is spelled in each.
LAYOUTS = {
    "Inception3": lambda layer: layer,
    "pytorch-fid InceptionV3": _PYTORCH_FID_NAMES.__getitem__,
}


def torch_name(layout: str, collection: str, path: tuple[str, ...]) -> str:
    """The state-dict key of one Flax leaf, e.g. ("Mixed_5b", "branch1x1", "conv", "kernel")."""
    layer = LAYOUTS[layout](path[0])
    return ".".join((layer, *path[1:-2], _TORCH_LEAVES[(collection, *path[-2:])]))


@functools.cache
def _abstract_variables() -> dict:
    """The network's variable shapes (traced once per process; callers do not mutate)."""
    images = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), images)


def variables_from_state_dict(tensors: dict, source: str = "checkpoint") -> tuple[dict, str]:
    """Flax variables {"params", "batch_stats"} (float32) and the layout they were read in.

    Args:
      tensors: a state dict in one of ``LAYOUTS`` (numpy arrays, torch's names).
      source: what the tensors came from, for the error messages.

    Raises:
      ValueError: a tensor of the layout is missing (the first ones named), a tensor is
        unknown, or a shape does not fit.
    """
    wrapped = any(k.startswith("blocks.") for k in tensors)
    layout = "pytorch-fid InceptionV3" if wrapped else "Inception3"
    abstract = {c: traverse_util.flatten_dict(v) for c, v in _abstract_variables().items()}
    keys = {(c, path): torch_name(layout, c, path) for c, flat in abstract.items() for path in flat}
    missing = [key for key in keys.values() if key not in tensors]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(
            f"{source} is not an Inception-v3 FID state dict (torch-fidelity's or pytorch-fid's, "
            f"{layout} names): missing {len(missing)} tensors {missing[:8]}{more}"
        )
    sd = weights.StateDict(tensors, source)
    to_hwio = lambda w: w.transpose(2, 3, 1, 0)  # torch (out, in, kh, kw) -> (kh, kw, in, out)
    out: dict = {c: {} for c in abstract}
    for (c, path), key in keys.items():
        transform = to_hwio if path[-1] == "kernel" else None
        out[c][path] = sd.take(key, abstract[c][path].shape, transform).astype(np.float32)
    sd.skip(*(k for k in tensors if k.endswith(".num_batches_tracked")))
    if sd.has("fc.weight"):  # the 1008-way classifier: checked, not used
        sd.take("fc.weight", (1008, DIM))
        sd.take("fc.bias", (1008,))
    sd.finish()
    return {c: traverse_util.unflatten_dict(v) for c, v in out.items()}, layout


def load_inception(path: str, *, resize: str = "tf1", dtype: Any = jnp.float32) -> FeatureExtractor:
    """Inception-v3's 2048-d pool features (FID, KID) from a PyTorch port of its weights.

    Args:
      path: torch-fidelity's or pytorch-fid's weight file, or a state dict of pytorch-fid's
        InceptionV3 module (see the module docstring); torch is not needed to read it.
      resize: "tf1", torch-fidelity's pipeline (uint8 to the device, TensorFlow 1.x
        bilinear resize inside the network), or "clean", clean-fid's (PIL bicubic on the
        host, in ``prepare``).
      dtype: the computation's dtype; float32 convolutions run at the highest precision
        (as the references compute), bfloat16 ones at the default. Params stay float32.

    Returns:
      A ``FeatureExtractor`` named "inception", dim 2048, taking uint8 (n, H, W, 3).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    variables, layout = variables_from_state_dict(weights.read_state_dict(path), path)
    return from_variables(variables, resize=resize, dtype=dtype, weights=path, layout=layout)


def from_variables(
    variables: dict, *, resize: str = "tf1", dtype: Any = jnp.float32, **settings
) -> FeatureExtractor:
    """The network ``load_inception`` builds, on variables already in Flax's layout.

    For weights that come from no file, e.g. random ones drawn in the shapes of
    ``InceptionV3().init`` for a speed measurement. ``resize`` and ``dtype`` as in
    ``load_inception``; ``settings`` go into the extractor's settings beside them.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    dtype = jnp.dtype(dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    model = InceptionV3(resize_input=resize == "tf1", dtype=dtype, precision=precision)
    prepare = (lambda x: clean_resize(x, (SIZE, SIZE))) if resize == "clean" else (lambda x: x)
    settings = dict(settings, resize=resize, dtype=dtype.name)
    return FeatureExtractor("inception", DIM, variables, model.apply, prepare, settings)
