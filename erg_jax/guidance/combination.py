"""The combination rules as guiders: each a modifier of any guider ("erg+tcfg": the
rule applied to ERG's difference) and a base method on CFG's null branch ("tcfg").

CFG-Zero* (Fan et al. 2025), TCFG (Kwon et al. 2025), MAMBO-G, FDG (Sadat et al. 2025)
and APG-Mix; the rules themselves are ``erg_jax.rules``.
"""

from __future__ import annotations

import math

from erg_jax import rules as R
from erg_jax.guidance.guider import Guider
from erg_jax.guidance.methods import cfg
from erg_jax.schedules import check_range


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
    apg_scale=10.0,
    cfg_steps=6,
    momentum=-0.5,
    norm_threshold=10.0,
    eta=0.0,
    space: str = "x0",
) -> Guider:
    """APG-Mix on every term: the term's own weight for the first ``cfg_steps`` sampler
    steps (APG's momentum accumulating), then APG at ``apg_scale`` (x0)."""
    check_range(cfg_steps, "apg_mix cfg_steps", 0.0, math.inf)
    apg = R.check_apg(momentum, norm_threshold, eta)
    rule = R.Mix(apg, apg_scale, cfg_steps, R.check_space(space, "apg_mix"))
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
    scale=4.0,
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
    return with_apg_mix(base, apg_scale=apg_scale, cfg_steps=cfg_steps, **mix).replace(
        name="apg_mix"
    )
