"""The Wan 2.1 video VAE in Flax: causal 3-D encoder and decoder, chunked with a cache.

Follows the Wan-VAE of the Wan Team 2025 (Wan: Open and Advanced Large-Scale Video
Generative Models) as diffusers' AutoencoderKLWan lays it out, so its checkpoints
convert key by key (``erg_jax.convert.wan_vae``). Videos are channel-last,
(b, F, H, W, 3) in [-1, 1]; latents are (b, f, H/8, W/8, z_dim) with F = 1 + 4 (f - 1)
for the published model: the first frame is encoded on its own, every later group of 4
frames into one latent frame.

Decoding runs as the reference does, one latent frame per chunk (the first gives 1 frame,
each later one 4), and encoding one chunk of 1 then 4 frames at a time. Every causal
convolution carries the last frames of its input from chunk to chunk
(``erg_jax.models.wan_vae_layers``); here that cache is the carry of a ``jax.lax.scan``
over the chunks after the first, whose shapes are fixed, so a jitted decode compiles one
chunk whatever the frame count. The first chunk runs apart: it has no past, and the
temporal resamplers treat it differently.

The diffusion model sees per-channel normalised latents, as diffusers' Wan pipelines use:

    z_model = (z - latents_mean) * (1 / latents_std),  z = z_model / (1 / latents_std) + mean
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from erg_jax.models.wan_vae_layers import (
    Cache,
    MidBlock,
    Resample,
    ResidualBlock,
    RMSNorm,
    Settings,
    causal_conv3d,
    sub,
)

Array = jax.Array

ENCODE_CHUNK = 4  # video frames per encoder chunk after the first frame

# Per-channel statistics of the published Wan 2.1 VAE's latents (its config.json).
# fmt: off
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# fmt: on
_WAN21 = dict(
    kind="wan-vae",
    base_dim=96,
    decoder_base_dim=None,  # None: base_dim
    z_dim=16,
    dim_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    temperal_downsample=(False, True, True),  # the published (misspelt) field name
    in_channels=3,
    out_channels=3,
    latents_mean=WAN21_LATENTS_MEAN,
    latents_std=WAN21_LATENTS_STD,
    dtype="float32",
    param_dtype="float32",
    precision="default",
    attention_implementation=None,
)
# The published layout (8x in space, 4x in time) at 0.2M parameters.
_TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=(1, 2, 2, 2),
    num_res_blocks=1,
    latents_mean=(0.3, -0.5, 0.1, 0.8),
    latents_std=(1.5, 0.7, 2.0, 1.1),
)
PRESETS: dict[str, dict] = {
    "wan2.1": _WAN21,  # Wan-AI/Wan2.1-T2V-*-Diffusers, vae/
    "tiny": dict(_WAN21, **_TINY),  # tiny sizes for tests
}


def wan_vae_config(name: str = "wan2.1", **overrides: Any) -> dict:
    """The config dict (kind='wan-vae') of a preset ('wan2.1', 'tiny').

    Overrides replace fields; an unknown field, or latent statistics that are not
    z_dim long, is a ValueError.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown Wan VAE preset {name!r}; choose from {sorted(PRESETS)}")
    config = dict(PRESETS[name])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown Wan VAE config field(s) {unknown}")
    config.update(overrides)
    for key in ("dim_mult", "latents_mean", "latents_std"):
        config[key] = tuple(config[key])
    config["temperal_downsample"] = tuple(bool(t) for t in config["temperal_downsample"])
    if len(config["temperal_downsample"]) != len(config["dim_mult"]) - 1:
        raise ValueError(
            f"temperal_downsample {config['temperal_downsample']} needs one entry per "
            f"downsampling, len(dim_mult) - 1 = {len(config['dim_mult']) - 1}"
        )
    for key in ("latents_mean", "latents_std"):
        if len(config[key]) != config["z_dim"]:
            raise ValueError(f"{key} has {len(config[key])} entries, z_dim is {config['z_dim']}")
    return config


