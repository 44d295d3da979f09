"""Guidance's cost per sampling step on a small Wan video transformer.

Wan 2.1 (Wan Team 2025) is sampled with UniPC on a shifted flow grid and CFG; its recipe
(``models.wan_config.RECIPES``) adds ERG with I-ERG in the middle blocks and C-ERG's
tempered text in the weak branch, and SLG / STG-R skip one block. Seconds per donated,
jitted UniPC step (interleaved medians, ``setups.jitted_step``) of, at w = 5:

- none, CFG;
- erg: the recipe's ERG, I-ERG (tau 0.5) in the middle half of the blocks and the weak
  branch on the "tempered" text slot (C-ERG, tau_c 0.5). Its text differs from the
  strong branch's, so both branches run every block (``branches.map_branches``: on CPU
  one after the other); here the tempered slot holds the strong text, as the cost does
  not depend on the values;
- ierg: I-ERG alone, the weak branch on the strong text, so ``den.branched`` runs the
  blocks before the first perturbed one once (``models.shared_prefix``); ierg_plain_vmap
  is the same guider through the per-branch path (``setups.plain``), which is what the
  prefix saves;
- erg_cache2: the recipe's ERG with its weak branch refreshed every second step
  (``guidance.cache``), timed over its two-step cycle and reported per step;
- cfg+slg: CFG and SLG skipping the middle block (Wan2GP's and STG-R's use), 3 branches.

Reported as milliseconds and as ratios to none and to CFG.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.jobs.speed import setups
from erg_jax.jobs.speed.timing import interleaved_medians
from erg_jax.models import wan

METHODS = ("none", "cfg", "erg", "ierg", "erg_cache2", "cfg+slg")
SHARED = ("ierg",)  # also timed without the shared prefix, as "{name}_plain_vmap"


def sizes(small: bool = False) -> tuple[dict, tuple, int]:
    """The benchmarked Wan's config, latent shape (F, H, W, C) and text length.

    Full: 4 blocks of width 256 (4 heads of 64), FFN 1536, 512 text tokens of width 512
    (Wan feeds every row of its 512-token text), 5 latent frames of 16 x 24 x 16 (480
    tokens). Small: the tiny preset with 4 blocks, 2 frames of 4 x 4 x 4 (8 tokens) and
    8 text tokens. Float32, blocks scanned (as the recipes run them).
    """
    if small:
        cfg = wan.wan_config("tiny", num_layers=4, precision="default", scan_blocks=True)
        return cfg, (2, 4, 4, cfg["in_channels"]), 8
    width, heads = 256, 4
    cfg = wan.wan_config(
        "tiny",
        in_channels=16,
        out_channels=16,
        num_layers=4,
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        ffn_dim=1536,
        text_dim=512,
        freq_dim=256,
        precision="default",
        scan_blocks=True,
    )
    return cfg, (5, 16, 24, 16), 512


def wan_setup(small: bool = False, batch: int = 2, params=None) -> setups.Setup:
    """The Wan of ``sizes`` with random weights (or ``params``), random text, a zero
    null text, and UniPC on Wan's 50-step grid (shift 3)."""
    cfg, shape, text_tokens = sizes(small)
    if params is None:
        params = jax.jit(lambda key: wan.init_params(cfg, key))(jax.random.key(5))
    den = wan.make_denoiser(cfg, params)
    text = {"context": jax.random.normal(jax.random.key(6), (batch, text_tokens, cfg["text_dim"]))}
    null = jax.tree_util.tree_map(jnp.zeros_like, text)
    conds = {"cond": text, "null": null, "tempered": text}
    sampler = S.make_sampler("unipc", 50, time="sd3", shift=3.0)
    name = "Wan-tiny" if small else "Wan-small"
    return setups.Setup(name, den, cfg, conds, sampler, cfg["num_layers"], batch, shape)


def guiders(num_layers: int) -> dict[str, G.Guider]:
    """The compared guiders (w = 5, Wan's), named by the blocks they perturb."""
    middle = f"blocks.{num_layers // 4}-{3 * num_layers // 4 - 1}"
    erg = dict(tau=0.5, tau_c=0.5, layers=middle)
    ierg = dict(tau=0.5, layers=middle, condition="cond")
    slg = dict(layers=f"blocks.{num_layers // 2}", scale=3.0)
    make = G.make_guider
    return {
        "none": make("none"),
        "cfg": make("cfg", scale=5.0),
        "erg": make("erg", scale=5.0, erg=erg),
        "ierg": make("erg", scale=5.0, erg=ierg),
        "erg_cache2": make("erg+cache", scale=5.0, erg=erg, cache=dict(every=2)),
        "cfg+slg": make("cfg+slg", scale=5.0, slg=slg),
    }


def wan_costs(setup: setups.Setup, repeats: int = 5) -> dict:
    """Milliseconds per step of every guider, ratios to none and to CFG, and the share of
    I-ERG's step that the shared prefix saves."""
    # resolved here: the per-branch path's denoiser (``setups.plain``) has no layout
    gs = {k: G.resolve_targets(g, setup.den.layout) for k, g in guiders(setup.num_layers).items()}
    steppers = {}
    for name, g in gs.items():
        every = int(g.cache.every) if g.cache is not None else 1
        steppers[name] = setups.Stepper(*setups.jitted_step(setup, g), setup.sampler.steps, every)
    for name in SHARED:
        fn, carry = setups.jitted_step(setup, gs[name], setups.plain(setup.den))
        steppers[f"{name}_plain_vmap"] = setups.Stepper(fn, carry, setup.sampler.steps)
    secs = interleaved_medians(steppers, repeats)
    secs = {k: v / steppers[k].per_call for k, v in secs.items()}  # seconds per step
    frames, h, w, _ = setup.shape
    pt, ph, pw = setup.config["patch_size"]
    return {
        "model": setup.name,
        "batch": setup.batch,
        "layers": setup.num_layers,
        "tokens": frames // pt * (h // ph) * (w // pw),
        "text_tokens": setup.conds["cond"]["context"].shape[1],
        "solver": setup.sampler.solver,
        "step_ms": {k: 1e3 * v for k, v in secs.items()},
        "ratio_to_none": {k: v / secs["none"] for k, v in secs.items()},
        "ratio_to_cfg": {k: v / secs["cfg"] for k, v in secs.items()},
        "shared_prefix_saving": {k: 1.0 - secs[k] / secs[f"{k}_plain_vmap"] for k in SHARED},
    }
