"""DINOv2 ViT (Oquab et al., 2023) as a feature network: the feature of FD-DINOv2.

FD-DINOv2 (Stein et al., 2023) is the Frechet distance between DINOv2 features of real and
generated images, as torch-fidelity's ``FeatureExtractorDinoV2`` computes them.

The network is transformers' ``Dinov2Model``. A stride-14 convolution cuts the image into
patch tokens, a learned CLS token goes in front, and the learned position embeddings,
stored for the training grid (37 x 37 patches for the published 518-pixel models), are
resampled to the input grid with torch's bicubic (A = -0.75, align_corners=False, no
antialias). That resampling runs once, on the host in numpy, when the folder loads.
transformers resamples to the grid's size; torch hub's dinov2 (which torch-fidelity runs)
hands torch the scale factors (g + 0.1) / m instead, which samples the m x m grid at
slightly other points: ``interpolate_offset=0.1`` follows it. Then come pre-norm blocks,

    x = x + ls1 * Attn(LN1(x));    x = x + ls2 * FFN(LN2(x))

with per-channel LayerScales ls. The FFN is an MLP (fc1, GELU, fc2; ViT-S/B/L) or, where
the config sets ``use_swiglu_ffn`` (ViT-g), ``down(silu(gate(x)) * up(x))`` with
``int(2/3 * mlp_ratio * d)`` hidden units rounded up to a multiple of 8. The feature is the
pooled output: the CLS token after the final LayerNorm (torch hub's dinov2 forward returns
the same vector).

Preprocessing runs on the device inside ``apply``, as torch-fidelity does it: uint8
(n, H, W, 3) images become floats in [0, 255], are resized to 224 x 224 with TensorFlow 1's
bilinear (``erg_jax.metrics.resize.bilinear_tf1``) and normalised with the ImageNet mean
(0.485, 0.456, 0.406) * 255 and std (0.229, 0.224, 0.225) * 255.

Folders: a transformers ``Dinov2Model`` folder (config.json with model_type "dinov2" and
model.safetensors), the published facebook/dinov2-{small,base,large,giant} as downloaded.
The weights may sit under a prefix ("dinov2." in a Dinov2ForImageClassification folder;
its head is ignored), and either name layout loads: the one transformers writes
(``attention.attention.query``, ``mlp.weights_in``) and the one its modules use in memory
(``attention.q_proj``, ``mlp.gate_proj``).

    net = erg_jax.metrics.dinov2.load_dinov2("dinov2-base")
    feats = net(images_uint8)   # (n, 768) float32
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from erg_jax.energy import energy_attention
from erg_jax.metrics.features import FeatureExtractor
from erg_jax.metrics.resize import bilinear_tf1
from erg_jax.models.text.layers import activation
from erg_jax.weights import StateDict, conv2d, linear, norm, read_config, read_folder

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = ("float32", "bfloat16", "float16")
# Every Dinov2Model checkpoint has this tensor; what comes before it is the prefix.
PATCH_KEY = "embeddings.patch_embeddings.projection.weight"
SIZES = {384: "ViT-S/14", 768: "ViT-B/14", 1024: "ViT-L/14", 1536: "ViT-g/14"}
# The in-memory names of transformers 5 -> the names it writes to disk.
RENAMES = (
    ("attention.q_proj.", "attention.attention.query."),
    ("attention.k_proj.", "attention.attention.key."),
    ("attention.v_proj.", "attention.attention.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.down_proj.", "mlp.weights_out."),
)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """The architecture fields of a transformers Dinov2Config."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    patch_size: int = 14
    eps: float = 1e-6
    qkv_bias: bool = True
    swiglu: bool = False

    @property
    def ffn_size(self) -> int:
        """Hidden units of the FFN: the MLP's, or two thirds of it rounded up to 8 (SwiGLU)."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.swiglu else hidden


def make_config(hf: dict, source: str) -> Dinov2Config:
    """The config of a transformers Dinov2Model folder's config.json, checked.

    Raises:
      ValueError: another model_type (register-token DINOv2 included), or a field outside
        what the network supports, naming the field.
    """
    if hf.get("model_type") != "dinov2":
        raise ValueError(
            f"{source}: model_type must be 'dinov2' (a transformers Dinov2Model), got "
            f"{hf.get('model_type')!r}"
        )
    patch = hf.get("patch_size", 14)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"{source}: patch_size must be square, got {patch}")
        patch = patch[0]
    if hf.get("num_channels", 3) != 3:
        raise ValueError(f"{source}: num_channels must be 3 (RGB), got {hf['num_channels']}")
    c = Dinov2Config(
        hidden_size=int(hf.get("hidden_size", 768)),
        num_layers=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)),
        mlp_ratio=float(hf.get("mlp_ratio", 4)),
        hidden_act=hf.get("hidden_act", "gelu"),
        patch_size=int(patch),
        eps=float(hf.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(hf.get("qkv_bias", True)),
        swiglu=bool(hf.get("use_swiglu_ffn", False)),
    )
    if c.hidden_size % c.num_heads:
        raise ValueError(
            f"{source}: hidden_size {c.hidden_size} must be a multiple of "
            f"num_attention_heads {c.num_heads}"
        )
    if not c.swiglu:
        activation(c.hidden_act)  # an unsupported hidden_act is refused here, by name
    return c


def bicubic_matrix(n_in: int, n_out: int, scale: float | None = None) -> np.ndarray:
    """(n_out, n_in) float64 weights of torch's 1-D bicubic resampling.

    As ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
    antialias=False)``: output i samples the input at (i + 0.5) / scale - 0.5, with
    scale = n_out / n_in unless the caller passed torch a scale_factor; the four taps
    around it carry Keys' cubic convolution weights with A = -0.75, and taps past an edge
    read the edge value. Coordinates and weights are computed in float32, as torch's CPU
    kernel computes them for float32 input (at a 37-patch grid, float64 coordinates would
    move the result by 1e-5).
    """
    f32 = np.float32
    a = f32(-0.75)
    ratio = f32(n_in) / f32(n_out) if scale is None else f32(1.0 / scale)
    real = ratio * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5)
    index = np.floor(real)  # below n_in - 1/2 for any scale with align_corners=False
    t = real - index

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    taps = np.clip(index[:, None].astype(np.int64) + np.arange(-1, 3), 0, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), 4), taps.ravel()), weights.ravel())
    return m


def interpolate_position_embeddings(
    pos: np.ndarray, grid: tuple[int, int], offset: float = 0.0
) -> np.ndarray:
    """Position embeddings for a (gh, gw) patch grid, as Dinov2Model resamples them.

    Args:
      pos: (1, 1 + m * m, d) learned embeddings: the CLS token's, then an m x m grid's.
      grid: (gh, gw) patches of the input.
      offset: 0 resamples to the grid's size (transformers' ``interpolate_pos_encoding``);
        0.1 passes torch the scale factors (g + 0.1) / m, as torch hub's dinov2 does.

    Returns:
      (1, 1 + gh * gw, d) float32: the CLS embedding unchanged, then the grid's, row-major.
    """
    pos = np.asarray(pos, np.float32)
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"position embeddings must be (1, 1 + m * m, d), got {pos.shape}")
    m = int(round(np.sqrt(pos.shape[1] - 1)))
    if m * m != pos.shape[1] - 1:
        raise ValueError(f"{pos.shape[1] - 1} position embeddings do not form a square grid")
    gh, gw = grid
    if (gh, gw) == (m, m):  # as both references: a scale factor would still resample
        return pos
    scales = [None, None] if offset == 0 else [(g + offset) / m for g in (gh, gw)]
    rows, cols = bicubic_matrix(m, gh, scales[0]), bicubic_matrix(m, gw, scales[1])
    patches = pos[0, 1:].reshape(m, m, -1).astype(np.float64)
    resized = np.einsum("ai,bj,ijd->abd", rows, cols, patches).reshape(1, gh * gw, -1)
    return np.concatenate([pos[:, :1], resized.astype(np.float32)], axis=1)


class Dinov2Layer(nn.Module):
    """One pre-norm block: attention and FFN, each behind a LayerScale. Scanned."""

    config: Dinov2Config
    dtype: Any = jnp.float32
    precision: str | None = None

    @nn.compact
    def __call__(self, x: Array, _) -> tuple[Array, None]:
        """x (b, n, d) -> (b, n, d)."""
        c = self.config
        b, n, d = x.shape
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision
        )
        layer_norm = functools.partial(
            nn.LayerNorm, epsilon=c.eps, dtype=self.dtype, param_dtype=jnp.float32
        )

        def scale(name):
            return self.param(name, nn.initializers.ones, (d,), jnp.float32).astype(self.dtype)

        h = layer_norm(name="norm1")(x)
        q, k, v = (
            dense(d, use_bias=c.qkv_bias, name=name)(h).reshape(b, n, c.num_heads, -1)
            for name in ("q", "k", "v")
        )
        h = energy_attention(q, k, v, precision=self.precision).reshape(b, n, d)
        x = x + scale("layer_scale1") * dense(d, name="o")(h)

        h = layer_norm(name="norm2")(x)
        if c.swiglu:
            h = nn.silu(dense(c.ffn_size, name="gate")(h)) * dense(c.ffn_size, name="up")(h)
            h = dense(d, name="down")(h)
        else:
            h = activation(c.hidden_act)(dense(c.ffn_size, name="fc1")(h))
            h = dense(d, name="fc2")(h)
        return x + scale("layer_scale2") * h, None


class Dinov2(nn.Module):
    """The DINOv2 ViT on normalised pixels; returns the pooled output (final-normed CLS)."""

    config: Dinov2Config
    dtype: Any = jnp.float32
    precision: str | None = None

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        """pixels (b, s, s, 3), s a multiple of the patch size -> (b, d) float32."""
        c = self.config
        p, d = c.patch_size, c.hidden_size
        x = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            precision=self.precision,
            name="patch_embed",
        )(pixels.astype(self.dtype))
        b, gh, gw, _ = x.shape
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d), jnp.float32)
        # Already resampled to this grid when the folder was loaded.
        pos = self.param(
            "position_embeddings", nn.initializers.zeros, (1, 1 + gh * gw, d), jnp.float32
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x.reshape(b, gh * gw, d)], axis=1) + pos.astype(self.dtype)
        layers = nn.scan(
            Dinov2Layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=c.num_layers,
        )
        x, _ = layers(c, self.dtype, self.precision, name="layers")(x, None)
        # LayerNorm acts per token: norming the CLS token alone is the pooled output.
        out = nn.LayerNorm(
            epsilon=c.eps, dtype=self.dtype, param_dtype=jnp.float32, name="layernorm"
        )(x[:, 0])
        return out.astype(jnp.float32)


def preprocess(images: Array, image_size: int = 224) -> Array:
    """uint8 (n, H, W, 3) -> (n, s, s, 3) float32 as torch-fidelity feeds DINOv2.

    TensorFlow 1 bilinear resize to s = image_size, then (x - 255 mean) / (255 std).
    """
    x = bilinear_tf1(jnp.asarray(images).astype(jnp.float32), (image_size, image_size))
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255
    return (x - mean) / std


def _layout(tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The Dinov2Model tensors, without a prefix and in the names transformers writes."""
    found = [k for k in tensors if k.endswith(PATCH_KEY)]
    if len(found) != 1:
        why = "no tensor" if not found else f"{len(found)} tensors"
        raise ValueError(
            f"{source} is not a transformers Dinov2Model checkpoint: {why} named "
            f"'[prefix]{PATCH_KEY}'"
        )
    prefix = found[0][: -len(PATCH_KEY)]
    out = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue  # a task head beside the model (classifier.weight)
        key = key[len(prefix) :]
        for new, old in RENAMES:
            key = key.replace(new, old)
        out[key] = value
    return out


