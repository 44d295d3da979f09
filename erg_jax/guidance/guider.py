"""The guider: a guidance method as data, and what it does at each sampling step.

A ``Guider`` is one strong branch D_s = D(x, c) and terms, each a weak branch and a
weight (docs/METHOD.md):

    D = D_s + sum_j delta_j,     delta_j = (w_j(t) - 1) * (D_s - D_j)

or a term's combination rule's change (``erg_jax.rules``: APG's projection, CFG-Zero*,
TCFG, FDG, MAMBO-G, APG-Mix). Per step it names every branch's condition
(``conditions``, CADS-annealed where enabled) and attention control (``controls``: I-ERG
energy after the kickoff, PAG identity, SEG blur, SLG skips), then ``combine``s the
branches' x0 estimates. SAG's weak branch changes the input instead, from the strong
branch's output: a staged branch, built through ``strong_pass`` and ``staged_inputs``
(``erg_jax.sag``). EMAG-Q's weak branch runs alone on the state the guider carries from
step to step (``erg_jax.emag``). The constructors live in ``erg_jax.guidance``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from erg_jax import emag as EMAG
from erg_jax import sag as SAG
from erg_jax.control import AttentionControl, NAGControl
from erg_jax.energy import Energy, known_one
from erg_jax.guidance.cads import anneal
from erg_jax.rules import APG, ZeroStar, apg_project, per_sample, rule_delta
from erg_jax.schedules import WeightSchedule
from erg_jax.targets import LAYER_FIELDS, Target, unresolved

Array = jax.Array
SLOTS = ("cond", "null", "tempered", "auto")


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
class NAG:
    """Normalized Attention Guidance (Chen et al. 2025) on the strong branch: in the
    chosen layers the image rows of the attention are pushed away from a negative text
    (the "null" condition: the negative prompts), normalised and blended
    (``control.nag_blend``), inside the strong branch's one forward, while the noise level
    is in [t_min, t_max]. alpha None: the model kind's default (``targets.Layout``)."""

    scale: Any = 5.0
    tau: Any = 2.5
    alpha: Any = None
    layers: Any = None
    t_min: Any = 0.0
    t_max: Any = 1.0
    norm: str = struct.field(pytree_node=False, default="l1")


@struct.dataclass
class Term:
    """One guidance difference and its weak branch (see the module docstring).

    Layers are None (every layer), integer indices (padded with -1 freely), or a boolean
    mask over the model's layers (sweep layer choices without recompiling). SAG's weak
    branch is the network on a degraded input (``erg_jax.sag``): ``sag_layer`` is the
    block whose attention map picks the blurred region (None: the middle block; an
    index or one-hot weights, traced), ``sag_sigma`` the blur's width.
    """

    weight: WeightSchedule
    condition: str = struct.field(pytree_node=False, default="null")
    model: int = struct.field(pytree_node=False, default=0)
    energy: Energy | None = None
    energy_layers: Any = None
    kappa: Any = 0.0
    kappa_unit: str = struct.field(pytree_node=False, default="noise")
    energy_steps: int = struct.field(pytree_node=False, default=1)
    tau_c: Any = 1.0  # C-ERG: the text encoder's temperature of the "tempered" condition
    identity_layers: Any = None
    blur_sigma: Any = None
    blur_layers: Any = None
    skip_layers: Any = None
    shuffle_layers: Any = None
    apg: APG | None = None
    rule: Any = None  # an erg_jax.rules rule (ZeroStar, Tangential, ...) or None
    uses_identity: bool = struct.field(pytree_node=False, default=False)
    uses_blur: bool = struct.field(pytree_node=False, default=False)
    uses_skip: bool = struct.field(pytree_node=False, default=False)
    uses_shuffle: bool = struct.field(pytree_node=False, default=False)
    sag_layer: Any = None
    sag_sigma: Any = 1.0
    uses_sag: bool = struct.field(pytree_node=False, default=False)
    emag: Any = None  # an erg_jax.emag.EMAG: EMAG-Q's weak branch, on its carried state
    emag_layers: Any = None  # EMAG's candidate layers
    rescale: Any = None  # this term's own CFG rescale phi (None: the guider's alone)


