"""The KL autoencoder (VAE) of latent diffusion, in Flax, NHWC.

Follows the AutoencoderKL of Rombach et al. 2022 (High-Resolution Image Synthesis with
Latent Diffusion Models, sec. 3 and app. G) as laid out in diffusers, so its checkpoints
convert key by key (``erg_jax.convert.vae``). The encoder maps images x in [-1, 1] to a
diagonal Gaussian q(z|x) = N(mean, exp(logvar)); the decoder maps latents back. A
diffusion model lives in the scaled latent space

    z_model = (z - shift_factor) * scaling_factor,     z = z_model / scaling_factor + shift

(sec. 4.3.2 and D.1 of the paper for the scale; the SD3 VAE adds the shift). Blocks:
pre-norm ResNet blocks (GroupNorm, eps 1e-6, SiLU), strided-conv downsampling with the
(0, 1) bottom/right padding of the original code, nearest-neighbour upsampling, and one
single-head self-attention over all H*W tokens in each mid-block, computed by
``erg_jax.energy.energy_attention``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from erg_jax.energy import energy_attention

Array = jax.Array

_SD = dict(
    kind="vae",
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    mid_block_add_attention=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    scaling_factor=0.18215,
    shift_factor=0.0,
    sample_size=256,
    dtype="float32",
    param_dtype="float32",
    precision="default",
    attention_implementation=None,
)
# The 16-channel VAE of Stable Diffusion 3: no quant convs, a latent shift.
_SD3 = dict(
    _SD,
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    sample_size=1024,
)
_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16)
PRESETS: dict[str, dict] = {
    "sd": _SD,  # stabilityai/sd-vae-ft-ema and -mse: DiT's VAE, also SD 1.x / 2.x.
    "sd3": _SD3,
    "tiny": dict(_SD, **_TINY),  # tiny sizes for tests
    "tiny16": dict(_SD3, **_TINY),
}


def vae_config(name: str = "sd", **overrides: Any) -> dict:
    """The config dict (kind='vae') of a preset ('sd', 'sd3', 'tiny', 'tiny16').

    Overrides replace fields; an unknown field is a ValueError.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; choose from {sorted(PRESETS)}")
    config = dict(PRESETS[name])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown VAE config field(s) {unknown}")
    config.update(overrides)
    config["block_out_channels"] = tuple(int(c) for c in config["block_out_channels"])
    config["shift_factor"] = float(config["shift_factor"] or 0.0)
    groups = config["norm_num_groups"]
    if any(c % groups for c in config["block_out_channels"]):
        raise ValueError(
            f"block_out_channels {config['block_out_channels']} must be "
            f"multiples of norm_num_groups={groups}"
        )
    return config


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every VAE layer shares: GroupNorm groups, the three dtypes, attention kernel."""

    groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: str | None = None
    attention_implementation: str | None = None


def _conv(
    s: Settings, features: int, name: str | None, kernel: int = 3, stride: int = 1, padding: Any = 1
) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=padding,
        dtype=s.dtype,
        param_dtype=s.param_dtype,
        precision=s.precision,
        name=name,
    )


def _norm(s: Settings, name: str) -> nn.GroupNorm:
    # The two-pass variance matches torch's GroupNorm closely in float32.
    return nn.GroupNorm(
        num_groups=s.groups,
        epsilon=1e-6,
        use_fast_variance=False,
        dtype=s.dtype,
        param_dtype=s.param_dtype,
        name=name,
    )


class ResnetBlock(nn.Module):
    """Pre-norm residual block: x + conv(silu(norm(conv(silu(norm(x)))))).

    A 1x1 ``conv_shortcut`` maps x to ``features`` channels when they differ.
    """

    features: int
    s: Settings

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(b, H, W, c_in) -> (b, H, W, features)."""
        h = _conv(self.s, self.features, "conv1")(nn.silu(_norm(self.s, "norm1")(x)))
        h = _conv(self.s, self.features, "conv2")(nn.silu(_norm(self.s, "norm2")(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.s, self.features, "conv_shortcut", kernel=1, padding=0)(x)
        return x + h


class MidAttention(nn.Module):
    """Single-head self-attention over the H*W tokens, with a residual connection."""

    s: Settings

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(b, H, W, c) -> (b, H, W, c); beta = 1 / sqrt(c)."""
        b, hgt, wid, c = x.shape
        h = _norm(self.s, "group_norm")(x).reshape(b, hgt * wid, 1, c)

        def dense(name):
            return nn.Dense(
                c,
                dtype=self.s.dtype,
                param_dtype=self.s.param_dtype,
                precision=self.s.precision,
                name=name,
            )

        q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
        if self.s.precision is None:
            out = energy_attention(q, k, v, implementation=self.s.attention_implementation)
        else:
            # energy_attention takes no precision argument; its einsums read this default.
            with jax.default_matmul_precision(self.s.precision):
                out = energy_attention(q, k, v, implementation=self.s.attention_implementation)
        out = dense("to_out")(out.reshape(b, hgt * wid, c))
        return x + out.reshape(x.shape).astype(x.dtype)


class MidBlock(nn.Module):
    """resnets_0 -> attentions_0 -> resnets_1 at the lowest resolution."""

    features: int
    s: Settings
    attention: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = ResnetBlock(self.features, self.s, name="resnets_0")(x)
        if self.attention:
            x = MidAttention(self.s, name="attentions_0")(x)
        return ResnetBlock(self.features, self.s, name="resnets_1")(x)


class Encoder(nn.Module):
    """Images (b, H, W, in) -> Gaussian moments (b, H/f, W/f, 2 * latent), f = 2^(L-1)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    s: Settings
    mid_attention: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        chans = self.block_out_channels
        x = _conv(self.s, chans[0], "conv_in")(x)
        for i, c in enumerate(chans):
            for j in range(self.layers_per_block):
                x = ResnetBlock(c, self.s, name=f"down_blocks_{i}_resnets_{j}")(x)
            if i < len(chans) - 1:
                # Pad only the bottom and right, then a valid stride-2 conv (as trained).
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
                x = _conv(self.s, c, f"down_blocks_{i}_downsample", stride=2, padding=0)(x)
        x = MidBlock(chans[-1], self.s, self.mid_attention, name="mid_block")(x)
        x = nn.silu(_norm(self.s, "conv_norm_out")(x))
        return _conv(self.s, 2 * self.latent_channels, "conv_out")(x)


class Decoder(nn.Module):
    """Latents (b, h, w, latent) -> images (b, h*f, w*f, out)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    s: Settings
    mid_attention: bool = True

    @nn.compact
    def __call__(self, z: Array) -> Array:
        chans = tuple(reversed(self.block_out_channels))
        x = _conv(self.s, chans[0], "conv_in")(z)
        x = MidBlock(chans[0], self.s, self.mid_attention, name="mid_block")(x)
        for i, c in enumerate(chans):
            for j in range(self.layers_per_block + 1):
                x = ResnetBlock(c, self.s, name=f"up_blocks_{i}_resnets_{j}")(x)
            if i < len(chans) - 1:
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
                x = _conv(self.s, c, f"up_blocks_{i}_upsample")(x)
        x = nn.silu(_norm(self.s, "conv_norm_out")(x))
        return _conv(self.s, self.out_channels, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """Encoder + decoder with the optional 1x1 quant / post-quant convs.

    ``encode`` and ``decode`` work in the raw (unscaled) latent space; see ``make_vae``
    for the model-space wrappers. ``__call__`` (used for init) reconstructs the mean.
    """

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    s: Settings = Settings()

    def setup(self):
        args = (self.block_out_channels, self.layers_per_block)
        self.encoder = Encoder(*args, self.latent_channels, self.s, self.mid_block_add_attention)
        self.decoder = Decoder(*args, self.out_channels, self.s, self.mid_block_add_attention)
        if self.use_quant_conv:
            self.quant_conv = _conv(self.s, 2 * self.latent_channels, None, 1, padding=0)
        if self.use_post_quant_conv:
            self.post_quant_conv = _conv(self.s, self.latent_channels, None, 1, padding=0)

    def encode(self, images: Array) -> tuple[Array, Array]:
        """(b, H, W, in) in [-1, 1] -> mean, logvar, each (b, H/f, W/f, latent), float32."""
        h = self.encoder(images.astype(self.s.dtype))
        if self.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """Raw latents (b, h, w, latent) -> images (b, h*f, w*f, out), float32."""
        z = z.astype(self.s.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: Array) -> Array:
        return self.decode(self.encode(images)[0])


def vae_module(config: dict) -> AutoencoderKL:
    """The Flax module a config dict describes."""
    precision = config.get("precision")
    s = Settings(
        groups=int(config["norm_num_groups"]),
        dtype=jnp.dtype(config.get("dtype", "float32")),
        param_dtype=jnp.dtype(config.get("param_dtype", "float32")),
        precision=None if precision in (None, "default") else str(precision),
        attention_implementation=config.get("attention_implementation"),
    )
    return AutoencoderKL(
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=int(config["layers_per_block"]),
        latent_channels=int(config["latent_channels"]),
        in_channels=int(config["in_channels"]),
        out_channels=int(config["out_channels"]),
        use_quant_conv=bool(config["use_quant_conv"]),
        use_post_quant_conv=bool(config["use_post_quant_conv"]),
        mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
        s=s,
    )


def init_params(config: dict, rng: Array, image_size: int = 16) -> dict:
    """Random params (for tests); ``jax.eval_shape(partial(init_params, config), rng)``
    gives their shapes without allocating them."""
    images = jnp.zeros((1, image_size, image_size, config["in_channels"]), jnp.float32)
    return vae_module(config).init(rng, images)["params"]


def scale_latents(z: Array, config: dict) -> Array:
    """Raw latents -> model space: (z - shift_factor) * scaling_factor."""
    return (z - (config.get("shift_factor") or 0.0)) * config["scaling_factor"]


def unscale_latents(z_model: Array, config: dict) -> Array:
    """Model-space latents -> raw latents: z / scaling_factor + shift_factor."""
    return z_model / config["scaling_factor"] + (config.get("shift_factor") or 0.0)


@dataclasses.dataclass(frozen=True)
class VAE:
    """A VAE bound to its params, with jitted model-space encode / decode.

    Attributes:
      config: the config dict (kind='vae').
      params: the Flax params, in config['param_dtype'].
      module: the AutoencoderKL module.
    """

    config: dict
    params: Any
    module: AutoencoderKL
    _encode: Callable
    _decode: Callable
    _latents: Callable

    def encode(self, images: Array) -> tuple[Array, Array]:
        """(b, H, W, in) in [-1, 1] -> mean, logvar (b, H/f, W/f, latent), raw space."""
        return self._encode(self.params, images)

    def decode(self, latents: Array) -> Array:
        """Model-space latents (b, h, w, latent) -> images (b, h*f, w*f, out), float32."""
        return self._decode(self.params, latents)

    def encode_latents(self, images: Array, key: Array | None = None) -> Array:
        """Images -> model-space latents: the mean, or z ~ q(z|x) drawn with ``key``."""
        return self._latents(self.params, images, key)


def make_vae(config: dict, params: Any) -> VAE:
    """Binds params to the module of ``config`` and jits its encode and decode."""
    module = vae_module(config)
    param_dtype = jnp.dtype(config.get("param_dtype", "float32"))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, param_dtype), params)

    def encode(p, images):
        return module.apply({"params": p}, images, method=AutoencoderKL.encode)

    def decode(p, latents):
        z = unscale_latents(latents.astype(jnp.float32), config)
        return module.apply({"params": p}, z, method=AutoencoderKL.decode)

    def latents(p, images, key):
        mean, logvar = encode(p, images)
        if key is not None:
            mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return scale_latents(mean, config)

    return VAE(config, params, module, jax.jit(encode), jax.jit(decode), jax.jit(latents))
