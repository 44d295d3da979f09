"""FLUX.1 configs and block layout: the dev / schnell presets, the checked ``Spec`` every
layer shares, and the runs of like blocks that ``nn.scan`` stacks.

The presets follow Black Forest Labs' FLUX.1 [dev] and [schnell] transformers as diffusers'
``FluxTransformer2DModel`` stores them (19 double-stream and 38 single-stream blocks,
24 heads of 128, rotary axes (16, 56, 56)). Two fields differ in meaning from diffusers':
``in_channels`` is the latent's channel count (16), which the denoiser packs into 2x2
patches (``patch_size`` 2) of 64 channels, diffusers' ``in_channels``; and ``num_layers``
counts every attention layer, double blocks first (layers 0..18) then single blocks
(19..56), since it sizes the per-layer attention control. diffusers' ``num_layers``
(double blocks only) is our ``num_double_layers``.

A scanned run keeps its params stacked under ``{double,single}_blocks_{first}_to_{last}``
(block indices counted within their kind); ``stack_blocks`` and ``unstack_blocks`` move
params between that and the per-block layout. ``erg_jax.models.flux`` re-exports every
public name here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from erg_jax.models.mmdit_config import TINY_TEXT_MODEL
from erg_jax.models.stacking import stack_groups, unstack_groups
from erg_jax.targets import Layout

_DEV = dict(
    kind="flux",
    prediction="velocity",
    learned_sigma=False,
    time="unit",
    sample_size=128,  # latent side of a 1024px image
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=57,
    num_double_layers=19,
    num_single_layers=38,
    num_attention_heads=24,
    attention_head_dim=128,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
    dtype="bfloat16",
    param_dtype="bfloat16",
    precision="default",
    attention_implementation=None,
    scan_blocks=False,
    remat=False,
)
PRESETS: dict[str, dict] = {
    # black-forest-labs/FLUX.1-dev, transformer/config.json: guidance-distilled.
    "dev": _DEV,
    # black-forest-labs/FLUX.1-schnell: timestep-distilled, no guidance embedding.
    "schnell": dict(_DEV, guidance_embeds=False),
    # Tiny sizes for tests, float32 with exact matmuls; rotary axes sum to head_dim 16.
    "tiny": dict(
        _DEV,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        num_double_layers=2,
        num_single_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
        dtype="float32",
        param_dtype="float32",
        precision="highest",
    ),
}
ROPE_THETA = 10000.0  # FluxPosEmbed's base, fixed in every published FLUX.1


def flux_config(name: str = "dev", **overrides: Any) -> dict:
    """The config dict (kind='flux') of a preset: 'dev', 'schnell' or 'tiny'.

    Overrides replace fields; an unknown field is a ValueError. When the block counts
    are overridden without ``num_layers``, it is recomputed as their sum.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown FLUX preset {name!r}; choose from {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(PRESETS[name]))
    if unknown:
        raise ValueError(f"unknown FLUX config field(s) {unknown}")
    config = dict(PRESETS[name], **overrides)
    if "num_layers" not in overrides:
        config["num_layers"] = int(config["num_double_layers"]) + int(config["num_single_layers"])
    config["axes_dims_rope"] = tuple(int(a) for a in config["axes_dims_rope"])
    Spec.from_config(config)  # validates
    return config


