"""Converts DiT / SiT checkpoints into erg_jax.models.dit params.

Two layouts, both of the network of Peebles & Xie 2023 (fig. 3), torch -> flax path
(i = block; Linear (out, in) -> kernel (in, out); Conv2d (D, C, p, p) -> (p, p, C, D)):

Original facebookresearch/DiT and willisma/SiT ``.pt`` files (``load_dit_pt``, which
reads the architecture off the shapes, or ``convert_dit_pt`` with a given config):

    x_embedder.proj                  patch_embed
    pos_embed (1, N, D) buffer       pos_embed (N, D)
    t_embedder.mlp.0, .mlp.2         time_embed_1, time_embed_2
    y_embedder.embedding_table       class_embed/embedding (num_classes + 1 rows)
    blocks.i.adaLN_modulation.1      blocks_i/adaLN_modulation
    blocks.i.attn.qkv (3D, D)        blocks_i/qkv kernel (D, 3, D), bias (3, D)
    blocks.i.attn.proj               blocks_i/proj
    blocks.i.mlp.fc1, .mlp.fc2       blocks_i/fc1, blocks_i/fc2
    final_layer.adaLN_modulation.1   final_modulation
    final_layer.linear               final_linear

diffusers ``DiTTransformer2DModel`` (or ``Transformer2DModel`` with ada_norm_zero) folders
(``convert_diffusers_dit``):

    pos_embed.proj                                   patch_embed (the table is recomputed)
    transformer_blocks.0.norm1.emb.timestep_embedder.linear_1, .linear_2
                                                     time_embed_1, time_embed_2
    transformer_blocks.0.norm1.emb.class_embedder.embedding_table
                                                     class_embed/embedding
    transformer_blocks.i.norm1.linear                blocks_i/adaLN_modulation
    transformer_blocks.i.attn1.to_q, to_k, to_v      blocks_i/qkv (stacked on axis 1)
    transformer_blocks.i.attn1.to_out.0              blocks_i/proj
    transformer_blocks.i.ff.net.0.proj, ff.net.2     blocks_i/fc1, blocks_i/fc2
    proj_out_1, proj_out_2                           final_modulation, final_linear

Differences of the diffusers model, kept in the config so outputs match it exactly:
every block holds its own copy of the timestep / class embedder (we keep block 0's and
require the copies to be equal, as in converted checkpoints); its timestep features
divide the frequency exponent by 127 rather than 128 (``time_freq_shift=1``); its MLP
LayerNorm uses ``norm_eps`` (1e-5) instead of 1e-6 (``mlp_norm_eps``). The modulation
chunk order (shift, scale, gate for attention, then for the MLP; final: shift, scale) is
the same in both layouts. With ``scan_blocks`` the per-block params are stacked.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax.models.dit import SIZES, check_config, dit_config, sincos_table
from erg_jax.weights import (
    StateDict,
    conv2d,
    find_weights,
    linear,
    read_config,
    read_state_dict,
)

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def _qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, bq, bk, bv) -> dict:
    """Three (D, D) kernels (in, out) and (D,) biases -> our fused (D, 3, D), (3, D)."""
    return {"kernel": np.stack([q, k, v], axis=1), "bias": np.stack([bq, bk, bv])}


def _assemble(config: dict, top: dict, blocks: list[dict]) -> dict:
    """Params in config's param_dtype, cast leaf by leaf from the (memory-mapped) file
    tensors, so no float32 copy of a bf16 file, nor a second copy of the params, exists."""
    dtype = jnp.dtype(config.get("param_dtype", "float32"))
    params = _cast(top, dtype)
    if config.get("scan_blocks"):  # the layout of models.dit.stack_blocks, one leaf at a time
        params["blocks"] = jax.tree_util.tree_map(
            lambda *a: jnp.asarray(np.stack(a), dtype), *blocks
        )
    else:
        params.update({f"blocks_{i}": _cast(b, dtype) for i, b in enumerate(blocks)})
    return params


def _cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return jnp.asarray(tree, dtype)


def convert_dit_state_dict(
    tensors: dict[str, np.ndarray], config: dict, source: str = "DiT checkpoint"
) -> dict:
    """Params of ``config`` from a state dict in the original DiT / SiT key layout."""
    check_config(config)
    sd = StateDict(tensors, source)
    d, p = config["hidden_size"], config["patch_size"]
    c_in, c_out = config["in_channels"], config["out_channels"]
    mlp = int(d * config["mlp_ratio"])
    n = (config["sample_size"] // p) ** 2
    top = {
        "patch_embed": conv2d(sd, "x_embedder.proj", c_in, d, p),
        "pos_embed": sd.take("pos_embed", (n, d), lambda a: a.reshape(a.shape[-2:])),
        "time_embed_1": linear(sd, "t_embedder.mlp.0", 256, d),
        "time_embed_2": linear(sd, "t_embedder.mlp.2", d, d),
        "final_modulation": linear(sd, "final_layer.adaLN_modulation.1", d, 2 * d),
        "final_linear": linear(sd, "final_layer.linear", d, p * p * c_out),
    }
    if config["num_classes"] > 0:
        rows = config["num_classes"] + 1
        top["class_embed"] = {"embedding": sd.take("y_embedder.embedding_table.weight", (rows, d))}
    blocks = []
    for i in range(config["num_layers"]):
        pre = f"blocks.{i}"
        w = sd.take(f"{pre}.attn.qkv.weight", (d, 3 * d), np.transpose)
        bias = sd.take(f"{pre}.attn.qkv.bias", (3 * d,))
        blocks.append(
            {
                "adaLN_modulation": linear(sd, f"{pre}.adaLN_modulation.1", d, 6 * d),
                "qkv": {"kernel": w.reshape(d, 3, d), "bias": bias.reshape(3, d)},
                "proj": linear(sd, f"{pre}.attn.proj", d, d),
                "fc1": linear(sd, f"{pre}.mlp.fc1", d, mlp),
                "fc2": linear(sd, f"{pre}.mlp.fc2", mlp, d),
            }
        )
    sd.finish()
    return _assemble(config, top, blocks)


def convert_dit_pt(path: str, config: dict) -> dict:
    """Params of ``config`` from an original DiT / SiT ``.pt`` file (or any file in that
    key layout). ``load_dit_pt`` reads the architecture from the file instead."""
    return convert_dit_state_dict(read_state_dict(path), config, source=path)


# What the tensors of the original layout fix; every other field is the family's or the
# caller's (runtime fields such as param_dtype, dtype, scan_blocks, precision).
INFERRED_FIELDS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "hidden_size",
    "mlp_ratio",
    "num_classes",
)


def _shape(tensors: dict, key: str, ndim: int) -> tuple[int, ...]:
    if key not in tensors:
        raise ValueError(f"not a DiT / SiT state dict: missing tensor '{key}'")
    shape = tuple(int(n) for n in np.shape(tensors[key]))
    if len(shape) != ndim:
        raise ValueError(f"DiT tensor '{key}' has shape {shape}, expected {ndim} dimensions")
    return shape


def _parse_family(family: str) -> tuple[str, dict | None]:
    """'DiT' / 'SiT', or a model name ('XL/2', 'SiT-XL/2') -> (family, its preset)."""
    if family in ("DiT", "SiT"):
        return family, None
    return ("SiT" if family.startswith("SiT") else "DiT"), dit_config(family)


def _preset_size(num_layers: int, hidden_size: int) -> str | None:
    """The models.dit.SIZES entry of this depth and width, if any."""
    sizes = [k for k, (n, d, _) in SIZES.items() if (n, d) == (num_layers, hidden_size)]
    return sizes[0] if sizes else None


def _read_architecture(tensors: dict) -> dict:
    """The INFERRED_FIELDS of a state dict in the original DiT / SiT layout."""
    d, c_in, p, p2 = _shape(tensors, "x_embedder.proj.weight", 4)  # Conv2d (D, C, p, p)
    if p != p2:
        raise ValueError(f"DiT patch embedding has a non-square kernel {p}x{p2}")
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise ValueError(f"DiT state dict has blocks {sorted(blocks)}, not 0 .. L-1")
    rows, _ = _shape(tensors, "final_layer.linear.weight", 2)  # (p * p * c_out, D)
    if rows % (p * p):
        raise ValueError(f"final_layer.linear has {rows} outputs, not a multiple of {p}x{p}")
    n = _shape(tensors, "pos_embed", 3)[1]  # (1, N, D), N = (sample_size / p)^2
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise ValueError(f"pos_embed holds {n} tokens, not a square grid")
    table = "y_embedder.embedding_table.weight"  # (num_classes + 1, D): the last is null
    mlp, _ = _shape(tensors, "blocks.0.mlp.fc1.weight", 2)
    return dict(
        sample_size=grid * p,
        patch_size=p,
        in_channels=c_in,
        out_channels=rows // (p * p),
        num_layers=len(blocks),
        hidden_size=d,
        mlp_ratio=mlp / d,
        num_classes=_shape(tensors, table, 2)[0] - 1 if table in tensors else 0,
    )


def infer_dit_config(tensors: dict[str, np.ndarray], family: str = "DiT", **overrides) -> dict:
    """The config of a state dict in the original DiT / SiT layout, read off its shapes.

    Hidden size, patch and in_channels come from x_embedder.proj, depth from the block
    count, out_channels from final_layer.linear (DiT: learned_sigma when it is 2x in),
    sample_size (latent side) from pos_embed's length and the patch, num_classes from the
    y_embedder table (rows - 1; 0 without one), mlp_ratio from fc1, and num_heads from
    the preset of the same depth and width (models.dit.SIZES).

    Args:
      tensors: the state dict (``read_state_dict``); only shapes are read.
      family: "DiT" (eps, DDPM steps) or "SiT" (velocity, t in [0, 1]); or a model name
        ("XL/2", "DiT-B/4", "SiT-XL/2") whose family is used and whose depth, width and
        patch must be the file's.
      **overrides: config fields: runtime ones (param_dtype, dtype, scan_blocks,
        precision, ...), num_heads for a depth and width that no preset has, or an
        inferred field, which must then equal the file's.

    Raises:
      ValueError: naming the field and both values when the model name or an override
        disagrees with the file, or the tensor that does not fit the layout.
    """
    name, (family, preset) = family, _parse_family(family)
    arch = _read_architecture(tensors)
    size = _preset_size(arch["num_layers"], arch["hidden_size"])
    if preset is not None:
        found = f"{size}/{arch['patch_size']}" if size else "no preset"
        for key in ("num_layers", "hidden_size", "patch_size"):
            if preset[key] != arch[key]:
                raise ValueError(
                    f"model: {name!r} has {key} {preset[key]}, the checkpoint "
                    f"{arch[key]} (the checkpoint is {found})"
                )
    for key in INFERRED_FIELDS:
        if key in overrides and overrides[key] != arch[key]:
            hint = ""
            if key == "sample_size":
                grid = arch[key] // arch["patch_size"]
                hint = f" (pos_embed: {grid}x{grid} patches of {arch['patch_size']})"
            raise ValueError(f"{key}: {overrides[key]} given, the checkpoint has {arch[key]}{hint}")
    if preset is not None:
        heads = preset["num_heads"]
    elif size is not None:
        heads = SIZES[size][2]
    elif "num_heads" in overrides:
        heads = overrides["num_heads"]
    else:
        raise ValueError(
            f"no DiT preset has num_layers {arch['num_layers']} and hidden_size "
            f"{arch['hidden_size']}: pass num_heads"
        )
    fields = dict(arch, num_heads=heads)
    if family == "DiT":
        fields["learned_sigma"] = arch["out_channels"] == 2 * arch["in_channels"]
    fields.update(overrides)
    return dit_config(f"{family}-XL/2", **fields)


def load_dit_pt(path: str, *, family: str = "DiT", **overrides) -> tuple[dict, dict]:
    """(params, config) of an original DiT / SiT ``.pt`` file, architecture read off it.

    Args:
      path: the .pt file (or a .safetensors file in the same key layout).
      family: as ``infer_dit_config``: "DiT", "SiT", or a model name that is checked.
      **overrides: as ``infer_dit_config`` (e.g. param_dtype="bfloat16",
        scan_blocks=True, sample_size=64 to insist on a 512px checkpoint).
    """
    tensors = read_state_dict(path)
    config = infer_dit_config(tensors, family, **overrides)
    return convert_dit_state_dict(tensors, config, source=path), config


def config_from_diffusers(raw: dict, **overrides) -> dict:
    """Our config (kind='dit', DDPM eps) from a diffusers DiT config.json dict."""
    name = raw.get("_class_name", "DiTTransformer2DModel")
    if name not in DIFFUSERS_CLASSES:
        raise ValueError(f"not a diffusers DiT config: _class_name {name!r}")
    checks = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
    }
    for key, want in checks.items():
        if raw.get(key, want) != want:
            raise ValueError(f"unsupported DiT config: {key}={raw[key]!r} (need {want!r})")
    if raw.get("patch_size") is None or raw.get("num_embeds_ada_norm") is None:
        raise ValueError("a DiT config needs patch_size and num_embeds_ada_norm")
    c_in = int(raw.get("in_channels", 4))
    c_out = int(raw.get("out_channels") or c_in)
    heads, head_dim = (
        int(raw.get("num_attention_heads", 16)),
        int(raw.get("attention_head_dim", 72)),
    )
    fields = dict(
        sample_size=int(raw.get("sample_size", 32)),
        patch_size=int(raw["patch_size"]),
        in_channels=c_in,
        out_channels=c_out,
        learned_sigma=c_out == 2 * c_in,
        num_layers=int(raw.get("num_layers", 28)),
        hidden_size=heads * head_dim,
        num_heads=heads,
        num_classes=int(raw["num_embeds_ada_norm"]),
        time_freq_shift=1,
        mlp_norm_eps=float(raw.get("norm_eps", 1e-5)),
    )
    fields.update(overrides)
    return dit_config("XL/2", **fields)


def convert_diffusers_state_dict(
    tensors: dict[str, np.ndarray], config: dict, source: str = "diffusers DiT"
) -> dict:
    """Params of ``config`` from a state dict in diffusers' DiT key layout."""
    check_config(config)
    sd = StateDict(tensors, source)
    d, p = config["hidden_size"], config["patch_size"]
    c_in, c_out = config["in_channels"], config["out_channels"]
    mlp = int(d * config["mlp_ratio"])
    grid = config["sample_size"] // p
    if sd.has("pos_embed.pos_embed"):  # persistent in old saves; always the sin-cos table
        sd.take("pos_embed.pos_embed", (grid * grid, d), lambda a: a.reshape(a.shape[-2:]))
    emb = "norm1.emb"
    shared = {
        "time_embed_1": ("timestep_embedder.linear_1", 256, d),
        "time_embed_2": ("timestep_embedder.linear_2", d, d),
    }
    top = {
        name: linear(sd, f"transformer_blocks.0.{emb}.{k}", a, b)
        for name, (k, a, b) in shared.items()
    }
    table = f"{emb}.class_embedder.embedding_table.weight"
    rows = config["num_classes"] + 1
    top["class_embed"] = {"embedding": sd.take(f"transformer_blocks.0.{table}", (rows, d))}
    top.update(
        patch_embed=conv2d(sd, "pos_embed.proj", c_in, d, p),
        pos_embed=sincos_table(d, grid),
        final_modulation=linear(sd, "proj_out_1", d, 2 * d),
        final_linear=linear(sd, "proj_out_2", d, p * p * c_out),
    )
    blocks = []
    for i in range(config["num_layers"]):
        pre = f"transformer_blocks.{i}"
        if i > 0:
            _check_copy(sd, top, pre, emb, shared, table)
        a = f"{pre}.attn1"
        ws = [sd.take(f"{a}.to_{x}.weight", (d, d), np.transpose) for x in "qkv"]
        bs = [sd.take(f"{a}.to_{x}.bias", (d,)) for x in "qkv"]
        blocks.append(
            {
                "adaLN_modulation": linear(sd, f"{pre}.norm1.linear", d, 6 * d),
                "qkv": _qkv(*ws, *bs),
                "proj": linear(sd, f"{a}.to_out.0", d, d),
                "fc1": linear(sd, f"{pre}.ff.net.0.proj", d, mlp),
                "fc2": linear(sd, f"{pre}.ff.net.2", mlp, d),
            }
        )
    sd.finish()
    return _assemble(config, top, blocks)