def _ffn_in(sd: StateDict, pre: str, d: int, f: int) -> dict:
    """SwiGLU's gate and up projections: halves of ``weights_in``, or stored apart."""
    if not sd.has(f"{pre}.weights_in.weight"):
        return {
            "gate": linear(sd, f"{pre}.gate_proj", d, f),
            "up": linear(sd, f"{pre}.up_proj", d, f),
        }
    both = linear(sd, f"{pre}.weights_in", d, 2 * f)
    return {
        name: {"kernel": both["kernel"][:, half], "bias": both["bias"][half]}
        for name, half in (("gate", slice(0, f)), ("up", slice(f, 2 * f)))
    }


def _layer(sd: StateDict, c: Dinov2Config, i: int) -> dict:
    """Block i's params (views of the checkpoint where the layout allows)."""
    d, f, pre = c.hidden_size, c.ffn_size, f"encoder.layer.{i}"
    att = f"{pre}.attention"
    p = {
        "norm1": norm(sd, f"{pre}.norm1", d),
        "q": linear(sd, f"{att}.attention.query", d, d, c.qkv_bias),
        "k": linear(sd, f"{att}.attention.key", d, d, c.qkv_bias),
        "v": linear(sd, f"{att}.attention.value", d, d, c.qkv_bias),
        "o": linear(sd, f"{att}.output.dense", d, d),
        "layer_scale1": sd.take(f"{pre}.layer_scale1.lambda1", (d,)),
        "norm2": norm(sd, f"{pre}.norm2", d),
        "layer_scale2": sd.take(f"{pre}.layer_scale2.lambda1", (d,)),
    }
    if c.swiglu:
        p.update(_ffn_in(sd, f"{pre}.mlp", d, f))
        p["down"] = linear(sd, f"{pre}.mlp.weights_out", f, d)
    else:
        p["fc1"] = linear(sd, f"{pre}.mlp.fc1", d, f)
        p["fc2"] = linear(sd, f"{pre}.mlp.fc2", f, d)
    return p