@struct.dataclass
class Guider:
    """A guidance method: terms sharing one strong branch, CFG rescale phi, CADS, NAG."""

    terms: tuple = ()
    rescale: Any = 0.0
    cads: CADS | None = None
    cache: Cache | None = None
    nag: NAG | None = None
    name: str = struct.field(pytree_node=False, default="none")

    @property
    def models(self) -> tuple[int, ...]:
        """The model index of every branch (strong first)."""
        return (0,) + tuple(term.model for term in self.terms)

    @property
    def num_branches(self) -> int:
        return 1 + len(self.terms)

    @property
    def staged(self) -> tuple[int, ...]:
        """Branches (strong = 0) whose input is built from the strong branch's output
        (SAG's weak branch); the sampler runs them after all others, through
        ``strong_pass`` and ``staged_inputs``."""
        return tuple(i for i, term in enumerate(self.terms, 1) if term.uses_sag)

    def strong_pass(self, den, x, t, cond, control, num_layers: int) -> tuple[Array, Any]:
        """The strong branch's raw output and what the staged branches need from it (SAG:
        its attention map in the chosen layer, ``erg_jax.sag``)."""
        return SAG.strong_pass(self, den, x, t, cond, control, num_layers)

    def staged_inputs(self, x: Array, x0: Array, found: Any, a) -> list[Array]:
        """The input of every staged branch, in ``staged``'s order, from x_t (b, H, W, C),
        the strong x0 estimate, what ``strong_pass`` found and x_t's signal coefficient."""
        return SAG.staged_inputs(self, x, x0, found, a)

    def init_state(self, x: Array, queries: tuple[int, ...] | None = None) -> tuple:
        """Per term: its rule's state, APG's momentum buffer (like x), or None; an EMAG
        term's inside its ``emag.EMAGState`` (queries: (layers, N_img, heads, head_dim))."""
        out = []
        for t in self.terms:
            buf = jnp.zeros_like(x) if t.apg is not None else None
            buf = t.rule.init(x) if t.rule is not None else buf
            out.append(buf if t.emag is None else EMAG.init_state(x, queries, buf))
        return tuple(out)

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
                anneal(c, self.cads, t, keys, step) if s in ("cond", "tempered") else c
                for s, c in zip(slots, out, strict=True)
            ]
        if self.nag is not None:  # the strong branch's own forward holds the negative
            if "null" not in conds or not isinstance(conds["null"], Mapping):
                raise ValueError(
                    f"{self.name}: nag needs the negative prompts' text (the 'null' "
                    f"condition of a text model); got {sorted(conds)}"
                )
            out[0] = dict(out[0], negative=conds["null"])
        return out

    def controls(self, t, num_layers: int, progress=None) -> list:
        """The AttentionControl of every branch (strong first), or None where unused.

        progress: the share of the sampler's steps done before this evaluation, in
        [0, 1]; needed by a kickoff counted in steps (``kappa_unit="steps"``)."""
        feats = [t_ for t_ in self.terms if t_.model == 0]
        use_energy = any(term.energy is not None for term in feats)
        max_steps = max([term.energy_steps for term in feats if term.energy is not None] + [1])
        use = dict(
            energy=use_energy,
            identity=any(term.uses_identity for term in feats),
            blur=any(term.uses_blur for term in feats),
            skip=any(term.uses_skip for term in feats),
            shuffle=any(term.uses_shuffle for term in feats),
        )
        if not any(use.values()) and self.nag is None:
            return [None] * self.num_branches
        # alpha = gamma = 1 known now (not traced): the layers skip the update's passes.
        update = not all(
            known_one(term.energy.alpha) and known_one(term.energy.gamma)
            for term in feats
            if term.energy is not None
        )
        nag = None if self.nag is None else self.nag.norm
        neutral = AttentionControl.neutral(
            num_layers, max_steps=max_steps, energy_update=update, nag=nag, **use
        )
        heads = _head_counts(self, feats)
        shapes = {
            energy_shape(term.energy, num_layers) for term in feats if term.energy is not None
        }
        if heads["energy"]:
            shapes = {(num_layers, heads["energy"])} | {s_ for s_ in shapes if len(s_) == 2}
        if len(shapes) > 1:
            raise ValueError(
                f"the terms' energies need one per-layer/per-head layout, got {shapes}"
            )
        if shapes and neutral.energy is not None:
            shape = shapes.pop()  # (layers,) or (layers, heads): every branch alike
            e = neutral.energy
            grow = lambda f: jnp.broadcast_to(f.reshape(f.shape + (1,) * (len(shape) - 1)), shape)  # noqa: E731
            neutral = neutral.replace(energy=Energy(grow(e.tau), grow(e.alpha), grow(e.gamma)))
        wide = lambda f, h: f if not h else jnp.broadcast_to(f[:, None], (num_layers, h))  # noqa: E731
        if heads["identity"]:
            neutral = neutral.replace(identity=wide(neutral.identity, heads["identity"]))
        if heads["blur"]:
            neutral = neutral.replace(blur=wide(neutral.blur, heads["blur"]))
        if neutral.nag is not None and heads["nag"]:
            neutral = neutral.replace(
                nag=neutral.nag.replace(scale=wide(neutral.nag.scale, heads["nag"]))
            )
        strong = neutral if self.nag is None else _nag_control(self.nag, neutral, t, num_layers)
        out = [strong]
        weak = neutral.replace(nag=None)  # NAG guides the strong branch alone
        for term in self.terms:
            ctl = None
            if term.model == 0 and any(use.values()):
                ctl = _term_control(term, weak, t, num_layers, progress)
            out.append(ctl)
        return out

    def combine(
        self, preds: Sequence[Array], t, state: tuple, *, x=None, a=None, s=None, index=0
    ) -> tuple[Array, tuple]:
        """Guided x0 from the branches' x0 estimates (strong first), and the new state.

        x, a, s (x_t = a x0 + s eps) are needed by rules outside the x0 space; index is the
        sampler's step number (CFG-Zero*'s zero steps, APG-Mix's switch)."""
        strong = preds[0].astype(jnp.float32)
        out, zeroed = strong, None
        new_state = []
        for term, weak, buf in zip(self.terms, preds[1:], state, strict=True):
            held = buf if term.emag is not None else None  # EMAG's state, set by the sampler
            buf = buf if held is None else held.rule
            weak = weak.astype(jnp.float32)
            if term.rule is not None:
                args = (strong, weak, term.weight(t), buf, index, x, a, s)
                delta, buf = rule_delta(term.rule, *args)
            else:
                diff = strong - weak
                if term.apg is not None:
                    diff, buf = apg_project(diff, strong, buf, term.apg)
                delta = (term.weight(t) - 1.0) * diff
            if term.rescale is not None:  # this term's own rescale, on its own sum
                delta = _rescale(strong + delta, strong, term.rescale) - strong
            out = out + delta
            if isinstance(term.rule, ZeroStar):
                zeroed = (term.rule.zeroes(index), strong + delta)
            new_state.append(buf if held is None else held.replace(rule=buf))
        out = _rescale(out, strong, self.rescale)
        if zeroed is not None:  # CFG-Zero*'s zero step: its zero prediction once, not per term
            out = jnp.where(*zeroed, out)
        return out.astype(preds[0].dtype), tuple(new_state)


