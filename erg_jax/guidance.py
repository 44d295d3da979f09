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
- SAG: the strong branch's x0 blurred where one layer's attention is high, noised back
  (a degraded input, built from the strong output: two forwards one after the other).

Rules change how a term combines: APG's projection (Sadat et al. 2025), CFG-Zero*, TCFG,
FDG, MAMBO-G and APG-Mix; each is a base method on the null condition ("tcfg") and a
modifier of any other ("erg+tcfg": ERG's weak branch in place of the null one). CFG
rescale (phi, Lin et al. 2024), CADS (Sadat et al. 2024) and weak-branch caching
(``cache``) act on the whole guider. Every number is traced data, so a sweep of weights,
temperatures or kickoffs compiles once; what is static is the structure (how many
terms, which perturbations, the energy's step count). The data and its per-step work
are ``erg_jax.guider``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax import rules as R
from erg_jax.energy import Energy, check_energy, check_positive
from erg_jax.guider import CADS, SLOTS, Cache, Guider, Term  # noqa: F401  (re-exported)
from erg_jax.rules import APG  # noqa: F401  (re-exported)
from erg_jax.schedules import check_range, schedule

# ---- constructors: checked settings in, a Guider out ----------------------------------


def _layers(layers, name):
    if layers is None or isinstance(layers, jax.Array | jnp.ndarray):
        return layers
    layers = tuple(int(i) for i in layers)
    if not layers:
        raise ValueError(f"{name} must name at least one layer, got an empty list")
    if min(layers) < -1:
        raise ValueError(f"{name} must hold layer indices >= 0 (or -1 as padding), got {layers}")
    return jnp.asarray(layers, jnp.int32)


def none() -> Guider:
    """No guidance: the strong branch alone (1 function evaluation per step)."""
    return Guider(name="none")


def cfg(scale=4.0, *, rescale=0.0, shape="constant", interval=(0.0, 1.0)) -> Guider:
    """Classifier-free guidance (Ho & Salimans 2022) with rescale phi (Lin et al. 2024)."""
    check_range(rescale, "rescale", 0.0, 1.0)
    return Guider((Term(schedule(scale, shape, interval), "null"),), rescale, name="cfg")


def apg(
    scale=4.0,
    *,
    momentum=0.0,
    norm_threshold=math.inf,
    eta=0.0,
    shape="constant",
    interval=(0.0, 1.0),
) -> Guider:
    """Adaptive projected guidance against the null condition (Sadat et al. 2025)."""
    settings = R.check_apg(momentum, norm_threshold, eta)
    return Guider((Term(schedule(scale, shape, interval), "null", apg=settings),), name="apg")


def erg(
    scale=3.0,
    *,
    energy: Energy | None = Energy(tau=0.5),
    layers=None,
    kappa=0.0,
    kappa_unit: str = "noise",
    steps: int = 1,
    condition: str = "auto",
    shape="constant",
    interval=(0.0, 1.0),
) -> Guider:
    """Entropy Rectifying Guidance (Berrada Ifriqi et al. 2025).

    Args:
      scale: w; 1 is no guidance.
      energy: I-ERG's Energy in the selected denoiser layers (None: no I-ERG).
      layers: the I-ERG layers (None = all), indices or a boolean mask.
      kappa: kickoff. With ``kappa_unit="noise"`` (the paper's definition) I-ERG is on
        while the noise level t <= 1 - kappa; with "steps", from the step whose share of
        the sampler's steps done is >= kappa (kappa = 0.1 of 50 steps: from step 5).
        A shifted grid (SD3's shift 3) spends more steps at high noise, so the two differ.
      steps: energy updates K in those layers (static).
      condition: the weak branch's condition slot: "tempered" (C-ERG), "cond"
        (class-conditional or I-ERG only), "null", or "auto" (tempered when given).
    """
    if condition not in SLOTS:
        raise ValueError(f"condition must be one of {SLOTS}, got {condition!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    check_range(kappa, "kappa", 0.0, 1.0)
    if kappa_unit not in ("noise", "steps"):
        raise ValueError(f"kappa_unit must be 'noise' or 'steps', got {kappa_unit!r}")
    if energy is not None:
        check_energy(energy)
    term = Term(
        schedule(scale, shape, interval),
        condition,
        energy=energy,
        energy_layers=_layers(layers, "layers"),
        kappa=kappa,
        kappa_unit=kappa_unit,
        energy_steps=steps,
    )
    return Guider((term,), name="erg")


def pag(scale=3.0, *, layers=None, shape="constant", interval=(0.0, 1.0)) -> Guider:
    """Perturbed-attention guidance: identity attention in the layers (Ahn et al. 2024)."""
    term = Term(
        schedule(scale, shape, interval),
        "cond",
        identity_layers=_layers(layers, "layers"),
        uses_identity=True,
    )
    return Guider((term,), name="pag")


def seg(scale=3.0, *, sigma=math.inf, layers=None, shape="constant", interval=(0.0, 1.0)) -> Guider:
    """Smoothed energy guidance: queries blurred over the token grid (Hong 2024)."""
    check_positive(1.0 if sigma == math.inf else sigma, "sigma")
    term = Term(
        schedule(scale, shape, interval),
        "cond",
        blur_sigma=sigma,
        blur_layers=_layers(layers, "layers"),
        uses_blur=True,
    )
    return Guider((term,), name="seg")


def slg(scale=3.0, *, layers=(0,), shape="constant", interval=(0.0, 1.0)) -> Guider:
    """Skip-layer guidance: the weak branch skips the layers."""
    term = Term(
        schedule(scale, shape, interval),
        "cond",
        skip_layers=_layers(layers, "layers"),
        uses_skip=True,
    )
    return Guider((term,), name="slg")


def sag(scale=1.75, *, layer=None, sigma=1.0, shape="constant", interval=(0.0, 1.0)) -> Guider:
    """Self-attention guidance (Hong et al. 2023) as a guider of its own: the weak branch
    is D(x_t', c), x_t' = x_t with the strong x0 estimate blurred where the strong
    branch's attention in ``layer`` is above average (``erg_jax.sag``).

    Args:
      scale: w = the reference's sag_scale + 1 (its default 0.75: w = 1.75).
      layer: the block whose attention map is taken: None (the middle block), an index,
        or one-hot weights over the blocks (traced: a sweep over layers compiles once).
      sigma: the blur's width in latent pixels (kernel 9, as the reference).
    """
    check_positive(sigma, "sag sigma")
    if layer is not None and not isinstance(layer, jax.core.Tracer):
        value = np.asarray(layer)
        index = value.ndim == 0 and value.dtype != np.bool_
        if value.ndim == 0 and not (index and value >= 0 and value % 1 == 0):
            raise ValueError(f"sag layer must be a layer index >= 0 or None, got {layer!r}")
        layer = jnp.asarray(layer, jnp.int32 if index else jnp.float32)
    term = Term(
        schedule(scale, shape, interval),
        "cond",
        sag_layer=layer,
        sag_sigma=sigma,
        uses_sag=True,
    )
    return Guider((term,), name="sag")


def autoguidance(scale=2.0, *, shape="constant", interval=(0.0, 1.0)) -> Guider:
    """AutoGuidance (Karras et al. 2024): the weak branch is model 1, a weaker network."""
    return Guider((Term(schedule(scale, shape, interval), "cond", model=1),), name="autoguidance")


def with_apg(guider: Guider, *, momentum=0.0, norm_threshold=math.inf, eta=0.0) -> Guider:
    """Every term's difference through APG's projection (for example ERG + APG)."""
    settings = R.check_apg(momentum, norm_threshold, eta)
    if any(t.rule is not None for t in guider.terms):
        raise ValueError(f"apg replaces a term's combination; {guider.name!r} already has one")
    terms = tuple(t.replace(apg=settings) for t in guider.terms)
    return guider.replace(terms=terms, name=guider.name + "+apg")


def with_cads(guider: Guider, *, tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0) -> Guider:
    """The guider with CADS on its conditional branches (for example ERG + CADS)."""
    check_range(tau1, "cads tau1", 0.0, math.inf)
    check_range(tau2, "cads tau2", 0.0, math.inf)
    if float(tau2) < float(tau1):
        raise ValueError(f"cads tau2 must be >= tau1, got tau1={tau1}, tau2={tau2}")
    check_range(psi, "cads psi", 0.0, 1.0)
    return guider.replace(cads=CADS(tau1, tau2, noise_scale, psi), name=guider.name + "+cads")


# ---- combination rules: modifiers of any guider, and base methods on the null branch --


def _with_rule(guider: Guider, rule, name: str, *, gate: bool = False) -> Guider:
    if not guider.terms:
        raise ValueError(f"{name} changes how weak branches combine; {guider.name!r} has none")
    if any(t.apg is not None or t.rule is not None for t in guider.terms):
        raise ValueError(f"{name} replaces a term's combination; {guider.name!r} already has one")
    # FDG carries its own band weights: the term's schedule only gates and shapes them.
    terms = tuple(
        t.replace(rule=rule, weight=t.weight.replace(scale=2.0) if gate else t.weight)
        for t in guider.terms
    )
    return guider.replace(terms=terms, name=f"{guider.name}+{name}")


def with_zero_star(guider: Guider, *, zero_steps=1, space: str = "velocity") -> Guider:
    """CFG-Zero* (Fan et al. 2025) on every term: the weak prediction scaled by the
    optimised s*, zero velocity for the first ``zero_steps`` sampler steps (velocity)."""
    check_range(zero_steps, "zero_star zero_steps", 0.0, math.inf)
    return _with_rule(
        guider, R.ZeroStar(zero_steps, R.check_space(space, "zero_star")), "zero_star"
    )


def with_tcfg(guider: Guider, *, space: str = "eps") -> Guider:
    """TCFG (Kwon et al. 2025) on every term: the weak prediction projected onto the
    pair's first right singular vector (noise space)."""
    return _with_rule(guider, R.Tangential(R.check_space(space, "tcfg")), "tcfg")


def with_mambo(guider: Guider, *, alpha=8.0, space: str = "velocity") -> Guider:
    """MAMBO-G on every term: w -> 1 + (w - 1) exp(-alpha |D_s - D_w| / |D_w|) (velocity)."""
    check_range(alpha, "mambo alpha", 0.0, math.inf)
    return _with_rule(guider, R.Magnitude(alpha, R.check_space(space, "mambo")), "mambo")


def with_fdg(guider: Guider, *, scales=(10.0, 5.0), parallel=1.0, space: str = "x0") -> Guider:
    """FDG (Sadat et al. 2025) on every term: a weight per Laplacian band, finest first
    (the term's own weight is replaced; its shape and interval gate the bands; x0)."""
    scales = tuple(scales)
    if not scales:
        raise ValueError("fdg scales must name at least one band weight, got ()")
    par = tuple(parallel) if isinstance(parallel, list | tuple) else (parallel,) * len(scales)
    if len(par) != len(scales):
        raise ValueError(f"fdg parallel must have {len(scales)} weights (one per band), got {par}")
    rule = R.Frequency(scales, par, R.check_space(space, "fdg"))
    return _with_rule(guider, rule, "fdg", gate=True)


def with_apg_mix(
    guider: Guider,
    *,
    scale=10.0,
    cfg_steps=6,
    momentum=-0.5,
    norm_threshold=10.0,
    eta=0.0,
    space: str = "x0",
) -> Guider:
    """APG-Mix on every term: the term's own weight for the first ``cfg_steps`` sampler
    steps (APG's momentum accumulating), then APG at ``scale`` (x0)."""
    check_range(cfg_steps, "apg_mix cfg_steps", 0.0, math.inf)
    apg = R.check_apg(momentum, norm_threshold, eta)
    rule = R.Mix(apg, scale, cfg_steps, R.check_space(space, "apg_mix"))
    return _with_rule(guider, rule, "apg_mix")


def cfg_zero_star(scale=4.0, *, zero_steps=1, rescale=0.0, shape="constant", interval=(0.0, 1.0)):
    """CFG-Zero*: CFG with the optimised null scale and zero-velocity first steps."""
    base = cfg(scale, rescale=rescale, shape=shape, interval=interval)
    return with_zero_star(base, zero_steps=zero_steps).replace(name="cfg_zero_star")


def tcfg(scale=4.0, *, rescale=0.0, shape="constant", interval=(0.0, 1.0), space="eps"):
    """Tangential CFG: the null prediction projected before the difference."""
    base = cfg(scale, rescale=rescale, shape=shape, interval=interval)
    return with_tcfg(base, space=space).replace(name="tcfg")


def mambo(scale=4.0, *, alpha=8.0, rescale=0.0, shape="constant", interval=(0.0, 1.0)):
    """MAMBO-G: CFG whose weight decays with the difference's relative size."""
    base = cfg(scale, rescale=rescale, shape=shape, interval=interval)
    return with_mambo(base, alpha=alpha).replace(name="mambo")


def fdg(scales=(10.0, 5.0), *, parallel=1.0, rescale=0.0, shape="constant", interval=(0.0, 1.0)):
    """Frequency-decoupled guidance against the null condition, band weights finest first."""
    base = cfg(2.0, rescale=rescale, shape=shape, interval=interval)
    return with_fdg(base, scales=scales, parallel=parallel).replace(name="fdg")


def apg_mix(
    scale=3.5,
    *,
    apg_scale=10.0,
    cfg_steps=6,
    momentum=-0.5,
    norm_threshold=10.0,
    eta=0.0,
    rescale=0.0,
    shape="constant",
    interval=(0.0, 1.0),
):
    """APG-Mix: CFG at ``scale`` for ``cfg_steps`` steps, then APG at ``apg_scale``."""
    base = cfg(scale, rescale=rescale, shape=shape, interval=interval)
    mix = dict(momentum=momentum, norm_threshold=norm_threshold, eta=eta)
    return with_apg_mix(base, scale=apg_scale, cfg_steps=cfg_steps, **mix).replace(name="apg_mix")


def cache(guider: Guider, *, every=2, window=(0.0, 1.0)) -> Guider:
    """The guider with its weak branches evaluated only every ``every``-th step inside
    the noise-level ``window``, their x0 difference to the strong branch reused between.

    Each skipped step costs the strong branch alone; ``every=1`` is the guider itself.
    ``every`` and the window are traced, so a sweep over them compiles once. The sampler
    carries the cached differences (``samplers.sample``).
    """
    if any(t.uses_sag for t in guider.terms):
        raise ValueError(
            f"{guider.name}: sag cannot use the weak-branch cache: its weak input is built "
            "from the current step's strong output"
        )
    check_range(every, "cache every", 1.0, math.inf)
    if not isinstance(every, jax.core.Tracer) and float(every) % 1:
        raise ValueError(f"cache every must be a whole number >= 1, got {every!r}")
    lo, hi = window
    check_range(lo, "cache window[0]", 0.0, 1.0)
    check_range(hi, "cache window[1]", 0.0, 1.0)
    if float(lo) > float(hi):
        raise ValueError(f"cache window must have window[0] <= window[1], got {window}")
    return guider.replace(cache=Cache(every, lo, hi), name=guider.name + "+cache")


def compose(*guiders: Guider, rescale=0.0) -> Guider:
    """One strong branch, every guider's terms added (for example CFG + PAG)."""
    if any(g.cads is not None or g.cache is not None for g in guiders):
        raise ValueError("compose guiders first, then add CADS (with_cads) or a cache")
    terms = tuple(t for g in guiders for t in g.terms)
    return Guider(terms, rescale, name="+".join(g.name for g in guiders))


BUILDERS = {
    "none": none,
    "cfg": cfg,
    "apg": apg,
    "erg": erg,
    "pag": pag,
    "seg": seg,
    "slg": slg,
    "sag": sag,
    "autoguidance": autoguidance,
    "cfg_zero_star": cfg_zero_star,
    "tcfg": tcfg,
    "mambo": mambo,
    "fdg": fdg,
    "apg_mix": apg_mix,
}
MODIFIERS = {
    "apg": with_apg,
    "cads": with_cads,
    "zero_star": with_zero_star,
    "tcfg": with_tcfg,
    "mambo": with_mambo,
    "fdg": with_fdg,
    "apg_mix": with_apg_mix,
}


def make_guider(method: str, **settings: Mapping[str, Any]) -> Guider:
    """A guider from a name such as "cfg", "erg+apg", "erg+cads" or "cfg+pag".

    Args:
      method: base names joined by "+"; "apg" or "cads" after a base modify it.
      settings: per name, the keyword arguments of its constructor, e.g.
        ``make_guider("erg+apg", erg={"scale": 3}, apg={"momentum": -0.5})``.
    """
    parts = [p.strip() for p in method.split("+") if p.strip()]
    if not parts or parts[0] not in BUILDERS:
        raise ValueError(
            f"unknown guidance method {method!r}; names: {sorted(BUILDERS)}, "
            f"modifiers: {sorted(MODIFIERS)}"
        )
    unknown = set(settings) - set(BUILDERS) - set(MODIFIERS)
    if unknown:
        raise ValueError(f"settings for unknown methods {sorted(unknown)} in {method!r}")
    bases, mods = [], []
    for i, p in enumerate(parts):
        if i > 0 and p in MODIFIERS:
            mods.append(p)
        elif p in BUILDERS and not mods:
            bases.append(BUILDERS[p](**settings.get(p, {})))
        else:
            raise ValueError(
                f"unknown or misplaced guidance method {p!r} in {method!r}; "
                f"names: {sorted(BUILDERS)}, modifiers (last): {sorted(MODIFIERS)}"
            )
    guider = bases[0] if len(bases) == 1 else compose(*bases)
    for m in mods:
        guider = MODIFIERS[m](guider, **settings.get(m, {}))
    return guider.replace(name=method)
