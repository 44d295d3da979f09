"""What a model's VAE loads from the settings' ``vae`` section: an image model's
AutoencoderKL (``erg_jax.models.vae``) or a video model's Wan VAE
(``erg_jax.models.wan_vae``), from a published folder (converted on first use into the
cache folder), an erg_jax checkpoint (``vae.checkpoint``), or random weights of a preset
(``vae.random_init``), with the decode the sampling program ends in. ``sources`` is
``erg_jax.loading.Sources`` (which re-exports these loaders).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from erg_jax import checkpoint
from erg_jax.convert import pipeline as pipe


def host_random_params(abstract, seed: int):
    """Random params drawn on the host for a test model (no init program to compile):
    kernels and embeddings N(0, 1 / fan_in), norm scales 1, biases 0."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias" or len(leaf.shape) < 2:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


def _vae_checkpoint(vc, sources: Any, source: str = "diffusers-vae") -> str:
    folder = vc.pretrained or (sources.pretrained.vae if sources.pretrained else None)
    if vc.checkpoint or not folder:
        return vc.checkpoint
    path, fresh = pipe.converted(source, folder, sources.cache_dir)
    sources.conversions["vae"] = "converted" if fresh else "reused"
    return path


def load_vae(vc, mesh, seed_key, latent_channels: int, sources: Any, video: bool = False):
    """(VAE params replicated on the mesh, decode(params, latents) -> images), or Nones;
    ``video``: the Wan VAE, whose decode gives (b, frames, H, W, 3)."""
    if not vc.enabled:
        return None, None
    if video:
        return _load_video_vae(vc, mesh, seed_key, latent_channels, sources)
    from erg_jax.models import vae

    replicated = NamedSharding(mesh, PartitionSpec())
    if vc.random_init:
        vcfg = vae.vae_config(vc.preset, latent_channels=latent_channels)
        abstract = jax.eval_shape(lambda k: vae.init_params(vcfg, k), seed_key)
        params = host_random_params(abstract, int(jax.random.randint(seed_key, (), 0, 2**30)))
        if vc.dtype:
            params = jax.tree_util.tree_map(lambda a: a.astype(vc.dtype), params)
        params = jax.device_put(params, replicated)
    else:  # restored straight in vae.dtype
        params, vcfg = checkpoint.restore(
            _vae_checkpoint(vc, sources), replicated, dtype=vc.dtype or None
        )
    if vc.dtype:
        vcfg = dict(vcfg, dtype=vc.dtype, param_dtype=vc.dtype)
    if int(vcfg["latent_channels"]) != latent_channels:
        raise ValueError(
            f"vae: {vcfg['latent_channels']} latent channels, the model has {latent_channels}"
        )
    module = vae.vae_module(vcfg)

    def decode(p, z):
        z = vae.unscale_latents(z.astype(jnp.float32), vcfg)
        return module.apply({"params": p}, z, method=vae.AutoencoderKL.decode)

    return params, decode


def _load_video_vae(vc, mesh, seed_key, latent_channels: int, sources: Any):
    """The Wan VAE (``erg_jax.models.wan_vae``): its decode takes the model's normalised
    latents (b, f, h, w, c) and gives (b, 1 + 4 (f - 1), 8 h, 8 w, 3) in [-1, 1]."""
    from erg_jax.models import wan_vae as W

    replicated = NamedSharding(mesh, PartitionSpec())
    if vc.random_init:
        if vc.preset not in W.PRESETS:
            raise ValueError(f"vae.preset must be one of {sorted(W.PRESETS)}, got {vc.preset!r}")
        vcfg = W.wan_vae_config(vc.preset)
        abstract = jax.eval_shape(lambda k: W.init_params(vcfg, k), seed_key)
        params = host_random_params(abstract, int(jax.random.randint(seed_key, (), 0, 2**30)))
        params = jax.device_put(params, replicated)
    else:
        path = _vae_checkpoint(vc, sources, "diffusers-wan-vae")
        params, vcfg = checkpoint.restore(path, replicated, dtype=vc.dtype or None)
    if vc.dtype:
        params = jax.tree_util.tree_map(lambda a: a.astype(vc.dtype), params)
        vcfg = dict(vcfg, dtype=vc.dtype, param_dtype=vc.dtype)
    if int(vcfg["z_dim"]) != latent_channels:
        raise ValueError(f"vae: {vcfg['z_dim']} latent channels, the model has {latent_channels}")
    module = W.WanAutoencoder(vcfg)

    def decode(p, z):
        return W.decode_raw(module, p, W.denormalize_latents(z.astype(jnp.float32), vcfg))

    return params, decode
