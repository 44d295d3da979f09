"""Converting a diffusers ``FluxTransformer2DModel`` folder to ``erg_jax.models.flux`` params.

Reads ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or its sharded index)
of a FLUX.1 transformer (Black Forest Labs 2024; [dev], [schnell] and their fine-tunes in
the diffusers layout). The param tree to fill is the model's own
(``flux.abstract_params``), so every param must find its tensor with the right shape and
every tensor of the checkpoint must be used (``StateDict.finish``); anything else is a
ValueError naming the key.

diffusers runs the transformer on packed 2x2 patches (its patch_size 1, in_channels 64);
our denoiser packs the (b, H, W, 16) latents itself, so our config says patch_size 2,
in_channels 16, and the packed channel order (C, dy, dx) is the pipeline's, leaving
x_embedder and proj_out plain transposes.

Key mapping (ours -> diffusers; ``kernel`` -> ``weight`` transposed, ``scale`` -> ``weight``,
``bias`` -> ``bias``; i, j the double and single block indices):

    x_embedder, context_embedder, proj_out      the same names
    time_embed.linear_{1,2}                     time_text_embed.timestep_embedder.linear_{1,2}
    guidance_embed.linear_{1,2}                 time_text_embed.guidance_embedder.linear_{1,2}
    text_embed.linear_{1,2}                     time_text_embed.text_embedder.linear_{1,2}
    norm_out                                    norm_out.linear
    double_blocks_i.norm1, .norm1_context       transformer_blocks.i.norm1.linear, ...
    double_blocks_i.attn.to_out                 transformer_blocks.i.attn.to_out.0
    double_blocks_i.attn.*                      transformer_blocks.i.attn.* (to_q, add_q_proj,
                                                to_add_out, norm_q, norm_added_q, ...)
    double_blocks_i.ff{,_context}.linear_1      transformer_blocks.i.ff{,_context}.net.0.proj
    double_blocks_i.ff{,_context}.linear_2      transformer_blocks.i.ff{,_context}.net.2
    single_blocks_j.norm                        single_transformer_blocks.j.norm.linear
    single_blocks_j.{attn.*, proj_mlp, proj_out}   single_transformer_blocks.j.(same)
"""

from __future__ import annotations

import os

import numpy as np

from erg_jax.models import flux
from erg_jax.weights import (
    StateDict,
    find_weights,
    place_leaves,
    read_config,
    read_state_dict,
)

_ARCH_FIELDS = (
    "in_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
)
_TOP = {
    "time_embed": "time_text_embed.timestep_embedder",
    "guidance_embed": "time_text_embed.guidance_embedder",
    "text_embed": "time_text_embed.text_embedder",
    "norm_out": "norm_out.linear",
}
_INNER = {
    "norm1": "norm1.linear",
    "norm1_context": "norm1_context.linear",
    "norm": "norm.linear",
    "to_out": "to_out.0",
}
_FF = {"linear_1": "net.0.proj", "linear_2": "net.2"}
PACK = 2  # FluxPipeline's 2x2 latent packing