def _slot(condition: str, conds: Mapping[str, Any]) -> str:
    if condition == "auto":  # ERG: the C-ERG condition when the caller made one
        return "tempered" if "tempered" in conds else "cond"
    return condition


def _mask(layers, num_layers: int) -> Array:
    """(layers,) or, for a head target, (layers, heads) booleans."""
    if isinstance(layers, Target):
        raise ValueError(unresolved(layers))
    if layers is None:
        return jnp.ones((num_layers,), bool)
    layers = jnp.asarray(layers)
    if layers.dtype == jnp.bool_:
        if layers.shape[:1] != (num_layers,) or layers.ndim > 2:
            raise ValueError(
                f"layer mask must have shape ({num_layers},) or ({num_layers}, heads), got "
                f"{layers.shape}"
            )
        return layers
    return jnp.any(jnp.arange(num_layers)[:, None] == layers.reshape(-1)[None, :], axis=1)


def _heads(layers) -> int:
    """The heads of a (layers, heads) target mask; 0 for a per-layer one."""
    if layers is None or isinstance(layers, Target):
        return 0
    shape = jnp.shape(layers)
    return int(shape[1]) if len(shape) == 2 else 0


def _head_counts(guider: Guider, feats) -> dict[str, int]:
    """Per control field, the heads its per-head targets need (0: per layer only)."""
    found: dict[str, set] = {k: set() for k in ("energy", "identity", "blur", "nag")}
    for term in feats:
        if term.energy is not None:
            found["energy"].add(_heads(term.energy_layers))
        if term.uses_identity:
            found["identity"].add(_heads(term.identity_layers))
        if term.uses_blur:
            found["blur"].add(_heads(term.blur_layers))
    if guider.nag is not None:
        found["nag"].add(_heads(guider.nag.layers))
    out = {}
    for key, values in found.items():
        values.discard(0)
        if len(values) > 1:
            raise ValueError(f"{guider.name}: {key} targets disagree on the heads: {values}")
        out[key] = values.pop() if values else 0
    return out


