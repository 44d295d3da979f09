"""NAG's cost per sampling step against no guidance and CFG, on an MMDiT and a FLUX.1.

NAG (Chen et al. 2025) runs the negative text as a second stream inside the strong
branch's one forward: the text stream and, in FLUX.1's single blocks, the image tokens
run twice, and every guided attention twice as wide. Seconds per donated, jitted Euler
step of none, CFG (w 4), NAG (scale 5, tau 2.5, the kind's alpha, every layer) and
CFG + NAG (interleaved medians, ``setups.jitted_step``), as ratios to none and to CFG.
"""

from __future__ import annotations

import jax

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.jobs.speed import setups
from erg_jax.jobs.speed.timing import interleaved_medians
from erg_jax.models import flux

METHODS = ("none", "cfg", "nag", "cfg+nag")


def flux_setup(small: bool = False, batch: int = 8) -> setups.Setup:
    """A FLUX.1 with random weights and a guidance embedding (as [dev], filled at 3.5):
    the tiny test preset, or 2 double and 4 single blocks of width 256 on 32x32x16
    latents (256 image tokens) and 32 text tokens."""
    if small:
        cfg, tokens = flux.flux_config("tiny", precision="default"), 5
    else:
        width = 256
        cfg = flux.flux_config(
            "tiny",
            sample_size=32,
            in_channels=16,
            out_channels=16,
            num_double_layers=2,
            num_single_layers=4,
            num_attention_heads=4,
            attention_head_dim=width // 4,
            joint_attention_dim=width,
            pooled_projection_dim=128,
            axes_dims_rope=(8, 28, 28),
            precision="default",
        )
        tokens = 32
    den = flux.make_denoiser(cfg, flux.init_params(cfg, jax.random.key(3)))
    den = flux.with_distilled_guidance(den, 3.5)
    ks = jax.random.split(jax.random.key(4), 4)

    def text(a, b):
        return {
            "context": jax.random.normal(a, (batch, tokens, cfg["joint_attention_dim"])),
            "pooled": jax.random.normal(b, (batch, cfg["pooled_projection_dim"])),
        }

    conds = {"cond": text(ks[0], ks[1]), "null": text(ks[2], ks[3])}
    sampler = S.make_sampler("euler", 28, time="unit")
    n, c = cfg["sample_size"], cfg["in_channels"]
    name = "FLUX-tiny" if small else "FLUX-small"
    return setups.Setup(name, den, cfg, conds, sampler, cfg["num_layers"], batch, (n, n, c))


def nag_costs(setup: setups.Setup, repeats: int = 5) -> dict:
    """Milliseconds per step of none, CFG, NAG and CFG + NAG, and their ratios."""
    guiders = {m: G.make_guider(m, scale=4.0) for m in METHODS}
    steppers = {}
    for name, guider in guiders.items():
        fn, carry = setups.jitted_step(setup, guider)
        steppers[name] = setups.Stepper(fn, carry, setup.sampler.steps)
    secs = interleaved_medians(steppers, repeats)
    return {
        "model": setup.name,
        "batch": setup.batch,
        "layers": setup.num_layers,
        "step_ms": {k: 1e3 * v for k, v in secs.items()},
        "ratio_to_none": {k: secs[k] / secs["none"] for k in METHODS},
        "ratio_to_cfg": {k: secs[k] / secs["cfg"] for k in METHODS},
    }


def nag_table(small: bool = False, batch: int = 8, repeats: int = 5) -> list[dict]:
    """``nag_costs`` on the MMDiT and the FLUX.1 of the benchmark's sizes."""
    return [
        nag_costs(setups.mmdit_setup(small, batch), repeats),
        nag_costs(flux_setup(small, batch), repeats),
    ]
