"""Guiders: which branches a sampling step evaluates, and how their predictions combine.

Every method is a sum of differences against one strong branch D_s = D(x, c) (docs/METHOD.md):

    D = D_s + sum_j (w_j(t) - 1) * P_j(D_s - D_j)

where D_j is term j's weak branch and P_j is the identity, or APG's adaptive projection
(Sadat et al. 2025). With one term this is ``D_j + w (D_s - D_j)``; w = 1 is no guidance.
A term's weak branch is a condition slot ("null", "cond" or the C-ERG "tempered" one),
a model (0, or 1 for AutoGuidance's weaker parameters) and attention perturbations:

- CFG: the null condition.        - ERG: the tempered condition and/or I-ERG energy
- PAG: identity attention.           in chosen layers after the kickoff kappa.
- SEG: query blur (sigma).        - SLG: skipped layers.   - AutoGuidance: model 1.

Predictions are combined as x0 estimates; CFG rescale (phi, Lin et al. 2024), CADS
(Sadat et al. 2024) and weak-branch caching (``cache``) act on the whole guider. Every
number is traced data, so a sweep of weights, temperatures or kickoffs compiles once;
what is static is the structure (how many terms, which perturbations, the energy's step
count).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from erg_jax.control import AttentionControl
from erg_jax.energy import Energy, check_energy, check_positive, known_one
from erg_jax.schedules import WeightSchedule, check_range, schedule

Array = jax.Array
SLOTS = ("cond", "null", "tempered", "auto")


@struct.dataclass
class APG:
    """Adaptive projected guidance settings (Sadat et al. 2025, Alg. 1).

    momentum: beta of the running average of the difference (negative values damp it,
      the paper's choice is -0.5; 0 = off). norm_threshold: r, the cap on the
      difference's norm per sample (inf = off). eta: weight of the component parallel
      to the strong prediction (0 drops it, as the paper recommends; 1 keeps it).
    """

    momentum: Any = 0.0
    norm_threshold: Any = math.inf
    eta: Any = 0.0


@struct.dataclass
class CADS:
    """Condition-annealed sampling (Sadat et al. 2024, eq. 2-3).

    c_hat = sqrt(g(t)) c + s sqrt(1 - g(t)) n, with g = 1 for t <= tau1, 0 for t >= tau2,
    linear between; then c_hat is moved back to c's mean and std with weight psi.
    """

    tau1: Any = 0.6
    tau2: Any = 0.9
    noise_scale: Any = 0.25
    psi: Any = 1.0


@struct.dataclass
class Cache:
    """Weak-branch reuse: inside the noise-level window [t_min, t_max] the weak branches
    run at the window's first evaluation and every ``every``-th after it; in between the
    step reuses their last difference to the strong x0 estimate. Outside it, every step."""

    every: Any = 1
    t_min: Any = 0.0
    t_max: Any = 1.0


@struct.dataclass
class Term:
    """One guidance difference and its weak branch (see the module docstring).

    Layers are None (every layer), integer indices (padded with -1 freely), or a boolean
    mask over the model's layers (sweep layer choices without recompiling).
    """

    weight: WeightSchedule
    condition: str = struct.field(pytree_node=False, default="null")
    model: int = struct.field(pytree_node=False, default=0)
    energy: Energy | None = None
    energy_layers: Any = None
    kappa: Any = 0.0
    energy_steps: int = struct.field(pytree_node=False, default=1)
    identity_layers: Any = None
    blur_sigma: Any = None
    blur_layers: Any = None
    skip_layers: Any = None
    apg: APG | None = None
    uses_identity: bool = struct.field(pytree_node=False, default=False)
    uses_blur: bool = struct.field(pytree_node=False, default=False)
    uses_skip: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class Guider:
    """A guidance method: terms sharing one strong branch, CFG rescale phi, CADS."""

    terms: tuple = ()
    rescale: Any = 0.0
    cads: CADS | None = None
    cache: Cache | None = None
    name: str = struct.field(pytree_node=False, default="none")

    @property
    def models(self) -> tuple[int, ...]:
        """The model index of every branch (strong first)."""
        return (0,) + tuple(term.model for term in self.terms)

    @property
    def num_branches(self) -> int:
        return 1 + len(self.terms)

    def init_state(self, x: Array) -> tuple:
        """APG momentum buffers (one per APG term, like x), carried by the sampler."""
        return tuple(jnp.zeros_like(x) if t.apg is not None else None for t in self.terms)

    def conditions(self, conds: Mapping[str, Any], t, keys=None, step=0) -> list:
        """The condition of every branch (strong first), CADS-annealed where enabled."""
        slots = ["cond"] + [_slot(term.condition, conds) for term in self.terms]
        for slot in slots:
            if slot not in conds:
                raise ValueError(f"{self.name} needs the '{slot}' condition; got {sorted(conds)}")
        out = [conds[s] for s in slots]
        if self.cads is not None:
            if keys is None:
                raise ValueError("CADS needs per-sample keys")
            out = [
                _cads(c, self.cads, t, keys, step) if s in ("cond", "tempered") else c
                for s, c in zip(slots, out, strict=True)
            ]
        return out

    def controls(self, t, num_layers: int) -> list:
        """The AttentionControl of every branch (strong first), or None where unused."""
        feats = [t_ for t_ in self.terms if t_.model == 0]
        use_energy = any(term.energy is not None for term in feats)
        max_steps = max([term.energy_steps for term in feats if term.energy is not None] + [1])
        use = dict(
            energy=use_energy,
            identity=any(term.uses_identity for term in feats),
            blur=any(term.uses_blur for term in feats),
            skip=any(term.uses_skip for term in feats),
        )
        if not any(use.values()):
            return [None] * self.num_branches
        # alpha = gamma = 1 known now (not traced): the layers skip the update's passes.
        update = not all(
            known_one(term.energy.alpha) and known_one(term.energy.gamma)
            for term in feats
            if term.energy is not None
        )
        neutral = AttentionControl.neutral(
            num_layers, max_steps=max_steps, energy_update=update, **use
        )
        out = [neutral]
        for term in self.terms:
            out.append(_term_control(term, neutral, t, num_layers) if term.model == 0 else None)
        return out

    def combine(self, preds: Sequence[Array], t, state: tuple) -> tuple[Array, tuple]:
        """Guided x0 from the branches' x0 estimates (strong first), and the new state."""
        strong = preds[0].astype(jnp.float32)
        out = strong
        new_state = []
        for term, weak, buf in zip(self.terms, preds[1:], state, strict=True):
            diff = strong - weak.astype(jnp.float32)
            if term.apg is not None:
                diff, buf = _apg(diff, strong, buf, term.apg)
            out = out + (term.weight(t) - 1.0) * diff
            new_state.append(buf)
        out = _rescale(out, strong, self.rescale)
        return out.astype(preds[0].dtype), tuple(new_state)


def _slot(condition: str, conds: Mapping[str, Any]) -> str:
    if condition == "auto":  # ERG: the C-ERG condition when the caller made one
        return "tempered" if "tempered" in conds else "cond"
    return condition


def _mask(layers, num_layers: int) -> Array:
    if layers is None:
        return jnp.ones((num_layers,), bool)
    layers = jnp.asarray(layers)
    if layers.dtype == jnp.bool_:
        if layers.shape != (num_layers,):
            raise ValueError(f"layer mask must have shape ({num_layers},), got {layers.shape}")
        return layers
    return jnp.any(jnp.arange(num_layers)[:, None] == layers.reshape(-1)[None, :], axis=1)


def _term_control(term: Term, neutral: AttentionControl, t, num_layers: int):
    ctl = neutral
    if term.energy is not None:
        on = _mask(term.energy_layers, num_layers) & (t <= 1.0 - term.kappa)

        def pick(value, one):
            value = jnp.broadcast_to(jnp.asarray(value, jnp.float32), one.shape)
            return jnp.where(on, value, one)

        e = neutral.energy
        energy = Energy(
            pick(term.energy.tau, e.tau),
            pick(term.energy.alpha, e.alpha),
            pick(term.energy.gamma, e.gamma),
        )
        steps = None if ctl.steps is None else jnp.where(on, term.energy_steps, 1)
        ctl = ctl.replace(
            energy=energy, steps=steps.astype(jnp.int32) if steps is not None else None
        )
    if term.uses_identity:
        ctl = ctl.replace(identity=_mask(term.identity_layers, num_layers).astype(jnp.float32))
    if term.uses_blur:
        sigma = jnp.asarray(term.blur_sigma, jnp.float32)
        ctl = ctl.replace(blur=jnp.where(_mask(term.blur_layers, num_layers), sigma, 0.0))
    if term.uses_skip:
        ctl = ctl.replace(skip=_mask(term.skip_layers, num_layers).astype(jnp.float32))
    return ctl


def _per_sample(fn, x):
    axes = tuple(range(1, x.ndim))
    return fn(x, axis=axes, keepdims=True)


def _apg(diff, strong, buf, apg: APG):
    """Momentum, norm cap and parallel/orthogonal split of the difference (x0 space)."""
    diff = diff + apg.momentum * buf
    buf = diff
    norm = jnp.sqrt(_per_sample(jnp.sum, jnp.square(diff)))
    diff = diff * jnp.minimum(1.0, apg.norm_threshold / jnp.maximum(norm, 1e-12))
    unit = strong / jnp.maximum(jnp.sqrt(_per_sample(jnp.sum, jnp.square(strong))), 1e-12)
    parallel = _per_sample(jnp.sum, diff * unit) * unit
    return (diff - parallel) + apg.eta * parallel, buf


def _rescale(out, strong, phi):
    """CFG rescale: move the guided prediction's std toward the strong one's by phi."""
    std_out = jnp.sqrt(_per_sample(jnp.var, out))
    std_strong = jnp.sqrt(_per_sample(jnp.var, strong))
    rescaled = out * std_strong / jnp.maximum(std_out, 1e-12)
    return jnp.where(phi > 0, phi * rescaled + (1.0 - phi) * out, out)


def _cads(cond, cads: CADS, t, keys, step):
    """CADS on every floating leaf of a condition (b, ...), noise from each sample's key."""
    g = jnp.clip((cads.tau2 - t) / jnp.maximum(cads.tau2 - cads.tau1, 1e-12), 0.0, 1.0)
    g = jnp.where(t <= cads.tau1, 1.0, jnp.where(t >= cads.tau2, 0.0, g))
    leaves, treedef = jax.tree_util.tree_flatten(cond)
    if not any(jnp.issubdtype(jnp.asarray(c).dtype, jnp.floating) for c in leaves):
        raise ValueError("CADS anneals condition embeddings: pass float conditions, not labels")
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    out = []
    for i, c in enumerate(leaves):
        c = jnp.asarray(c)
        if not jnp.issubdtype(c.dtype, jnp.floating):
            out.append(c)
            continue
        noise = jax.vmap(
            lambda k, ci, i=i: jax.random.normal(jax.random.fold_in(k, i), ci.shape, ci.dtype)
        )(step_keys, c)
        hat = jnp.sqrt(g) * c + cads.noise_scale * jnp.sqrt(1.0 - g) * noise
        mean_c, std_c = _per_sample(jnp.mean, c), jnp.sqrt(_per_sample(jnp.var, c))
        mean_h, std_h = _per_sample(jnp.mean, hat), jnp.sqrt(_per_sample(jnp.var, hat))
        moved = (hat - mean_h) / jnp.maximum(std_h, 1e-12) * std_c + mean_c
        hat = cads.psi * moved + (1.0 - cads.psi) * hat
        out.append(jnp.where(g >= 1.0, c, hat).astype(c.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


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
    settings = _apg_settings(momentum, norm_threshold, eta)
    return Guider((Term(schedule(scale, shape, interval), "null", apg=settings),), name="apg")


def _apg_settings(momentum, norm_threshold, eta) -> APG:
    check_range(momentum, "apg momentum", -1.0, 1.0, lo_open=True, hi_open=True)
    check_positive(norm_threshold if norm_threshold != math.inf else 1.0, "apg norm_threshold")
    return APG(momentum, norm_threshold, eta)


def erg(
    scale=3.0,
    *,
    energy: Energy | None = Energy(tau=0.5),
    layers=None,
    kappa=0.0,
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
      kappa: kickoff; I-ERG is on while t <= 1 - kappa.
      steps: energy updates K in those layers (static).
      condition: the weak branch's condition slot: "tempered" (C-ERG), "cond"
        (class-conditional or I-ERG only), "null", or "auto" (tempered when given).
    """
    if condition not in SLOTS:
        raise ValueError(f"condition must be one of {SLOTS}, got {condition!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    check_range(kappa, "kappa", 0.0, 1.0)
    if energy is not None:
        check_energy(energy)
    term = Term(
        schedule(scale, shape, interval),
        condition,
        energy=energy,
        energy_layers=_layers(layers, "layers"),
        kappa=kappa,
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


def autoguidance(scale=2.0, *, shape="constant", interval=(0.0, 1.0)) -> Guider:
    """AutoGuidance (Karras et al. 2024): the weak branch is model 1, a weaker network."""
    return Guider((Term(schedule(scale, shape, interval), "cond", model=1),), name="autoguidance")


def with_apg(guider: Guider, *, momentum=0.0, norm_threshold=math.inf, eta=0.0) -> Guider:
    """Every term's difference through APG's projection (for example ERG + APG)."""
    settings = _apg_settings(momentum, norm_threshold, eta)
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


def cache(guider: Guider, *, every=2, window=(0.0, 1.0)) -> Guider:
    """The guider with its weak branches evaluated only every ``every``-th step inside
    the noise-level ``window``, their x0 difference to the strong branch reused between.

    Each skipped step costs the strong branch alone; ``every=1`` is the guider itself.
    ``every`` and the window are traced, so a sweep over them compiles once. The sampler
    carries the cached differences (``samplers.sample``).
    """
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
    "autoguidance": autoguidance,
}
MODIFIERS = {"apg": with_apg, "cads": with_cads}


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
