"""Wan 2.1 / 2.2 text-to-video transformer configs: presets, their checks, the checked
``Spec`` every layer reads, the block layout guidance targets name, and the sampling
recipes of the published sizes.

The presets follow the Wan Team's published transformers (Wan 2025, "Wan: Open and
Advanced Large-Scale Video Generative Models") as diffusers' ``WanTransformer3DModel``
stores them in ``transformer/config.json``: Wan2.1-T2V-1.3B (30 blocks of width 1536),
Wan2.1-T2V-14B and each of the two Wan2.2-T2V-A14B experts (40 blocks of width 5120),
all with 128-channel heads, (1, 2, 2) space-time patches of 16-channel latents and umT5
text tokens of width 4096. Field names are diffusers'. Image-to-video models (an image
embedder and a second key / value projection in the cross-attention) are refused.

The blocks are one run of like blocks: scanned, their params are stacked under
"blocks"; per block they are "blocks_{i}". ``erg_jax.models.wan`` re-exports every
public name here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from erg_jax.models.mmdit_config import TINY_TEXT_MODEL
from erg_jax.models.stacking import stack_groups, unstack_groups
from erg_jax.targets import Layout

_T2V = dict(
    kind="wan",
    prediction="velocity",
    learned_sigma=False,
    time="sd3",  # the model's timestep is 1000 * sigma, as SD3's
    patch_size=(1, 2, 2),  # (frames, height, width)
    in_channels=16,
    out_channels=16,
    num_layers=30,
    num_attention_heads=12,
    attention_head_dim=128,
    ffn_dim=8960,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
    dtype="bfloat16",
    param_dtype="bfloat16",
    precision="default",
    attention_implementation=None,
    scan_blocks=False,
    remat=False,
)
_14B = dict(_T2V, num_layers=40, num_attention_heads=40, ffn_dim=13824)
PRESETS: dict[str, dict] = {
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json
    "t2v_1_3b": _T2V,
    # Wan-AI/Wan2.1-T2V-14B-Diffusers
    "t2v_14b": _14B,
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers: transformer/ (high noise) and transformer_2/
    # (low noise) are two experts of this one shape
    "t2v_a14b": _14B,
    # Tiny sizes for tests, float32 with exact matmuls: 2 heads of 32 channels.
    "tiny": dict(
        _T2V,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        num_attention_heads=2,
        attention_head_dim=32,
        ffn_dim=128,
        text_dim=32,
        freq_dim=32,
        dtype="float32",
        param_dtype="float32",
        precision="highest",
    ),
}
QK_NORMS = ("rms_norm_across_heads",)
# Fields of an image-to-video Wan (its image embedder, the added key / value projections
# of the cross-attention, FLF2V's image position table); set, they are refused.
I2V_FIELDS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


def wan_config(name: str = "t2v_1_3b", **overrides: Any) -> dict:
    """The config dict (kind='wan') of a preset: 't2v_1_3b', 't2v_14b', 't2v_a14b' or
    'tiny'. Overrides replace fields; an unknown field is a ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown Wan preset {name!r}; choose from {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(PRESETS[name]))
    if unknown:
        raise ValueError(f"unknown Wan config field(s) {unknown}")
    config = dict(PRESETS[name], **overrides)
    config["patch_size"] = tuple(int(p) for p in config["patch_size"])
    check_config(config)
    return config


def _positive(config: dict, field: str) -> int:
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
    return value


