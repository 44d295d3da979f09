"""Converting a diffusers ``WanTransformer3DModel`` folder to ``erg_jax.models.wan`` params.

Reads ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or its sharded index:
the 14B transformers ship in several shards) of a Wan 2.1 / 2.2 text-to-video transformer
(Wan Team 2025; for Wan 2.2 A14B, each expert's folder, ``transformer`` and
``transformer_2``). The param tree to fill is the model's own (``wan.abstract_params``),
so every param must find its tensor with the right shape, and every tensor of the
checkpoint must be used (``StateDict.finish``); anything else is a ValueError naming the
key. Image-to-video configs are refused.

Key mapping (ours -> diffusers; ``kernel`` -> ``weight`` transposed, ``scale`` -> ``weight``,
``bias`` -> ``bias``; i the block index):

    patch_embedding                         patch_embedding    Conv3d, (pt, ph, pw, C, D)
    condition_embedder.*                    the same names (time_embedder.linear_{1,2},
                                            time_proj, text_embedder.linear_{1,2})
    blocks_i.attn{1,2}.to_{q,k,v}, .norm_{q,k}    blocks.i.attn{1,2}.(same)
    blocks_i.attn{1,2}.to_out               blocks.i.attn{1,2}.to_out.0
    blocks_i.norm2                          blocks.i.norm2     (affine LayerNorm)
    blocks_i.ffn.linear_1, .linear_2        blocks.i.ffn.net.0.proj, .net.2
    blocks_i.scale_shift_table (6, D)       blocks.i.scale_shift_table (1, 6, D)
    scale_shift_table (2, D)                scale_shift_table (1, 2, D)
    proj_out                                proj_out
"""

from __future__ import annotations

import numpy as np

from erg_jax.models import wan
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
    "num_attention_heads",
    "attention_head_dim",
    "ffn_dim",
    "text_dim",
    "freq_dim",
)
_OPTIONAL = ("cross_attn_norm", "qk_norm", "eps", "rope_max_seq_len")
_FF = {"linear_1": "net.0.proj", "linear_2": "net.2"}


def config_from_diffusers(
    raw: dict, *, dtype: str = "float32", param_dtype: str = "float32", precision: str = "default"
) -> dict:
    """Our config dict (kind='wan') from a diffusers transformer config.json; fields it
    leaves out take diffusers' defaults, an image-to-video config is a ValueError."""
    name = raw.get("_class_name", "WanTransformer3DModel")
    if name != "WanTransformer3DModel":
        raise ValueError(f"config.json describes a {name}, not a WanTransformer3DModel")
    for field in wan.I2V_FIELDS:
        if raw.get(field) is not None:
            raise ValueError(
                f"config.json sets {field}={raw[field]!r}: an image-to-video Wan; only "
                "text-to-video Wan transformers convert"
            )
    missing = [k for k in _ARCH_FIELDS if raw.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks the field(s) {missing}")
    fields = {k: int(raw[k]) for k in _ARCH_FIELDS}
    fields.update({k: raw[k] for k in _OPTIONAL if raw.get(k) is not None})
    return wan.wan_config(
        "t2v_14b",
        **fields,
        patch_size=tuple(int(p) for p in raw.get("patch_size", (1, 2, 2))),
        out_channels=int(raw.get("out_channels") or raw["in_channels"]),
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
    )


def diffusers_key(path: tuple[str, ...]) -> str:
    """The diffusers state-dict key of one of our params, given its path in the tree."""
    *mods, leaf = path
    parts = []
    for i, name in enumerate(mods):
        if i == 0 and name.startswith("blocks_"):
            parts.append("blocks." + name[len("blocks_") :])
        elif name == "to_out":
            parts.append("to_out.0")
        elif i > 0 and mods[i - 1] == "ffn":
            parts.append(_FF[name])
        else:
            parts.append(name)
    if leaf == "scale_shift_table":
        return ".".join(parts + [leaf])
    return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def _transform(path: tuple[str, ...], shape: tuple[int, ...]):
    if path[-1] == "scale_shift_table":  # (1, k, D) -> (k, D)
        return lambda w: w.reshape(w.shape[1:]) if w.ndim == 3 and w.shape[0] == 1 else w
    if path[-1] != "kernel":
        return None
    if len(shape) == 5:  # torch Conv3d (out, in, kt, kh, kw) -> (kt, kh, kw, in, out)
        return lambda w: np.transpose(w, (2, 3, 4, 1, 0)) if w.ndim == 5 else w
    return lambda w: np.transpose(w) if w.ndim == 2 else w


def convert_state_dict(
    tensors: dict[str, np.ndarray], config: dict, source: str = "checkpoint"
) -> dict:
    """Maps a diffusers Wan transformer state dict onto the params of ``config`` (stacked
    under "blocks" where the config sets scan_blocks).

    Leaf by leaf: each tensor is cast to the param dtype and, in the scanned layout,
    written straight into its slot of the stacked array, so the host holds one copy of
    the params in their dtype (the 14B in bfloat16: 29 GB, not 57 in float32 plus a
    stacked copy)."""
    sd = StateDict(tensors, source=source)
    param_dtype = np.dtype(wan.Spec.from_config(config).param_dtype)
    abstract = wan.abstract_params(dict(config, scan_blocks=False))
    groups = [("blocks", wan.block_names(config))] if config.get("scan_blocks") else []

    def read(path, leaf):
        return sd.take(diffusers_key(path), leaf.shape, _transform(path, leaf.shape))

    params = place_leaves(abstract, read, param_dtype, groups)
    sd.finish()
    return params


def convert_diffusers_wan(
    folder: str,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    precision: str = "default",
    scan_blocks: bool = False,
) -> tuple[dict, dict]:
    """Reads a diffusers Wan transformer folder.

    Args:
      folder: holds config.json and diffusion_pytorch_model.safetensors (or a sharded
        index); for a whole pipeline pass its ``transformer`` (or, Wan 2.2 A14B's
        low-noise expert, ``transformer_2``) subfolder.
      dtype, param_dtype, precision: the three dtypes written into the config; the
        params are cast to param_dtype (float32 by default: lossless for any checkpoint).
      scan_blocks: store the blocks stacked for ``nn.scan``.

    Returns:
      (params, config): the Flax params (numpy) and the config dict (kind='wan').
    """
    config = config_from_diffusers(
        read_config(folder), dtype=dtype, param_dtype=param_dtype, precision=precision
    )
    config["scan_blocks"] = bool(scan_blocks)
    params = convert_state_dict(read_state_dict(find_weights(folder)), config, source=folder)
    return params, config
