"""Guiders: the constructors of every guidance method, checked settings in, a Guider out.

Every method is a sum of differences against one strong branch D_s = D(x, c) (docs/METHOD.md):

    D = D_s + sum_j (w_j(t) - 1) * P_j(D_s - D_j)

where D_j is term j's weak branch and P_j is the identity, or a combination rule
(``erg_jax.rules``). With one term this is ``D_j + w (D_s - D_j)``; w = 1 is no guidance.
A term's weak branch is a condition slot ("null", "cond" or the C-ERG "tempered" one),
a model (0, or 1 for AutoGuidance's weaker parameters) and attention perturbations:

- CFG: the null condition.        - ERG: the tempered condition and/or I-ERG energy
- PAG: identity attention.           in chosen layers after the kickoff kappa.
- SEG: query blur (sigma).        - SLG: skipped layers.   - AutoGuidance: model 1.
- TPG: each chosen block's update moved to other tokens by a random permutation.
- EMAG-Q: one candidate layer's image queries replaced by their moving average over the
  steps (a state carried by the sampler; the layer chosen per sample and step).
- NAG: not a weak branch: the strong branch's attention pushed away from the negative
  prompt inside its own forward (Chen et al. 2025), alone or beside any terms.
- SAG: the strong branch's x0 blurred where one layer's attention is high, noised back
  (a degraded input, built from the strong output: two forwards one after the other).

Rules change how a term combines: APG's projection (Sadat et al. 2025), CFG-Zero*, TCFG,
FDG, MAMBO-G and APG-Mix; each is a base method on the null condition ("tcfg") and a
modifier of any other ("erg+tcfg": ERG's weak branch in place of the null one). CFG
rescale (phi, Lin et al. 2024), CADS (Sadat et al. 2024) and weak-branch caching
(``cache``) act on the whole guider. Every number is traced data, so a sweep of weights,
temperatures or kickoffs compiles once; what is static is the structure (how many
terms, which perturbations, the energy's step count). The data and its per-step work
are ``erg_jax.guidance.guider``.
"""

from erg_jax.guidance.combination import (
    apg_mix,
    cfg_zero_star,
    fdg,
    mambo,
    tcfg,
    with_apg_mix,
    with_fdg,
    with_mambo,
    with_tcfg,
    with_zero_star,
)
from erg_jax.guidance.factory import (
    ALIASES,
    BUILDERS,
    COMMON,
    MODIFIERS,
    SECTION_FIELDS,
    check_text_guiders,
    defaults,
    guiders_from_section,
    make_guider,
    make_guiders,
    section_settings,
    tempered_tau_c,
)
from erg_jax.guidance.guider import CADS, NAG, SLOTS, Cache, Guider, Term, with_low_noise_weight
from erg_jax.guidance.methods import (
    apg,
    autoguidance,
    cache,
    cfg,
    compose,
    emag,
    erg,
    layer_ids,
    nag,
    none,
    pag,
    sag,
    seg,
    slg,
    tpg,
    with_apg,
    with_cads,
)
from erg_jax.rules import APG
from erg_jax.schedules import schedule
from erg_jax.targets import Layout, Target, resolve, resolve_targets

__all__ = [
    "ALIASES", "APG", "BUILDERS", "CADS", "COMMON", "Cache", "Guider", "Layout", "MODIFIERS",
    "NAG", "SECTION_FIELDS", "SLOTS", "Target", "Term", "apg", "apg_mix", "autoguidance", "cache",
    "cfg", "cfg_zero_star", "check_text_guiders", "compose", "defaults", "emag", "erg", "fdg",
    "guiders_from_section", "layer_ids", "make_guider", "make_guiders", "mambo", "nag", "none",
    "pag", "resolve", "resolve_targets", "sag", "schedule", "section_settings", "seg", "slg",
    "tcfg", "tempered_tau_c", "tpg", "with_apg", "with_apg_mix", "with_cads", "with_fdg",
    "with_low_noise_weight", "with_mambo", "with_tcfg", "with_zero_star",
]  # fmt: skip
