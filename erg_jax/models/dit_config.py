"""DiT / SiT configs: the presets of Peebles & Xie 2023 (table 1) and Ma et al. 2024, the
checks that their fields fit together, and the checked ``Spec`` every layer reads.

``dit_config("XL/2")`` is the DiT-XL/2 of the DiT paper, ``dit_config("SiT-XL/2")`` the
same network under SiT's conventions (``erg_jax.models.dit``'s docstring);
``erg_jax.models.dit`` re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from erg_jax.targets import Layout

_BASE = dict(
    kind="dit",
    prediction="eps",
    learned_sigma=True,
    time="ddpm",
    sample_size=32,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    hidden_size=1152,
    num_heads=16,
    mlp_ratio=4.0,
    num_classes=1000,
    # Diffusers' DiT divides the timestep frequencies by (128 - 1) instead of 128 and
    # uses its norm_eps (1e-5) in the MLP LayerNorm; these two fields reproduce that.
    time_freq_shift=0,
    mlp_norm_eps=1e-6,
    dtype="float32",
    param_dtype="float32",
    precision="default",
    attention_implementation=None,
    scan_blocks=False,
    remat=False,
)
# (num_layers, hidden_size, num_heads) of the DiT paper's table 1, and a test size.
SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "tiny": (2, 32, 2),
}
_SIT = dict(prediction="velocity", learned_sigma=False, time="sit")


def dit_config(name: str = "XL/2", **overrides: Any) -> dict:
    """The config dict (kind='dit') of a named model.

    Args:
      name: "SIZE/PATCH" with SIZE in S, B, L, XL, tiny and PATCH in 2, 4, 8 (tiny: any);
        an optional "DiT-" prefix, or "SiT-" for the SiT conventions (module docstring).
      **overrides: fields replaced after the preset; an unknown field is a ValueError.
    """
    m = re.fullmatch(r"(?:(DiT|SiT)-)?(S|B|L|XL|tiny)/(\d+)", name)
    if m is None:
        raise ValueError(
            f"unknown DiT model {name!r}: use e.g. 'XL/2', 'DiT-B/4', 'SiT-XL/2', "
            f"'tiny/2' with a size in {sorted(SIZES)}"
        )
    family, size, patch = m.group(1) or "DiT", m.group(2), int(m.group(3))
    if size != "tiny" and patch not in (2, 4, 8):
        raise ValueError(f"patch size of {name!r} must be 2, 4 or 8")
    layers, hidden, heads = SIZES[size]
    config = dict(_BASE, num_layers=layers, hidden_size=hidden, num_heads=heads, patch_size=patch)
    if size == "tiny":
        config.update(sample_size=8, num_classes=10)
    if family == "SiT":
        config.update(_SIT)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown DiT config field(s) {unknown}")
    config.update(overrides)
    check_config(config)
    return config


def check_config(config: dict) -> None:
    """Raises ValueError when the architecture fields do not fit together."""
    d, h, p = config["hidden_size"], config["num_heads"], config["patch_size"]
    if d % h or (d // h) % 2:
        raise ValueError(f"hidden_size {d} must split into {h} heads of even size")
    if d % 4:
        raise ValueError(f"hidden_size {d} must be a multiple of 4 (2-D sin-cos table)")
    if config["sample_size"] % p:
        raise ValueError(f"sample_size {config['sample_size']} is not a multiple of patch {p}")
    if config["out_channels"] < config["in_channels"]:
        raise ValueError("out_channels must be at least in_channels")
    if config["learned_sigma"] and config["out_channels"] != 2 * config["in_channels"]:
        raise ValueError("learned_sigma needs out_channels = 2 * in_channels")


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static settings every layer reads (hashable, built from a config dict)."""

    num_layers: int
    hidden: int
    heads: int
    mlp_hidden: int
    patch: int
    sample_size: int
    in_channels: int
    out_channels: int
    num_classes: int
    keep_channels: int
    time_freq_shift: float
    mlp_norm_eps: float
    dtype: Any
    param_dtype: Any
    precision: Any
    implementation: str | None
    scan: bool
    remat: bool

    @classmethod
    def from_config(cls, config: dict) -> Spec:
        check_config(config)
        prec = config.get("precision")
        c_in, c_out = int(config["in_channels"]), int(config["out_channels"])
        return cls(
            num_layers=int(config["num_layers"]),
            hidden=int(config["hidden_size"]),
            heads=int(config["num_heads"]),
            mlp_hidden=int(config["hidden_size"] * config["mlp_ratio"]),
            patch=int(config["patch_size"]),
            sample_size=int(config["sample_size"]),
            in_channels=c_in,
            out_channels=c_out,
            num_classes=int(config["num_classes"]),
            keep_channels=c_out if config["learned_sigma"] else c_in,
            time_freq_shift=float(config.get("time_freq_shift", 0)),
            mlp_norm_eps=float(config.get("mlp_norm_eps", 1e-6)),
            dtype=jnp.dtype(config.get("dtype", "float32")),
            param_dtype=jnp.dtype(config.get("param_dtype", "float32")),
            precision=None if prec in (None, "default") else jax.lax.Precision(prec),
            implementation=config.get("attention_implementation"),
            scan=bool(config.get("scan_blocks", False)),
            remat=bool(config.get("remat", False)),
        )