def convert(
    tensors: dict[str, np.ndarray],
    c: Dinov2Config,
    grid: tuple[int, int],
    offset: float = 0.0,
    source: str = "checkpoint",
) -> dict:
    """Flax params of ``Dinov2`` (float32 numpy) from a Dinov2Model state dict.

    Args:
      tensors: the state dict, any prefix, either name layout.
      c: its config.
      grid: (gh, gw) patches of the input the position embeddings are resampled to.
      offset: see ``interpolate_position_embeddings``.
      source: the file, for error messages.

    Raises:
      ValueError: not a Dinov2Model state dict, or a tensor missing, left over or of the
        wrong shape (named).
    """
    sd = StateDict(_layout(tensors, source), source)
    sd.skip("embeddings.mask_token")  # only for masked pre-training
    d = c.hidden_size
    pos = sd.take("embeddings.position_embeddings")
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
        raise ValueError(
            f"{source}: tensor 'embeddings.position_embeddings' has shape {pos.shape}, "
            f"expected (1, 1 + m * m, {d})"
        )
    layers = [_layer(sd, c, i) for i in range(c.num_layers)]
    p = {
        "patch_embed": conv2d(sd, "embeddings.patch_embeddings.projection", 3, d, c.patch_size),
        "cls_token": sd.take("embeddings.cls_token", (1, 1, d)),
        "position_embeddings": interpolate_position_embeddings(pos, grid, offset),
        # the blocks' params stacked on a leading layer axis, as nn.scan runs them
        "layers": jax.tree.map(lambda *xs: np.stack(xs, dtype=np.float32), *layers),
        "layernorm": norm(sd, "layernorm", d),
    }
    sd.finish()
    return jax.tree.map(lambda x: np.asarray(x, np.float32), p)


