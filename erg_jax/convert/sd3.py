"""Converting a diffusers ``SD3Transformer2DModel`` folder to ``erg_jax.models.mmdit`` params.

Reads ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or its sharded index)
of Stable Diffusion 3 / 3.5 (Esser et al. 2024) transformers. The param tree to fill is
the model's own (``mmdit.abstract_params``), so every param must find its tensor with the
right shape, and every tensor of the checkpoint must be used (``StateDict.finish``);
anything else is a ValueError naming the key.

Key mapping (ours -> diffusers; ``kernel`` -> ``weight`` transposed, ``scale`` -> ``weight``,
``bias`` -> ``bias``; i is the block index):

    patch_embed                  pos_embed.proj              Conv2d, (p, p, C, D) kernel
    pos_embed                    pos_embed.pos_embed         buffer (1, M*M, D) -> (M*M, D)
    time_embed.linear_{1,2}      time_text_embed.timestep_embedder.linear_{1,2}
    text_embed.linear_{1,2}      time_text_embed.text_embedder.linear_{1,2}
    context_embedder             context_embedder
    blocks_i.norm1               transformer_blocks.i.norm1.linear          (6 or 9 D)
    blocks_i.norm1_context       transformer_blocks.i.norm1_context.linear  (6 or 2 D)
    blocks_i.attn.to_{q,k,v}     transformer_blocks.i.attn.to_{q,k,v}
    blocks_i.attn.add_{q,k,v}_proj, .to_add_out     the same names
    blocks_i.attn.to_out         transformer_blocks.i.attn.to_out.0
    blocks_i.attn.norm_{q,k}, .norm_added_{q,k}     the same names (QK norm)
    blocks_i.attn2.*             transformer_blocks.i.attn2.*   (dual-attention blocks)
    blocks_i.ff.linear_1         transformer_blocks.i.ff.net.0.proj
    blocks_i.ff.linear_2         transformer_blocks.i.ff.net.2
    blocks_i.ff_context.*        transformer_blocks.i.ff_context.*  (as ff)
    norm_out                     norm_out.linear
    proj_out                     proj_out

The position table is read from the checkpoint, not recomputed, so a checkpoint whose
buffer differs from diffusers' sin-cos formula still runs as diffusers runs it.
"""

from __future__ import annotations

import numpy as np

from erg_jax.models import mmdit
from erg_jax.weights import (
    StateDict,
    find_weights,
    place_leaves,
    read_config,
    read_state_dict,
)

_ARCH_FIELDS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "pos_embed_max_size",
)
_TOP = {
    "patch_embed": "pos_embed.proj",
    "time_embed": "time_text_embed.timestep_embedder",
    "text_embed": "time_text_embed.text_embedder",
    "norm_out": "norm_out.linear",
}
_INNER = {"norm1": "norm1.linear", "norm1_context": "norm1_context.linear", "to_out": "to_out.0"}
_FF = {"linear_1": "net.0.proj", "linear_2": "net.2"}


def config_from_diffusers(
    raw: dict, *, dtype: str = "float32", param_dtype: str = "float32", precision: str = "default"
) -> dict:
    """Our config dict (kind='mmdit') from a diffusers transformer config.json."""
    name = raw.get("_class_name", "SD3Transformer2DModel")
    if name != "SD3Transformer2DModel":
        raise ValueError(f"config.json describes a {name}, not an SD3Transformer2DModel")
    missing = [k for k in _ARCH_FIELDS if raw.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks the field(s) {missing}")
    fields = {k: int(raw[k]) for k in _ARCH_FIELDS}
    return mmdit.mmdit_config(
        "sd3-medium",
        **fields,
        out_channels=int(raw.get("out_channels") or raw["in_channels"]),
        dual_attention_layers=tuple(raw.get("dual_attention_layers") or ()),
        qk_norm=raw.get("qk_norm"),
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
    )


def diffusers_key(path: tuple[str, ...]) -> str:
    """The diffusers state-dict key of one of our params, given its path in the tree."""
    *mods, leaf = path
    if mods == [] and leaf == "pos_embed":
        return "pos_embed.pos_embed"
    parts = []
    for i, name in enumerate(mods):
        if i == 0 and name.startswith("blocks_"):
            parts.append("transformer_blocks." + name[len("blocks_") :])
        elif i == 0:
            parts.append(_TOP.get(name, name))
        elif mods[i - 1] in ("ff", "ff_context"):
            parts.append(_FF[name])
        else:
            parts.append(_INNER.get(name, name))
    return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def _transform(path: tuple[str, ...], shape: tuple[int, ...]):
    if path == ("pos_embed",):
        return lambda w: np.reshape(w, (-1, w.shape[-1])) if w.ndim == 3 and w.shape[0] == 1 else w
    if path[-1] != "kernel":
        return None
    if len(shape) == 4:  # torch Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
        return lambda w: np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w
    return lambda w: np.transpose(w) if w.ndim == 2 else w


def convert_state_dict(
    tensors: dict[str, np.ndarray], config: dict, source: str = "checkpoint"
) -> dict:
    """Maps a diffusers SD3 transformer state dict onto the params of ``config``
    (stacked for ``nn.scan`` where the config sets scan_blocks).

    Leaf by leaf: each tensor is cast to the param dtype and, in the scanned layout,
    written straight into its slot of the stacked array, so the host holds one copy of
    the params in their dtype (an 8B bfloat16 model: 16 GB, not 32 in float32 plus a
    stacked copy)."""
    sd = StateDict(tensors, source=source)
    param_dtype = np.dtype(mmdit.Spec.from_config(config).param_dtype)
    abstract = mmdit.abstract_params(dict(config, scan_blocks=False))
    groups = mmdit.scanned_groups(config) if config.get("scan_blocks") else []
    groups = [(name, [f"blocks_{i}" for i in r]) for name, r in groups]

    def read(path, leaf):
        return sd.take(diffusers_key(path), leaf.shape, _transform(path, leaf.shape))

    params = place_leaves(abstract, read, param_dtype, groups)
    sd.finish()
    return params


def convert_diffusers_sd3(
    folder: str,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    precision: str = "default",
    scan_blocks: bool = False,
) -> tuple[dict, dict]:
    """Reads a diffusers SD3 / SD3.5 transformer folder.

    Args:
      folder: holds config.json and diffusion_pytorch_model.safetensors (or a sharded
        index); for a whole pipeline pass its ``transformer`` subfolder.
      dtype, param_dtype, precision: the three dtypes written into the config; the
        params are cast to param_dtype (float32 by default: lossless for any checkpoint).
      scan_blocks: store each run of like blocks stacked for ``nn.scan``.

    Returns:
      (params, config): the Flax params (numpy) and the config dict (kind='mmdit').
    """
    config = config_from_diffusers(
        read_config(folder), dtype=dtype, param_dtype=param_dtype, precision=precision
    )
    config["scan_blocks"] = bool(scan_blocks)
    params = convert_state_dict(read_state_dict(find_weights(folder)), config, source=folder)
    return params, config