def temporal_factor(config: dict) -> int:
    """Video frames per latent frame after the first (4 for Wan 2.1)."""
    return 2 ** sum(config["temperal_downsample"])


def spatial_factor(config: dict) -> int:
    """Pixels per latent side (8 for Wan 2.1)."""
    return 2 ** (len(config["dim_mult"]) - 1)


class Encoder(nn.Module):
    """One chunk of video (b, F, H, W, in) -> Gaussian moments (b, f, h, w, 2 z_dim).

    ``down_blocks_k`` counts residual blocks and resamplers in one sequence, as the
    reference does.
    """

    base_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_downsample: tuple[bool, ...]
    out_features: int
    s: Settings

    @nn.compact
    def __call__(self, x: Array, cache: Cache = None, first: bool = False) -> tuple[Array, Cache]:
        dims = [self.base_dim * m for m in (1,) + tuple(self.dim_mult)]
        new = {}
        x, new["conv_in"] = causal_conv3d(self.s, dims[0], "conv_in", x, sub(cache, "conv_in"))
        k = 0
        for i, c in enumerate(dims[1:]):
            for _ in range(self.num_res_blocks):
                name = f"down_blocks_{k}"
                x, new[name] = ResidualBlock(c, self.s, name=name)(x, sub(cache, name))
                k += 1
            if i < len(self.dim_mult) - 1:
                mode = "downsample3d" if self.temperal_downsample[i] else "downsample2d"
                name = f"down_blocks_{k}"
                x, new[name] = Resample(mode, c, self.s, name=name)(x, sub(cache, name), first)
                k += 1
        x, new["mid_block"] = MidBlock(dims[-1], self.s, name="mid_block")(
            x, sub(cache, "mid_block")
        )
        x = nn.silu(RMSNorm(self.s, name="norm_out")(x))
        x, new["conv_out"] = causal_conv3d(
            self.s, self.out_features, "conv_out", x, sub(cache, "conv_out")
        )
        return x, new