# How the published DiT / SiT models are sampled: settings fields (erg_jax.settings) per
# recipe, the first the default. The DiT paper samples 250 DDPM steps and reports its FIDs
# at 256 and 512px with CFG w = 1.5 (its tables 2 and 3), kept as every method's scale;
# sampler.solver "" takes a pipeline folder's own scheduler (DDIM), else DDPM. SiT samples
# with Heun's method. ERG's layers are ours; PAG in block 1 (diffusers' default for its
# transformer pipelines), SEG and SLG in the middle block (the mid-block of the U-Nets
# their papers perturb). model.sample_size is the latent side the checkpoint must have.
_DIT = {
    "model.scan_blocks": True,  # 28 blocks: one scanned body compiles far faster
    "vae.preset": "sd",
    "guidance.methods": "cfg,erg",
    "guidance.scale": 1.5,
    # layer targets in DiT's own block names (erg_jax.targets)
    "guidance.erg.layers": "blocks.10-17",
    "guidance.pag.layers": "blocks.1",
    "guidance.seg.layers": "blocks.14",
    "guidance.slg.layers": "blocks.14",
    "guidance.emag.layers": "blocks.12-15",  # EMAG's DiT-XL/2 candidates
    "sampler.solver": "",
    "sampler.steps": 250,
}
RECIPES = {
    "xl2_512": {**_DIT, "model.preset": "XL/2", "model.sample_size": 64},
    "xl2_256": {**_DIT, "model.preset": "XL/2", "model.sample_size": 32},
    "sit_xl2_256": {
        **_DIT,
        "model.preset": "SiT-XL/2",
        "model.sample_size": 32,
        "sampler.solver": "heun",
        "sampler.steps": 125,
    },
    # random weights: runs in seconds on a CPU
    "tiny": {
        **_DIT,
        "model.preset": "tiny/2",
        "model.random_init": True,
        "model.scan_blocks": False,
        "vae.random_init": True,
        "vae.preset": "tiny",
        "guidance.erg.layers": "",
        "guidance.pag.layers": "blocks.1",
        "guidance.seg.layers": "blocks.1",
        "guidance.slg.layers": "blocks.1",
        "guidance.emag.layers": "",
        "guidance.scale": 3.0,
        "sampler.solver": "ddim",
        "sampler.steps": 6,
        "sampler.batch_size": 8,
    },
}


def layout(config: dict) -> Layout:
    """The blocks as guidance targets name them: "blocks.12" (diffusers' "transformer_blocks")."""
    return Layout(
        (("blocks", int(config["num_layers"])),),
        int(config["num_heads"]),
        aliases=(("transformer_blocks", "blocks"),),
    )
