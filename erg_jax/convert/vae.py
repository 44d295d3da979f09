"""Converts a diffusers AutoencoderKL folder into erg_jax.models.vae params and config.

The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or .bin /
a sharded index), as ``AutoencoderKL.save_pretrained`` writes them. Every tensor must be
used and have the shape the config implies, or conversion fails with a ValueError that
names it. Torch layouts become Flax ones: Conv2d (out, in, kh, kw) -> (kh, kw, in, out),
Linear (out, in) -> (in, out), norm weight -> scale.

Key mapping (torch -> flax path; i = block, j = resnet, r = resnet sub-layer in
{norm1, conv1, norm2, conv2, conv_shortcut}):

    encoder.conv_in                              encoder/conv_in
    encoder.down_blocks.i.resnets.j.r            encoder/down_blocks_i_resnets_j/r
    encoder.down_blocks.i.downsamplers.0.conv    encoder/down_blocks_i_downsample
    decoder.conv_in                              decoder/conv_in
    decoder.up_blocks.i.resnets.j.r              decoder/up_blocks_i_resnets_j/r
    decoder.up_blocks.i.upsamplers.0.conv        decoder/up_blocks_i_upsample
    {en,de}coder.mid_block.resnets.k.r           {en,de}coder/mid_block/resnets_k/r
    {en,de}coder.mid_block.attentions.0.X        {en,de}coder/mid_block/attentions_0/Y
        X: group_norm, to_q, to_k, to_v, to_out.0      (current diffusers)
           group_norm, query, key, value, proj_attn    (checkpoints before diffusers 0.14)
        Y: group_norm, to_q, to_k, to_v, to_out
    {en,de}coder.conv_norm_out, conv_out         {en,de}coder/conv_norm_out, conv_out
    quant_conv, post_quant_conv                  quant_conv, post_quant_conv (if in config)

The config's ``scaling_factor`` and ``shift_factor`` (None -> 0) define the model latent
space (see erg_jax.models.vae).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from erg_jax.models.vae import vae_config
from erg_jax.weights import (
    StateDict,
    conv2d,
    find_weights,
    linear,
    norm,
    read_config,
    read_state_dict,
)

# (new name, old name) of the mid-block attention's sub-layers.
_ATTENTION_NAMES = (
    ("to_q", "query"),
    ("to_k", "key"),
    ("to_v", "value"),
    ("to_out.0", "proj_attn"),
)


def config_from_diffusers(cfg: dict) -> dict:
    """Our VAE config (kind='vae') from a diffusers AutoencoderKL config.json dict."""
    chans = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
    down = tuple(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
    up = tuple(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
    if down != ("DownEncoderBlock2D",) * len(chans) or up != ("UpDecoderBlock2D",) * len(chans):
        raise ValueError(
            f"unsupported VAE blocks down={down} up={up}: only DownEncoderBlock2D / "
            f"UpDecoderBlock2D, one per entry of block_out_channels {chans}"
        )
    if cfg.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported VAE act_fn {cfg['act_fn']!r} (only 'silu')")
    for name in ("latents_mean", "latents_std"):
        if cfg.get(name) is not None:
            raise ValueError(
                f"VAE config sets {name}; per-channel latent statistics are not "
                "supported (only scaling_factor and shift_factor)"
            )
    size = cfg.get("sample_size", 32)
    return vae_config(
        "sd",
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        block_out_channels=chans,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        shift_factor=float(cfg.get("shift_factor") or 0.0),
        sample_size=int(size[0] if isinstance(size, (list, tuple)) else size),
    )


def _resnet(sd: StateDict, prefix: str, c_in: int, c_out: int) -> dict:
    p = {
        "norm1": norm(sd, f"{prefix}.norm1", c_in),
        "conv1": conv2d(sd, f"{prefix}.conv1", c_in, c_out, 3),
        "norm2": norm(sd, f"{prefix}.norm2", c_out),
        "conv2": conv2d(sd, f"{prefix}.conv2", c_out, c_out, 3),
    }
    if c_in != c_out:
        p["conv_shortcut"] = conv2d(sd, f"{prefix}.conv_shortcut", c_in, c_out, 1)
    return p


def _attention(sd: StateDict, prefix: str, c: int) -> dict:
    p = {"group_norm": norm(sd, f"{prefix}.group_norm", c)}
    for new, old in _ATTENTION_NAMES:
        name = (
            new if sd.has(f"{prefix}.{new}.weight") or not sd.has(f"{prefix}.{old}.weight") else old
        )
        p[new.split(".")[0]] = linear(sd, f"{prefix}.{name}", c, c)
    return p


def _mid_block(sd: StateDict, prefix: str, c: int, attention: bool) -> dict:
    p = {f"resnets_{k}": _resnet(sd, f"{prefix}.resnets.{k}", c, c) for k in range(2)}
    if attention:
        p["attentions_0"] = _attention(sd, f"{prefix}.attentions.0", c)
    return p


def _encoder(sd: StateDict, config: dict) -> dict:
    chans, layers = config["block_out_channels"], config["layers_per_block"]
    p = {"conv_in": conv2d(sd, "encoder.conv_in", config["in_channels"], chans[0], 3)}
    c_prev = chans[0]
    for i, c in enumerate(chans):
        for j in range(layers):
            p[f"down_blocks_{i}_resnets_{j}"] = _resnet(
                sd, f"encoder.down_blocks.{i}.resnets.{j}", c_prev, c
            )
            c_prev = c
        if i < len(chans) - 1:
            p[f"down_blocks_{i}_downsample"] = conv2d(
                sd, f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3
            )
    p["mid_block"] = _mid_block(
        sd, "encoder.mid_block", chans[-1], config["mid_block_add_attention"]
    )
    p["conv_norm_out"] = norm(sd, "encoder.conv_norm_out", chans[-1])
    p["conv_out"] = conv2d(sd, "encoder.conv_out", chans[-1], 2 * config["latent_channels"], 3)
    return p


def _decoder(sd: StateDict, config: dict) -> dict:
    chans = tuple(reversed(config["block_out_channels"]))
    layers = config["layers_per_block"] + 1
    p = {"conv_in": conv2d(sd, "decoder.conv_in", config["latent_channels"], chans[0], 3)}
    p["mid_block"] = _mid_block(
        sd, "decoder.mid_block", chans[0], config["mid_block_add_attention"]
    )
    c_prev = chans[0]
    for i, c in enumerate(chans):
        for j in range(layers):
            p[f"up_blocks_{i}_resnets_{j}"] = _resnet(
                sd, f"decoder.up_blocks.{i}.resnets.{j}", c_prev, c
            )
            c_prev = c
        if i < len(chans) - 1:
            p[f"up_blocks_{i}_upsample"] = conv2d(
                sd, f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3
            )
    p["conv_norm_out"] = norm(sd, "decoder.conv_norm_out", chans[-1])
    p["conv_out"] = conv2d(sd, "decoder.conv_out", chans[-1], config["out_channels"], 3)
    return p


def convert_vae_state_dict(
    tensors: dict[str, np.ndarray], config: dict, source: str = "VAE checkpoint"
) -> dict:
    """Flax params (numpy, in the config's param_dtype) of a diffusers AutoencoderKL
    state dict; each tensor is cast on its own, so a bf16 file is never held in float32."""
    sd = StateDict(tensors, source)
    latent = config["latent_channels"]
    params = {"encoder": _encoder(sd, config), "decoder": _decoder(sd, config)}
    if config["use_quant_conv"]:
        params["quant_conv"] = conv2d(sd, "quant_conv", 2 * latent, 2 * latent, 1)
    if config["use_post_quant_conv"]:
        params["post_quant_conv"] = conv2d(sd, "post_quant_conv", latent, latent, 1)
    sd.finish()
    dtype = np.dtype(jnp.dtype(config.get("param_dtype", "float32")))

    def cast(tree):
        if isinstance(tree, dict):
            return {k: cast(v) for k, v in tree.items()}
        return np.array(tree, dtype=dtype, order="C")  # a copy: not a view of the file

    return cast(params)


def convert_diffusers_vae(folder: str, *, param_dtype: str = "float32") -> tuple[dict, dict]:
    """Reads a diffusers AutoencoderKL folder.

    Args:
      folder: directory with config.json and diffusion_pytorch_model.safetensors (the
        ``vae`` subfolder of a pipeline, or a standalone VAE repository).
      param_dtype: the dtype the params are stored in ("bfloat16" halves them); written
        into the config, whose layers compute in its ``dtype`` (float32 by default).

    Returns:
      (params, config): numpy params in param_dtype for ``erg_jax.models.vae.make_vae``
      and the config dict (kind='vae').

    Raises:
      ValueError: missing or unreadable files, an unsupported config, or a tensor that
        is missing, unknown or of the wrong shape (the message names it).
    """
    config = dict(config_from_diffusers(read_config(folder)), param_dtype=str(param_dtype))
    path = find_weights(folder)
    tensors = read_state_dict(path)
    return convert_vae_state_dict(tensors, config, os.path.basename(path)), config