class Decoder(nn.Module):
    """One chunk of latents (b, f, h, w, z_dim) -> video (b, F, h*8, w*8, out).

    Each upsampler halves the channels (Wan 2.1's decoder), so a block after one reads
    half the channels the block before it wrote.
    """

    base_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_upsample: tuple[bool, ...]
    out_channels: int
    s: Settings

    @nn.compact
    def __call__(self, x: Array, cache: Cache = None, first: bool = False) -> tuple[Array, Cache]:
        mult = tuple(self.dim_mult)
        dims = [self.base_dim * m for m in (mult[-1],) + mult[::-1]]
        new = {}
        x, new["conv_in"] = causal_conv3d(self.s, dims[0], "conv_in", x, sub(cache, "conv_in"))
        x, new["mid_block"] = MidBlock(dims[0], self.s, name="mid_block")(
            x, sub(cache, "mid_block")
        )
        for i, c in enumerate(dims[1:]):
            for j in range(self.num_res_blocks + 1):
                name = f"up_blocks_{i}_resnets_{j}"
                x, new[name] = ResidualBlock(c, self.s, name=name)(x, sub(cache, name))
            if i < len(mult) - 1:
                mode = "upsample3d" if self.temperal_upsample[i] else "upsample2d"
                name = f"up_blocks_{i}_upsample"
                x, new[name] = Resample(mode, c // 2, self.s, name=name)(x, sub(cache, name), first)
        x = nn.silu(RMSNorm(self.s, name="norm_out")(x))
        x, new["conv_out"] = causal_conv3d(
            self.s, self.out_channels, "conv_out", x, sub(cache, "conv_out")
        )
        return x, new


class WanAutoencoder(nn.Module):
    """Encoder, decoder and the 1x1x1 quant / post-quant convs, one chunk at a time.

    ``__call__`` (used for init) runs one later chunk through each half.
    """

    config: dict

    def setup(self):
        c, s = self.config, settings(self.config)
        args = (c["dim_mult"], c["num_res_blocks"])
        self.encoder = Encoder(c["base_dim"], *args, c["temperal_downsample"], 2 * c["z_dim"], s)
        self.decoder = Decoder(
            c["decoder_base_dim"] or c["base_dim"],
            *args,
            c["temperal_downsample"][::-1],
            c["out_channels"],
            s,
        )
        dense = functools.partial(
            nn.Dense, dtype=s.dtype, param_dtype=s.param_dtype, precision=s.precision
        )
        self.quant_conv = dense(2 * c["z_dim"])
        self.post_quant_conv = dense(c["z_dim"])

    def encode_chunk(self, x: Array, cache: Cache, first: bool) -> tuple[Array, Cache]:
        return self.encoder(x, cache, first)

    def quant(self, h: Array) -> Array:
        return self.quant_conv(h)

    def post_quant(self, z: Array) -> Array:
        return self.post_quant_conv(z)

    def decode_chunk(self, z: Array, cache: Cache, first: bool) -> tuple[Array, Cache]:
        return self.decoder(z, cache, first)

    def __call__(self, video: Array, latents: Array) -> tuple[Array, Array]:
        h = self.quant(self.encode_chunk(video, None, False)[0])
        return h, self.decode_chunk(self.post_quant(latents), None, False)[0]


def settings(config: dict) -> Settings:
    precision = config.get("precision")
    return Settings(
        dtype=jnp.dtype(config.get("dtype", "float32")),
        param_dtype=jnp.dtype(config.get("param_dtype", "float32")),
        precision=None if precision in (None, "default") else str(precision),
        attention_implementation=config.get("attention_implementation"),
    )


def init_params(config: dict, rng: Array) -> dict:
    """Random params (for tests); ``jax.eval_shape(partial(init_params, config), rng)``
    gives their shapes without allocating them."""
    side = spatial_factor(config)
    video = jnp.zeros((1, ENCODE_CHUNK, side, side, config["in_channels"]), jnp.float32)
    latents = jnp.zeros((1, 1, 1, 1, config["z_dim"]), jnp.float32)
    return WanAutoencoder(config).init(rng, video, latents)["params"]


def _time_major_scan(step: Callable, cache: Cache, chunks: Array) -> Array:
    """Runs step(cache, chunk) -> (cache, out) over chunks (b, n, ...) and joins the outs
    (n, b, t, ...) into (b, n * t, ...)."""
    _, outs = jax.lax.scan(step, cache, jnp.moveaxis(chunks, 1, 0))
    outs = jnp.moveaxis(outs, 0, 1)
    return outs.reshape(outs.shape[:1] + (-1,) + outs.shape[3:])


def decode_raw(module: WanAutoencoder, params: Any, z: Array) -> Array:
    """Raw latents (b, f, h, w, z_dim) -> video (b, 1 + T (f - 1), h*8, w*8, out) in
    [-1, 1] (clipped), float32; T = temporal_factor. One latent frame per chunk."""
    apply = functools.partial(module.apply, {"params": params})
    x = apply(z.astype(settings(module.config).dtype), method=WanAutoencoder.post_quant)
    out, cache = apply(x[:, :1], None, True, method=WanAutoencoder.decode_chunk)
    if x.shape[1] > 1:

        def step(cache, chunk):
            out, cache = apply(chunk[:, None], cache, False, method=WanAutoencoder.decode_chunk)
            return cache, out

        out = jnp.concatenate([out, _time_major_scan(step, cache, x[:, 1:])], axis=1)
    return jnp.clip(out.astype(jnp.float32), -1.0, 1.0)


def encode_raw(module: WanAutoencoder, params: Any, video: Array) -> tuple[Array, Array]:
    """Video (b, 1 + 4 k, H, W, in) in [-1, 1] -> raw mean, logvar (b, f, H/8, W/8, z_dim)
    in float32; the first frame, then chunks of 4 frames."""
    n = video.shape[1]
    if (n - 1) % ENCODE_CHUNK:
        raise ValueError(f"the Wan VAE encodes 1 + {ENCODE_CHUNK} k frames, got {n}")
    apply = functools.partial(module.apply, {"params": params})
    x = video.astype(settings(module.config).dtype)
    h, cache = apply(x[:, :1], None, True, method=WanAutoencoder.encode_chunk)
    if n > 1:

        def step(cache, chunk):
            out, cache = apply(chunk, cache, False, method=WanAutoencoder.encode_chunk)
            return cache, out

        chunks = x[:, 1:].reshape(x.shape[:1] + (-1, ENCODE_CHUNK) + x.shape[2:])
        h = jnp.concatenate([h, _time_major_scan(step, cache, chunks)], axis=1)
    h = apply(h, method=WanAutoencoder.quant).astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def _stats(config: dict) -> tuple[Array, Array]:
    mean = jnp.asarray(config["latents_mean"], jnp.float32)
    return mean, 1.0 / jnp.asarray(config["latents_std"], jnp.float32)


def normalize_latents(z: Array, config: dict) -> Array:
    """Raw latents (..., z_dim) -> model space: (z - mean) * (1 / std)."""
    mean, inv_std = _stats(config)
    return (z - mean) * inv_std


def denormalize_latents(latents: Array, config: dict) -> Array:
    """Model-space latents (..., z_dim) -> raw: latents / (1 / std) + mean, the Wan
    pipelines' own arithmetic."""
    mean, inv_std = _stats(config)
    return latents / inv_std + mean


@dataclasses.dataclass(frozen=True)
class WanVAE:
    """A Wan VAE bound to its params, with jitted model-space encode / decode.

    Attributes:
      config: the config dict (kind='wan-vae').
      params: the Flax params, in config['param_dtype'].
      module: the WanAutoencoder module.
    """

    config: dict
    params: Any
    module: WanAutoencoder
    _decode: Callable
    _moments: Callable
    _latents: Callable

    def decode(self, latents: Array) -> Array:
        """Model-space latents (b, f, h, w, z_dim) -> video (b, 1 + 4 (f - 1), 8h, 8w, 3),
        float32 in [-1, 1]."""
        return self._decode(self.params, latents)

    def encode(self, video: Array) -> Array:
        """Video (b, 1 + 4 k, H, W, 3) in [-1, 1] -> model-space latent means
        (b, 1 + k, H/8, W/8, z_dim)."""
        return self._latents(self.params, video, None)

    def encode_latents(self, video: Array, key: Array | None = None) -> Array:
        """Video -> model-space latents: the mean, or z ~ q(z|x) drawn with ``key``."""
        return self._latents(self.params, video, key)

    def moments(self, video: Array) -> tuple[Array, Array]:
        """Video -> raw (unnormalised) mean, logvar (b, 1 + k, H/8, W/8, z_dim)."""
        return self._moments(self.params, video)


def make_wan_vae(config: dict, params: Any) -> WanVAE:
    """Binds params to the module of ``config`` and jits its encode and decode."""
    module = WanAutoencoder(config)
    param_dtype = jnp.dtype(config.get("param_dtype", "float32"))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, param_dtype), params)

    def decode(p, latents):
        if latents.shape[-1] != config["z_dim"]:
            raise ValueError(f"latents {latents.shape} need z_dim={config['z_dim']} channels")
        z = denormalize_latents(latents.astype(jnp.float32), config)
        return decode_raw(module, p, z)

    def moments(p, video):
        return encode_raw(module, p, video)

    def latents(p, video, key):
        mean, logvar = encode_raw(module, p, video)
        if key is not None:
            mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return normalize_latents(mean, config)

    return WanVAE(config, params, module, jax.jit(decode), jax.jit(moments), jax.jit(latents))


def count_params(params: Any) -> int:
    """The number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