def _nag_control(nag: NAG, neutral: AttentionControl, t, num_layers: int) -> AttentionControl:
    """The strong branch's control with NAG on in its layers, inside its noise window."""
    if nag.alpha is None:
        raise ValueError(
            "nag alpha is left to the model kind: resolve the guider on the model's layout "
            "(guidance.resolve_targets) or give nag alpha"
        )
    one = neutral.nag.scale
    on = _mask(nag.layers, num_layers) & (t >= nag.t_min) & (t <= nag.t_max)
    on = on if on.ndim == one.ndim else on[:, None]
    scale = jnp.where(on, jnp.asarray(nag.scale, jnp.float32), one)
    full = lambda v: jnp.full((num_layers,), v, jnp.float32)  # noqa: E731
    return neutral.replace(nag=NAGControl(scale, full(nag.tau), full(nag.alpha), nag.norm))


def energy_shape(energy: Energy, num_layers: int) -> tuple[int, ...]:
    """(layers,) or (layers, heads): the control layout an Energy's fields need.

    Each field is a scalar, per layer (num_layers,), per head (heads,) or
    (num_layers, heads); a 1-D field as long as the model is deep counts per layer.
    """
    heads = set()
    for name in ("tau", "alpha", "gamma"):
        shape = jnp.shape(getattr(energy, name))
        if len(shape) == 0 or shape == (num_layers,):
            continue
        if len(shape) == 1 or (len(shape) == 2 and shape[0] == num_layers):
            heads.add(shape[-1])
            continue
        raise ValueError(
            f"energy {name} must be a scalar, per layer ({num_layers},), per head (heads,) "
            f"or ({num_layers}, heads); got shape {shape}"
        )
    if len(heads) > 1:
        raise ValueError(f"energy fields disagree on the number of heads: {sorted(heads)}")
    return (num_layers, heads.pop()) if heads else (num_layers,)


def check_layers(guider: Guider, num_layers: int) -> None:
    """Refuses layer indices at or past the model's depth (concrete values only: a
    guider traced inside a jit is checked where it was built)."""
    targets = [(term, name, getattr(term, name)) for term in guider.terms for name in LAYER_FIELDS]
    if guider.nag is not None:
        targets.append((None, "nag layers", guider.nag.layers))
    for term, name, layers in targets:
        if isinstance(layers, Target):
            raise ValueError(unresolved(layers))
        if layers is None or isinstance(layers, jax.core.Tracer):
            continue
        layers = np.asarray(layers)
        if layers.dtype != np.bool_ and layers.size and int(layers.max()) >= num_layers:
            raise ValueError(
                f"{guider.name}: layer {int(layers.max())} in {name} is past the model's "
                f"depth; it has {num_layers} attention layers (0..{num_layers - 1})"
            )
        if layers.ndim == 2 and name == "skip_layers":
            raise ValueError(f"{guider.name}: slg skips whole blocks; it takes no heads")
        if layers.ndim == 2 and name == "energy_layers" and term.energy_steps > 1:
            raise ValueError(
                f"{guider.name}: erg steps > 1 re-attend a whole layer; give heads only with "
                "steps 1"
            )
    for term in guider.terms:
        layer = term.sag_layer
        if term.uses_sag and layer is not None and not isinstance(layer, jax.core.Tracer):
            layer = np.asarray(layer)
            if layer.ndim == 0 and not 0 <= int(layer) < num_layers:
                raise ValueError(
                    f"{guider.name}: sag layer {int(layer)} is past the model's depth; it "
                    f"has {num_layers} attention layers (0..{num_layers - 1})"
                )
            if layer.ndim and layer.shape != (num_layers,):
                raise ValueError(
                    f"{guider.name}: sag layer weights must have shape ({num_layers},), "
                    f"got {layer.shape}"
                )


