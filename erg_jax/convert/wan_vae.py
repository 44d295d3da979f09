"""Converts a diffusers AutoencoderKLWan folder into erg_jax.models.wan_vae params and config.

The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or .bin / a
sharded index), as ``AutoencoderKLWan.save_pretrained`` writes them (the ``vae/`` folder
of a Wan 2.1 pipeline). Each leaf of our params names its tensor; every tensor must be
used and have the shape the config implies, or conversion fails with a ValueError that
names it. Torch layouts become Flax ones: Conv3d (out, in, t, h, w) -> (t, h, w, in, out),
Conv2d (out, in, h, w) -> (h, w, in, out), a 1x1(x1) conv -> Dense (in, out), the RMS
norms' gamma (c, 1, 1[, 1]) -> scale (c,).

Key mapping (torch -> flax path):

    {en,de}coder.conv_in, conv_out, norm_out.gamma     {en,de}coder/conv_in, ..., norm_out/scale
    encoder.down_blocks.k.X                            encoder/down_blocks_k/X
    decoder.up_blocks.i.resnets.j.X                    decoder/up_blocks_i_resnets_j/X
    decoder.up_blocks.i.upsamplers.0.X                 decoder/up_blocks_i_upsample/X
    {en,de}coder.mid_block.resnets.k / attentions.0    .../mid_block/resnets_k / attentions_0
    resampler resample.1 (its conv), time_conv         resample, time_conv
    quant_conv, post_quant_conv                        quant_conv, post_quant_conv

where X is a residual block's norm1, conv1, norm2, conv2, conv_shortcut, an attention
block's norm, to_qkv, proj, or a resampler's layers.
"""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax.models.wan_vae import PRESETS, init_params, wan_vae_config
from erg_jax.weights import StateDict, find_weights, place_leaves, read_config, read_state_dict

_FIELDS = (
    "base_dim",
    "decoder_base_dim",
    "z_dim",
    "dim_mult",
    "num_res_blocks",
    "temperal_downsample",
    "in_channels",
    "out_channels",
    "latents_mean",
    "latents_std",
)

# Our module names -> the reference's, one path component at a time.
_RENAMES = (
    (re.compile(r"^up_blocks_(\d+)_resnets_(\d+)$"), r"up_blocks.\1.resnets.\2"),
    (re.compile(r"^up_blocks_(\d+)_upsample$"), r"up_blocks.\1.upsamplers.0"),
    (re.compile(r"^(down_blocks|resnets|attentions)_(\d+)$"), r"\1.\2"),
    (re.compile(r"^resample$"), "resample.1"),
    (re.compile(r"^kernel$"), "weight"),
    (re.compile(r"^scale$"), "gamma"),
)


def config_from_diffusers(cfg: dict) -> dict:
    """Our config (kind='wan-vae') from a diffusers AutoencoderKLWan config.json dict.

    Fields it leaves out take diffusers' defaults (those of the published Wan 2.1 VAE).

    Raises:
      ValueError: a Wan 2.2-style residual VAE, patchified input, or attention in the
        encoder's down path, none of which this port builds.
    """
    if cfg.get("is_residual", False):
        raise ValueError("unsupported Wan VAE: is_residual=True (the Wan 2.2 VAE)")
    if cfg.get("patch_size") is not None:
        raise ValueError(f"unsupported Wan VAE: patch_size={cfg['patch_size']}")
    if cfg.get("attn_scales"):
        raise ValueError(f"unsupported Wan VAE: attn_scales={cfg['attn_scales']}")
    published = PRESETS["wan2.1"]
    return wan_vae_config("wan2.1", **{k: cfg.get(k, published[k]) for k in _FIELDS})


def _torch_key(path: tuple[str, ...]) -> str:
    parts = []
    for name in path:
        for pattern, repl in _RENAMES:
            name = pattern.sub(repl, name)
        parts.append(name)
    return ".".join(parts)


def _to_flax(w: np.ndarray, name: str, ndim: int) -> np.ndarray:
    """A torch tensor in the layout of the Flax leaf ``name`` with ``ndim`` axes; a
    tensor that does not fit is left as it is, for the shape check to name."""
    if name == "scale" and w.ndim > 1 and w.size == w.shape[0]:
        return w.reshape(w.shape[:1])  # gamma (c, 1, 1[, 1])
    if name != "kernel" or w.ndim < 3:
        return w
    w = np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))  # (out, in, *k) -> (*k, in, out)
    if ndim == 2 and w.size == np.prod(w.shape[-2:]):
        return w.reshape(w.shape[-2:])  # a 1x1(x1) conv as a Dense
    return w


def convert_wan_vae_state_dict(
    tensors: dict[str, np.ndarray], config: dict, source: str = "Wan VAE checkpoint"
) -> dict:
    """Flax params (numpy, in the config's param_dtype) of a diffusers AutoencoderKLWan
    state dict; each tensor is cast on its own, so a bf16 file is never held in float32."""
    sd = StateDict(tensors, source)
    abstract = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))

    def read(path, leaf):
        transform = functools.partial(_to_flax, name=path[-1], ndim=len(leaf.shape))
        return sd.take(_torch_key(path), leaf.shape, transform)

    dtype = np.dtype(jnp.dtype(config.get("param_dtype", "float32")))
    params = place_leaves(abstract, read, dtype, ())
    sd.finish()
    return params


def convert_diffusers_wan_vae(folder: str, *, param_dtype: str = "float32") -> tuple[dict, dict]:
    """Reads a diffusers AutoencoderKLWan folder.

    Args:
      folder: directory with config.json and diffusion_pytorch_model.safetensors (the
        ``vae`` subfolder of a Wan pipeline).
      param_dtype: the dtype the params are stored in ("bfloat16" halves them); written
        into the config, whose layers compute in its ``dtype`` (float32 by default).

    Returns:
      (params, config): numpy params in param_dtype for
      ``erg_jax.models.wan_vae.make_wan_vae`` and the config dict (kind='wan-vae').

    Raises:
      ValueError: missing or unreadable files, an unsupported config, or a tensor that
        is missing, unknown or of the wrong shape (the message names it).
    """
    config = dict(config_from_diffusers(read_config(folder)), param_dtype=str(param_dtype))
    path = find_weights(folder)
    tensors = read_state_dict(path)
    return convert_wan_vae_state_dict(tensors, config, os.path.basename(path)), config