def check_config(config: dict) -> None:
    """Raises a ValueError naming the field and its allowed values when the fields of a
    Wan config do not describe a text-to-video WanTransformer3DModel."""
    if config.get("kind") != "wan":
        raise ValueError(f"kind must be 'wan', got {config.get('kind')!r}")
    for field in I2V_FIELDS:
        if config.get(field) is not None:
            raise ValueError(
                f"{field}={config[field]!r}: image-to-video Wan models are not supported, "
                f"text-to-video only ({', '.join(I2V_FIELDS)} must be None)"
            )
    for field in ("num_layers", "num_attention_heads", "in_channels", "ffn_dim", "text_dim"):
        _positive(config, field)
    for field in ("rope_max_seq_len",):
        _positive(config, field)
    head_dim = _positive(config, "attention_head_dim")
    if head_dim % 2 or head_dim < 6:
        raise ValueError(
            f"attention_head_dim must be even and >= 6 (its channels split over the frame, "
            f"row and column rotary axes), got {head_dim}"
        )
    freq = _positive(config, "freq_dim")
    if freq % 2:
        raise ValueError(f"freq_dim must be even (cos and sin halves), got {freq}")
    if config.get("out_channels") is not None:
        _positive(config, "out_channels")
    patch = config.get("patch_size")
    if (
        not isinstance(patch, tuple | list)
        or len(patch) != 3
        or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in patch)
    ):
        raise ValueError(f"patch_size must be three integers >= 1 (frames, h, w), got {patch!r}")
    if config.get("qk_norm") not in QK_NORMS:
        raise ValueError(
            f"qk_norm must be one of {QK_NORMS} (every Wan attention RMS-normalises its "
            f"queries and keys over all heads), got {config.get('qk_norm')!r}"
        )
    norm = config.get("cross_attn_norm")
    if not isinstance(norm, bool):
        raise ValueError(f"cross_attn_norm must be True or False, got {norm!r}")
    eps = config.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    for field in ("dtype", "param_dtype"):
        try:
            jnp.dtype(config.get(field, "float32"))
        except TypeError as e:
            raise ValueError(f"{field} must name a dtype, got {config.get(field)!r}") from e
    if config.get("precision") not in (None, "default", "high", "highest"):
        raise ValueError(
            f"precision must be 'default', 'high' or 'highest', got {config.get('precision')!r}"
        )


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static settings every layer reads (hashable, built from a config dict)."""

    num_layers: int
    patch: tuple[int, int, int]
    out_channels: int
    heads: int
    head_dim: int
    ffn_dim: int
    eps: float
    cross_attn_norm: bool
    rope_max: int
    freq_dim: int
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
    def rope_axes(self) -> tuple[int, int, int]:
        """Channels of each head rotated by the frame, row and column positions (pairs
        of channels; diffusers' WanRotaryPosEmbed split: rows and columns 2 * (d // 6)
        each, frames the rest)."""
        side = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * side, side, side

    @classmethod
    def from_config(cls, config: dict) -> Spec:
        check_config(config)
        precision = config.get("precision")
        return cls(
            num_layers=int(config["num_layers"]),
            patch=tuple(int(p) for p in config["patch_size"]),
            out_channels=int(config.get("out_channels") or config["in_channels"]),
            heads=int(config["num_attention_heads"]),
            head_dim=int(config["attention_head_dim"]),
            ffn_dim=int(config["ffn_dim"]),
            eps=float(config["eps"]),
            cross_attn_norm=bool(config["cross_attn_norm"]),
            rope_max=int(config["rope_max_seq_len"]),
            freq_dim=int(config["freq_dim"]),
            dtype=jnp.dtype(config.get("dtype", "float32")),
            param_dtype=jnp.dtype(config.get("param_dtype", "float32")),
            precision=None if precision in (None, "default") else str(precision),
            implementation=config.get("attention_implementation"),
            scan=bool(config.get("scan_blocks", False)),
            remat=bool(config.get("remat", False)),
        )


def block_names(config: dict | int) -> list[str]:
    """The per-block param names, blocks_0 .. blocks_{L-1}."""
    n = config if isinstance(config, int) else int(config["num_layers"])
    return [f"blocks_{i}" for i in range(n)]


def stack_blocks(params: dict, config: dict | int) -> dict:
    """Per-block params -> the scanned layout ("blocks", a leading layer axis), for a
    config (whose scan_blocks is ignored) or its number of layers."""
    return stack_groups(params, [("blocks", block_names(config))])


def unstack_blocks(params: dict, config: dict | int) -> dict:
    """Scanned params -> per-block ones (inverse of ``stack_blocks``)."""
    return unstack_groups(params, [("blocks", block_names(config))])


# The Wan 2.1 VAE's compression, which Wan 2.1 and Wan 2.2 A14B share: the first frame
# alone, then every 4 frames, into one latent frame; 8 x 8 pixels into one latent pixel.
VAE_TEMPORAL, VAE_SPATIAL = 4, 8


def _nearest(value: int, step: int, offset: int) -> str:
    """The valid sizes offset + k step next to value (the smallest, below it)."""
    if value <= offset:
        return str(offset)
    low = offset + (value - offset) // step * step
    return f"{low} or {low + step}"


def latent_shape(config: dict, num_frames: int, height: int, width: int) -> tuple:
    """The latents (frames, h, w, channels) of a video of num_frames frames of height x
    width pixels; sizes the VAE and the patches cannot take are a ValueError naming the
    ``video.*`` field and the nearest sizes they take (WanPipeline rounds them silently).
    """
    pt, ph, pw = (int(p) for p in config["patch_size"])
    frames = VAE_TEMPORAL * pt
    if num_frames < 1 or (num_frames - 1) % frames:
        raise ValueError(
            f"video.num_frames={num_frames} must be {frames}k + 1 (the VAE keeps the first "
            f"frame and packs each {VAE_TEMPORAL} after it): {_nearest(num_frames, frames, 1)}"
        )
    for field, size, p in (("height", height, ph), ("width", width, pw)):
        side = VAE_SPATIAL * p
        if size < side or size % side:
            raise ValueError(
                f"video.{field}={size} must be a multiple of {side} ({VAE_SPATIAL}x VAE "
                f"pixels, {p}x{p} patches): {_nearest(size, side, side)}"
            )
    latent_frames = (num_frames - 1) // VAE_TEMPORAL + 1
    return latent_frames, height // VAE_SPATIAL, width // VAE_SPATIAL, int(config["in_channels"])


def layout(config: dict) -> Layout:
    """The blocks as guidance targets name them: "blocks.10-19" (diffusers' and Wan's own
    name; "transformer_blocks" is an alias). Every block holds one self-attention, the
    one a control perturbs."""
    return Layout(
        (("blocks", int(config["num_layers"])),),
        int(config["num_attention_heads"]),
        aliases=(("transformer_blocks", "blocks"),),
    )


# How the published Wan models are sampled: settings fields (erg_jax.settings) per recipe,
# the first the default. Grid and CFG scale: the Wan repository's text-to-video defaults
# (Wan 2.1: 50 steps, shift 5, guidance 5; Wan 2.2 A14B: 40 steps, shift 12, guidance 4 on
# the high-noise expert and 3 on the low-noise one, one scale here per run); umT5 at 512
# tokens, bfloat16 weights. Wan's pipelines step with flow UniPC; Euler on the same
# shifted grid stands in for it here.
#
# Layers are untuned starting points: nobody has published ERG (or PAG / SEG) on Wan.
# I-ERG runs in ten middle blocks (the blocks before them run once for both branches),
# SEG blurs the queries of the middle block. Two choices come from published settings:
# - SLG skips block 9, Wan2GP's default for its "skip layer guidance" (deepbeepmeep/Wan2GP,
#   settings slg_layers [9] between 10% and 90% of the steps). On the folders' grid (flow
#   shift 3) those steps are the noise levels ~0.25-0.96.
# - STG (Hyun et al. 2024, "Spatiotemporal Skip Guidance"; their LTX-Video example: weight
#   1 on block 19 of 28 with the output rescaled by 0.7, as LTX-Video's and maxdiffusion's
#   STG code): STG-R skips a block (our SLG, the term "stg") and STG-A replaces its
#   self-attention by the values (our PAG, so PAG sits in the same block). The block is
#   the one at the same relative depth (about two thirds) in Wan. STG-R is a labelled term
#   (``STG_TERMS``: guidance.terms.stg, used as "cfg+stg"), its weight 2 being STG's 1 in
#   our w - 1 convention.
# The negative prompt Wan's own sampling scripts use when none is given (its shared
# config's sample_neg_prompt; diffusers' WanPipeline defaults to "" and shows the English
# rendering in its example): over-saturated, over-exposed, static, blurred, subtitles,
# worst quality, extra fingers, deformed limbs, cluttered background, walking backwards...
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
_WAN = {
    "model.scan_blocks": True,  # 30-40 blocks: one scanned body compiles far faster
    "model.dtype": "bfloat16",
    "model.param_dtype": "bfloat16",
    "vae.preset": "wan2.1",  # Wan 2.2 A14B decodes with the Wan 2.1 VAE too
    "text.layout": "wan",
    "text.max_sequence_length": 512,
    "text.dtype": "bfloat16",
    "text.negative_prompts": NEGATIVE_PROMPT,
    "video.num_frames": 81,  # 5 s at 16 frames per second, the pipelines' default
    "video.fps": 16,
    "sampler.solver": "unipc",  # Wan's scheduler: UniPC on the flow sigmas
    # The published folders' flow_shift (diffusers' Wan default); the Wan team's own
    # scripts shift more at 720p (5) and for Wan 2.2 A14B (12): with a folder, set
    # sampler.scheduler_overrides=flow_shift=5.0, without one sampler.shift=5.0.
    "sampler.shift": 3.0,
    "guidance.methods": "cfg,erg",
    "guidance.erg.tau": 0.5,
    "guidance.erg.tau_c": 0.5,
    "guidance.erg.kappa": 0.1,
    "guidance.slg.layers": "blocks.9",
}


def _stg(block: int) -> dict:
    return {"method": "slg", "layers": f"blocks.{block}", "scale": 2.0, "rescale": 0.7}


# STG-R per recipe, the recipes' ``guidance.terms.stg`` (methods="cfg+stg").
STG_TERMS = {"t2v_1_3b": _stg(20), "t2v_14b": _stg(27), "t2v_a14b": _stg(27), "tiny": _stg(2)}
RECIPES = {
    "t2v_1_3b": {
        **_WAN,
        "model.preset": "t2v_1_3b",
        "video.height": 480,
        "video.width": 832,
        "sampler.steps": 50,
        "guidance.scale": 5.0,
        "guidance.erg.layers": "blocks.10-19",
        "guidance.pag.layers": "blocks.20",
        "guidance.seg.layers": "blocks.15",
        "guidance.slg.interval": (0.25, 0.96),
    },
    "t2v_14b": {
        **_WAN,
        "model.preset": "t2v_14b",
        "video.height": 720,
        "video.width": 1280,
        "sampler.steps": 50,
        "guidance.scale": 5.0,
        "guidance.erg.layers": "blocks.15-24",
        "guidance.pag.layers": "blocks.27",
        "guidance.seg.layers": "blocks.20",
        "guidance.slg.interval": (0.25, 0.96),
        "mesh.fsdp": -1,  # 14B parameters: sharded over every device
        "mesh.data": 1,
    },
    "t2v_a14b": {
        **_WAN,
        "model.preset": "t2v_a14b",
        "video.height": 720,
        "video.width": 1280,
        "sampler.steps": 40,
        "guidance.scale": 4.0,  # the high-noise expert's (Wan 2.2's published example)
        "guidance.low_noise_scale": 3.0,  # the low-noise expert's (its guidance_scale_2)
        "guidance.erg.layers": "blocks.15-24",
        "guidance.pag.layers": "blocks.27",
        "guidance.seg.layers": "blocks.20",
        "guidance.slg.interval": (0.25, 0.96),
        "mesh.fsdp": -1,
        "mesh.data": 1,
    },
    # a random tiny Wan and tiny Wan VAE (4 latent channels), conditioned by the PyPI
    # MiniLM-L6 (384-wide tokens): 5 frames of 32 x 48, latents (2, 4, 6, 4)
    "tiny": {
        **_WAN,
        **TINY_TEXT_MODEL,
        "model.overrides": "text_dim=384",
        "vae.preset": "tiny",
        "video.num_frames": 5,
        "video.height": 32,
        "video.width": 48,
        "sampler.batch_size": 8,  # one batch over up to 8 devices
        "guidance.erg.layers": "blocks.1-2",
        "guidance.pag.layers": "blocks.1",
        "guidance.seg.layers": "blocks.1",
        "guidance.slg.layers": "blocks.1",
    },
}
for _name, _recipe in RECIPES.items():  # STG-R beside CFG as the labelled term "stg"
    _recipe["guidance.terms"] = {"stg": STG_TERMS[_name]}