def check_denoisers(guider: Guider, denoisers: Sequence) -> None:
    """Refuses denoisers (and guider settings) a staged or stateful branch cannot run with."""
    SAG.check_sag(guider, denoisers)
    EMAG.check(guider, denoisers)


def _kicked_off(term: Term, t, progress):
    if term.kappa_unit == "steps":
        if progress is None:
            raise ValueError("a kickoff counted in steps needs the sampler's progress")
        return progress >= term.kappa
    return t <= 1.0 - term.kappa


def _term_control(term: Term, neutral: AttentionControl, t, num_layers: int, progress=None):
    ctl = neutral
    if term.energy is not None:
        on = _mask(term.energy_layers, num_layers) & _kicked_off(term, t, progress)
        on = on.reshape(on.shape + (1,) * (neutral.energy.tau.ndim - on.ndim))

        def pick(value, one):
            value = jnp.asarray(value, jnp.float32)
            if value.shape == (num_layers,):
                value = value.reshape(value.shape + (1,) * (one.ndim - 1))
            return jnp.where(on, jnp.broadcast_to(value, one.shape), one)

        e = neutral.energy
        energy = Energy(
            pick(term.energy.tau, e.tau),
            pick(term.energy.alpha, e.alpha),
            pick(term.energy.gamma, e.gamma),
        )
        on_layer = jnp.any(on.reshape(num_layers, -1), axis=1)
        steps = None if ctl.steps is None else jnp.where(on_layer, term.energy_steps, 1)
        ctl = ctl.replace(
            energy=energy, steps=steps.astype(jnp.int32) if steps is not None else None
        )

    def like(mask, field):  # a per-layer mask on a per-head field: every head
        return jnp.broadcast_to(mask[:, None], field.shape) if field.ndim > mask.ndim else mask

    if term.uses_identity:
        on = like(_mask(term.identity_layers, num_layers), neutral.identity)
        ctl = ctl.replace(identity=on.astype(jnp.float32))
    if term.uses_blur:
        sigma = jnp.asarray(term.blur_sigma, jnp.float32)
        on = like(_mask(term.blur_layers, num_layers), neutral.blur)
        ctl = ctl.replace(blur=jnp.where(on, sigma, 0.0))
    if term.uses_skip:
        ctl = ctl.replace(skip=_mask(term.skip_layers, num_layers).astype(jnp.float32))
    if term.uses_shuffle:
        ctl = ctl.replace(
            shuffle=jnp.where(_mask(term.shuffle_layers, num_layers), _seeds(t, num_layers), 0)
        )
    return ctl


def _seeds(t, num_layers: int) -> Array:
    """TPG's permutation seeds, (layers,) int32, never 0: a fresh permutation for every
    noise level and layer, the same for every sample and every batch."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(t, jnp.float32), jnp.uint32)
    layer = jnp.arange(1, num_layers + 1, dtype=jnp.uint32)
    mixed = bits * jnp.uint32(2654435761) ^ layer * jnp.uint32(40503)
    return ((mixed >> 1) | jnp.uint32(1)).astype(jnp.int32)


def _rescale(out, strong, phi):
    """CFG rescale: move the guided prediction's std toward the strong one's by phi."""
    std_out = jnp.sqrt(per_sample(jnp.var, out))
    std_strong = jnp.sqrt(per_sample(jnp.var, strong))
    rescaled = out * std_strong / jnp.maximum(std_out, 1e-12)
    return jnp.where(phi > 0, phi * rescaled + (1.0 - phi) * out, out)


def with_low_noise_weight(guider: Guider, switch: Any, low: Any) -> Guider:
    """The guider with every term's weight ``low`` below the noise level ``switch`` (two
    experts, each with its own guidance weight: Wan 2.2's guidance_scale_2)."""
    terms = tuple(t.replace(weight=t.weight.replace(low=low, switch=switch)) for t in guider.terms)
    return guider.replace(terms=terms)