def check_sample_size(config: dict) -> None:
    """Raises a ValueError naming ``model.sample_size`` unless the latent side is a
    multiple of ``patch_size`` (2 in every FLUX.1: the side must be even), before any
    program is traced; a config without a side (0 or absent) passes."""
    side, p = int(config.get("sample_size") or 0), int(config["patch_size"])
    if side % p:
        raise ValueError(
            f"model.sample_size={side}: a FLUX.1 latent side must be even, a multiple of "
            f"patch_size={p} (the latents are packed into {p}x{p} patches), as 128 for "
            "1024px images or 64 for 512px"
        )


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static settings every layer shares (hashable, built from a config dict)."""

    num_double: int
    num_single: int
    patch_size: int
    out_channels: int
    heads: int
    head_dim: int
    axes_dims: tuple[int, ...]
    guidance: bool  # a guidance embedding (dev) or not (schnell)
    qk_norm: str = "rms_norm"  # every FLUX.1 attention; read by mmdit.QKNorm
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: str | None = None
    implementation: str | None = None
    scan: bool = False
    remat: bool = False

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def num_layers(self) -> int:
        return self.num_double + self.num_single

    @classmethod
    def from_config(cls, config: dict) -> Spec:
        check_sample_size(config)
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        double, single = int(config["num_double_layers"]), int(config["num_single_layers"])
        if int(config["num_layers"]) != double + single or double < 0 or single < 0:
            raise ValueError(
                f"num_layers ({config['num_layers']}) must be num_double_layers ({double}) "
                f"+ num_single_layers ({single}), both >= 0"
            )
        axes = tuple(int(a) for a in config["axes_dims_rope"])
        if sum(axes) != head_dim or any(a % 2 for a in axes):
            raise ValueError(
                f"axes_dims_rope {axes} must be even and sum to attention_head_dim ({head_dim})"
            )
        precision = config.get("precision")
        return cls(
            num_double=double,
            num_single=single,
            patch_size=int(config["patch_size"]),
            out_channels=int(config.get("out_channels") or config["in_channels"]),
            heads=heads,
            head_dim=head_dim,
            axes_dims=axes,
            guidance=bool(config["guidance_embeds"]),
            dtype=jnp.dtype(config.get("dtype", "float32")),
            param_dtype=jnp.dtype(config.get("param_dtype", "float32")),
            precision=None if precision in (None, "default") else str(precision),
            implementation=config.get("attention_implementation"),
            scan=bool(config.get("scan_blocks", False)),
            remat=bool(config.get("remat", False)),
        )


class Run(NamedTuple):
    """Blocks start..stop-1 of one kind, which share their parameter structure."""

    kind: str  # "double" or "single"
    start: int  # counted within the kind
    stop: int
    first_layer: int  # the attention-control index of block `start`

    @property
    def length(self) -> int:
        return self.stop - self.start


def runs(s: Spec) -> list[Run]:
    """The double-block run, then the single-block run (empty runs left out)."""
    out = [Run("double", 0, s.num_double, 0), Run("single", 0, s.num_single, s.num_double)]
    return [r for r in out if r.length]


def scanned(run: Run, scan: bool) -> bool:
    """Whether a run is one ``nn.scan`` (a run of one block stays a plain block)."""
    return scan and run.length > 1


def block_name(kind: str, i: int) -> str:
    """The param name of block i of a kind in the per-block layout."""
    return f"{kind}_blocks_{i}"


def run_name(run: Run) -> str:
    """The param name of a scanned run of blocks."""
    return f"{run.kind}_blocks_{run.start}_to_{run.stop - 1}"


def scanned_groups(config: dict) -> list[tuple[str, list[str]]]:
    """(stacked param name, per-block param names) of each run the scanned layout stacks."""
    return [
        (run_name(r), [block_name(r.kind, i) for i in range(r.start, r.stop)])
        for r in runs(Spec.from_config(config))
        if scanned(r, True)
    ]


def stack_blocks(params: dict, config: dict) -> dict:
    """Per-block params -> the scanned layout of ``config`` (whose ``scan_blocks`` is
    ignored: the result is always the scanned layout)."""
    return stack_groups(params, scanned_groups(config))


def unstack_blocks(params: dict, config: dict) -> dict:
    """Scanned params -> per-block ones (inverse of ``stack_blocks``)."""
    return unstack_groups(params, scanned_groups(config))


# How the published FLUX.1 models are sampled: settings fields (erg_jax.settings) per
# recipe, the first the default. The distilled model alone is the baseline ("none"); every
# other method adds its guidance on top with weight guidance.scale (not tuned here: a
# starting point). No published layers for FLUX.1: ours are 8 middle single-stream blocks
# for I-ERG (the 34 layers before them run once for both branches) and the middle single
# block for PAG, SEG and SAG (their papers perturb the middle block); SLG skips blocks
# 7-9 over the first steps, SD3.5's recipe carried over untested.
_FLUX = {
    "model.scan_blocks": True,  # 57 blocks: one scanned body per kind compiles far faster
    "model.dtype": "bfloat16",
    "model.param_dtype": "bfloat16",
    "mesh.fsdp": -1,  # 12B parameters: sharded over every device
    "mesh.data": 1,
    "vae.preset": "sd3",  # FLUX.1's VAE has SD3's architecture (its own scale and shift)
    "text.layout": "flux",
    "text.dtype": "bfloat16",
    "sampler.solver": "euler",
    "guidance.methods": "none,erg",
    "guidance.scale": 2.0,
    "guidance.erg.tau": 0.5,
    "guidance.erg.tau_c": 0.5,
    "guidance.erg.kappa": 0.1,
    # layer targets in BFL's block names (erg_jax.targets); sag.layer is a global index
    "guidance.erg.layers": "single_blocks.15-22",
    "guidance.pag.layers": "single_blocks.19",
    "guidance.seg.layers": "single_blocks.19",
    "guidance.sag.layer": "38",
    "guidance.slg.layers": "double_blocks.7-9",
    "guidance.slg.interval": (0.92, 0.99),
}
RECIPES = {
    "dev": {
        **_FLUX,
        "model.preset": "dev",
        "sampler.steps": 28,  # FluxPipeline's default
        "guidance.distilled": 3.5,  # FluxPipeline's default guidance_scale
        "text.max_sequence_length": 512,
    },
    "schnell": {
        **_FLUX,
        "model.preset": "schnell",
        "sampler.steps": 4,  # timestep-distilled for 1-4 steps
        "guidance.distilled": 0.0,  # no guidance embedding
        "text.max_sequence_length": 256,  # schnell's T5 length
    },
    # a random tiny FLUX.1 with a guidance embedding, conditioned by the PyPI MiniLM-L6
    "tiny": {
        **_FLUX,
        **TINY_TEXT_MODEL,
        "mesh.fsdp": 1,
        "mesh.data": -1,
        "guidance.distilled": 3.5,
        "guidance.erg.layers": "single_blocks.0-1",
        "guidance.pag.layers": "single_blocks.0",
        "guidance.seg.layers": "single_blocks.0",
        "guidance.slg.layers": "single_blocks.0",
        "guidance.sag.layer": "2",
    },
}


# NAG's blend on FLUX.1, the authors' default.
NAG_ALPHA = 0.25


def layout(config: dict) -> Layout:
    """The blocks as guidance targets name them: "double_blocks.3", "single_blocks.10-18"
    (BFL's names; diffusers' "transformer_blocks" and "single_transformer_blocks")."""
    return Layout(
        (
            ("double_blocks", int(config["num_double_layers"])),
            ("single_blocks", int(config["num_single_layers"])),
        ),
        int(config["num_attention_heads"]),
        aliases=(
            ("transformer_blocks", "double_blocks"),
            ("single_transformer_blocks", "single_blocks"),
        ),
        nag_alpha=NAG_ALPHA,
    )