def config_from_diffusers(
    raw: dict,
    *,
    sample_size: int = 128,
    dtype: str = "float32",
    param_dtype: str = "float32",
    precision: str = "default",
) -> dict:
    """Our config dict (kind='flux') from a diffusers transformer config.json.

    Args:
      raw: the config.json dict.
      sample_size: the latent side to sample at (not in diffusers' config; 128: 1024px).
      dtype, param_dtype, precision: the three dtypes of the config.
    """
    name = raw.get("_class_name", "FluxTransformer2DModel")
    if name != "FluxTransformer2DModel":
        raise ValueError(f"config.json describes a {name}, not a FluxTransformer2DModel")
    missing = [k for k in _ARCH_FIELDS if raw.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks the field(s) {missing}")
    if int(raw.get("patch_size", 1)) != 1:
        raise ValueError(f"only patch_size 1 on packed latents is FLUX.1, got {raw['patch_size']}")
    packed = int(raw["in_channels"])
    out = int(raw.get("out_channels") or packed)
    if packed % PACK**2 or out % PACK**2:
        raise ValueError(f"in_channels ({packed}) and out_channels ({out}) must hold 2x2 patches")
    double, single = int(raw["num_layers"]), int(raw["num_single_layers"])
    return flux.flux_config(
        "dev",
        sample_size=int(sample_size),
        patch_size=PACK,
        in_channels=packed // PACK**2,
        out_channels=out // PACK**2,
        num_layers=double + single,
        num_double_layers=double,
        num_single_layers=single,
        num_attention_heads=int(raw["num_attention_heads"]),
        attention_head_dim=int(raw["attention_head_dim"]),
        joint_attention_dim=int(raw["joint_attention_dim"]),
        pooled_projection_dim=int(raw["pooled_projection_dim"]),
        guidance_embeds=bool(raw.get("guidance_embeds", False)),
        axes_dims_rope=tuple(raw.get("axes_dims_rope") or (16, 56, 56)),
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
    )


def diffusers_key(path: tuple[str, ...]) -> str:
    """The diffusers state-dict key of one of our params, given its path in the tree."""
    *mods, leaf = path
    parts = []
    for i, name in enumerate(mods):
        if i == 0 and name.startswith("double_blocks_"):
            parts.append("transformer_blocks." + name[len("double_blocks_") :])
        elif i == 0 and name.startswith("single_blocks_"):
            parts.append("single_transformer_blocks." + name[len("single_blocks_") :])
        elif i == 0:
            parts.append(_TOP.get(name, name))
        elif mods[i - 1] in ("ff", "ff_context"):
            parts.append(_FF[name])
        else:
            parts.append(_INNER.get(name, name))
    return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def _transpose(w: np.ndarray) -> np.ndarray:
    # A mis-shaped tensor passes through, so StateDict reports its shape with its key.
    return np.transpose(w) if w.ndim == 2 else w


def convert_state_dict(
    tensors: dict[str, np.ndarray], config: dict, source: str = "checkpoint"
) -> dict:
    """Maps a diffusers FLUX transformer state dict onto the params of ``config``
    (stacked for ``nn.scan`` where the config sets scan_blocks).

    Leaf by leaf: each tensor is cast to the param dtype and, in the scanned layout,
    written straight into its slot of the stacked array, so the host holds one copy of
    the params (12B in bfloat16: 24 GB) in their dtype."""
    sd = StateDict(tensors, source=source)
    param_dtype = np.dtype(flux.Spec.from_config(config).param_dtype)
    abstract = flux.abstract_params(dict(config, scan_blocks=False))
    groups = flux.scanned_groups(config) if config.get("scan_blocks") else []

    def read(path, leaf):
        transform = _transpose if path[-1] == "kernel" else None
        return sd.take(diffusers_key(path), leaf.shape, transform)

    params = place_leaves(abstract, read, param_dtype, groups)
    sd.finish()
    return params


def convert_diffusers_flux(
    path: str,
    *,
    sample_size: int = 128,
    dtype: str = "float32",
    param_dtype: str = "float32",
    precision: str = "default",
    scan_blocks: bool = False,
) -> tuple[dict, dict]:
    """Reads a diffusers FLUX.1 transformer folder.

    Args:
      path: a folder holding config.json and diffusion_pytorch_model.safetensors (or a
        sharded index), for a whole pipeline its ``transformer`` subfolder; or one weights
        file (.safetensors, .index.json, .bin) with config.json beside it.
      sample_size: the latent side written into the config (128: 1024px images).
      dtype, param_dtype, precision: the three dtypes written into the config; the
        params are cast to param_dtype (float32 by default: lossless for any checkpoint).
      scan_blocks: store each kind of block stacked for ``nn.scan``.

    Returns:
      (params, config): the Flax params (numpy) and the config dict (kind='flux'), which
      ``erg_jax.checkpoint.save`` writes so that ``erg_jax.load_denoiser`` opens them.
    """
    folder, weights = (os.path.dirname(path), path) if os.path.isfile(path) else (path, None)
    config = config_from_diffusers(
        read_config(folder),
        sample_size=sample_size,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
    )
    config["scan_blocks"] = bool(scan_blocks)
    tensors = read_state_dict(weights or find_weights(folder))
    return convert_state_dict(tensors, config, source=path), config