def _check_copy(sd: StateDict, top: dict, pre: str, emb: str, shared: dict, table: str):
    """Block i's embedder copy must equal block 0's: our model has one embedder."""
    pairs = [
        (
            f"{pre}.{emb}.{k}.{w}",
            top[name][{"weight": "kernel", "bias": "bias"}[w]],
            np.transpose if w == "weight" else None,
        )
        for name, (k, _, _) in shared.items()
        for w in ("weight", "bias")
    ]
    pairs.append((f"{pre}.{table}", top["class_embed"]["embedding"], None))
    for key, ref, fn in pairs:
        x = sd.take(key, ref.shape, fn)
        if not np.array_equal(x, ref):
            raise ValueError(
                f"{sd.source}: tensor '{key}' differs from block 0's copy; DiT "
                "shares one timestep / class embedder across blocks"
            )


def convert_diffusers_dit(folder: str, **overrides) -> tuple[dict, dict]:
    """(params, config) from a diffusers DiT folder (config.json + weights).

    Args:
      folder: as ``DiTTransformer2DModel.save_pretrained`` writes it (the ``transformer``
        subfolder of a DiT pipeline).
      **overrides: config fields to set (e.g. scan_blocks=True, param_dtype="bfloat16").
    """
    config = config_from_diffusers(read_config(folder), **overrides)
    path = find_weights(folder)
    return convert_diffusers_state_dict(read_state_dict(path), config, source=path), config