def load_dinov2(
    folder: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    image_size: int = 224,
    interpolate_offset: float = 0.1,
) -> FeatureExtractor:
    """DINOv2 features of uint8 images, from a transformers Dinov2Model folder.

    Args:
      folder: config.json and model.safetensors (or its sharded index) of a Dinov2Model.
      dtype: compute dtype, "float32", "bfloat16" or "float16"; params stay float32 and
        features come out float32. float32 matmuls run at the highest precision (as the
        reference computes; TPU and GPU defaults multiply in bfloat16 or TF32), the
        others at the default.
      image_size: the side images are resized to, a multiple of the patch size (224 as
        torch-fidelity); the position embeddings are resampled to it once, here.
      interpolate_offset: 0.1 (the default) resamples the position embeddings as torch
        hub's dinov2 does, which torch-fidelity's and dgm-eval's FD-DINOv2 run, so that
        the numbers compare with theirs; 0 as transformers' Dinov2Model.

    Returns:
      A FeatureExtractor named "dinov2" of width hidden_size; ``apply`` takes uint8
      (n, H, W, 3) and resizes and normalises on the device.

    Raises:
      ValueError: a bad argument (naming it and its allowed values), or a folder that is
        not a Dinov2Model (naming the missing file, field or tensor).
    """
    folder = os.fspath(folder)
    if jnp.dtype(dtype).name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {jnp.dtype(dtype).name}")
    if not 0.0 <= interpolate_offset < 1.0:
        raise ValueError(f"interpolate_offset must be in [0, 1), got {interpolate_offset}")
    c = make_config(read_config(folder), os.path.join(folder, "config.json"))
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or image_size < c.patch_size
        or image_size % c.patch_size
    ):
        raise ValueError(
            f"image_size must be a positive multiple of the patch size {c.patch_size}, "
            f"got {image_size!r}"
        )
    tensors, source = read_folder(folder)
    grid = (image_size // c.patch_size,) * 2
    params = jax.tree.map(jnp.asarray, convert(tensors, c, grid, interpolate_offset, source))
    return from_params(
        c,
        params,
        dtype=dtype,
        image_size=image_size,
        folder=folder,
        weights=source,
        resize="bilinear, TensorFlow 1 (torch-fidelity)",
        normalise="ImageNet mean and std",
        interpolate_offset=interpolate_offset,
    )


def from_params(
    c: Dinov2Config, params: Any, *, dtype: Any = jnp.float32, image_size: int = 224, **settings
) -> FeatureExtractor:
    """The network ``load_dinov2`` builds, on params already in ``Dinov2``'s layout.

    For weights that come from no folder, e.g. random ones for a speed measurement. The
    position embeddings must already be resampled to image_size's grid (as ``convert``
    does); ``dtype`` and ``image_size`` as in ``load_dinov2``; ``settings`` go into the
    extractor's settings beside them.
    """
    dtype = jnp.dtype(dtype)
    precision = "highest" if dtype == jnp.float32 else None
    model = Dinov2(c, dtype, precision)

    def apply(params: Any, images: Array) -> Array:
        return model.apply({"params": params}, preprocess(images, image_size))

    model_name = SIZES.get(c.hidden_size, f"ViT/{c.patch_size} (hidden {c.hidden_size})")
    settings = dict(
        settings,
        model=model_name,
        layers=c.num_layers,
        image_size=image_size,
        dtype=dtype.name,
        precision=precision,
    )
    return FeatureExtractor("dinov2", c.hidden_size, params, apply, settings=settings)
