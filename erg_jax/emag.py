"""EMAG-Q: exponential moving average guidance on the queries (Yadav, Ta, Liu 2025,
arXiv 2512.17303, "Exponential Moving Average Guidance"; the authors' SD3 code,
``emag_forward`` / ``EMAGAttnProcessor2_0`` with ``use_q_ema=True``, their quickstart
default, README section 3.4).

The weak branch is the model with, in ONE selected candidate layer l*, the image queries
replaced by an exponential moving average over the sampling steps of that layer's own
image queries. Per candidate layer l and sample, in the weak forward only:

    accumulating (t in ``accumulate``):
      delta_l = mean |E_l - q_l|            before the update; 0 at the first one
      E_l    := beta E_l + (1 - beta) q_l   E_l := q_l at the first accumulating step
    applying (t in ``apply``), in l* only:
      q_l*   := strength E_l* + (1 - strength) q_l*     with the updated E_l*

q is a layer's image queries after its QK norm (before any rotary; the DiT has no QK
norm: its raw q); text queries are never touched, later layers see the perturbed hidden
states. l* = argmax over the candidates of the delta carried from the previous step
(first wins ties), one layer per sample. The guided prediction is the term's
D = D_s + (w - 1)(D_s - D_emag) (the authors' Eq. 14 with w = w_e); outside ``apply`` the
term adds nothing (its weak output is the strong one) and, outside both windows, the
weak forward is not run.

Deviations from the authors' code, and why:
- Selection per sample: they average delta over the whole batch ([uncond; cond]), so
  one sample's perturbed layer depends on the others in its batch. Here delta is
  (layers, b) and l* is chosen per sample, so a sample's image never depends on its batch.
- The EMA sees the conditional weak forward only (the weak branch's condition is "cond");
  theirs runs on [uncond; cond] and keeps an EMA per half.
- Windows are noise levels t in [0, 1] (1 = noise): their 250-index windows 50..250
  (accumulate) and 50..200 (apply) become (0.2, 1.0) and (0.2, 0.8).
- Under Heun the corrector's weak forward updates the EMA too (theirs: Euler, DDPM).

Only EMAG-Q is built. Full EMAG (an EMA of the attention maps) would keep, per sample,
layers x heads x N x (N + L) values (SD3-Medium at 1024^2, one layer: 0.87 GB in fp16).
The EMA of the queries is (layers, b, N_img, heads, head_dim) float32, all layers held
and only the candidates' rows used: SD3-Medium at 1024^2 (24 layers, 4096 tokens, 1536
channels) 0.60 GB per sample, DiT-XL/2 at 256^2 (28, 256, 1152) 33 MB per sample.

A model takes part through ``emag_queries`` in its attention, a ``with_emag`` and a
``query_shape`` on its denoiser (DiT, MMDiT). The state lives in the guider's per-term
state (``EMAGState``), which the sampler carries through its scan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from erg_jax.control import AttentionControl
from erg_jax.schedules import check_range

Array = jax.Array


@struct.dataclass
class EMAG:
    """A term's EMAG settings (traced): beta, strength, and the noise-level windows
    accumulate = (lo, hi) where the EMA is updated and apply = (lo, hi) where it replaces
    the selected layer's image queries."""

    beta: Any = 0.988
    strength: Any = 1.0
    accumulate: Any = (0.2, 1.0)
    apply: Any = (0.2, 0.8)


@struct.dataclass
class EMAGState:
    """What an EMAG term carries from one weak forward to the next. Legend:
    ema (layers, b, N_img, heads, head_dim) float32 the EMA E of every layer's image
    queries (only candidates' rows are used); delta (layers, b) float32 each layer's
    mean |E - q| of the last accumulating forward; started (layers,) bool whether a
    layer's E holds queries yet; rule the term's rule or APG state (None without)."""

    ema: Any
    delta: Any
    started: Any
    rule: Any = None


@struct.dataclass
class EMAGControl:
    """EMAG-Q in every layer of one forward (AttentionControl.emag; one row per layer
    after indexing, every leaf with a leading layer axis).

    Attributes:
      ema: (layers, b, N_img, heads, head_dim) float32, E before this forward.
      started: (layers,) bool, E holds queries (else the first update sets E := q).
      accumulate: (layers,) bool, the layer updates its E (a candidate, t in the window).
      apply: (layers, b) bool, the layer's image queries become E (the selected layer
        of each sample, t in the apply window).
      beta, strength: (layers,) float32.
    """

    ema: Any
    started: Any
    accumulate: Any
    apply: Any
    beta: Any
    strength: Any


def settings(beta, strength, accumulate, apply) -> EMAG:
    """Checked EMAG settings; each error names the field."""
    check_range(beta, "emag beta", 0.0, 1.0)
    check_range(strength, "emag strength", 0.0, 1.0)
    windows = []
    for name, window in (("accumulate", accumulate), ("apply", apply)):
        if isinstance(window, str) or not hasattr(window, "__len__") or len(window) != 2:
            raise ValueError(
                f"emag {name} must be a window (lo, hi) of noise levels, got {window!r}"
            )
        lo, hi = tuple(window)
        check_range(lo, f"emag {name}[0]", 0.0, 1.0)
        check_range(hi, f"emag {name}[1]", 0.0, 1.0)
        if not isinstance(lo, jax.core.Tracer) and float(lo) > float(hi):
            raise ValueError(f"emag {name} must have {name}[0] <= {name}[1], got {window!r}")
        windows.append((lo, hi))
    return EMAG(beta, strength, *windows)


def update_queries(q: Array, control: AttentionControl | None) -> tuple[Array, Any]:
    """One layer's EMAG-Q (module docstring) on its image queries.

    Args:
      q: (b, N_img, heads, head_dim) image queries (after the QK norm).
      control: this layer's control (``AttentionControl.layer(i)``) or None.

    Returns:
      The queries the attention uses, and (E_new (b, N, h, d) float32, delta (b,)
      float32), or None where the control has no emag (then q is returned as it is).
    """
    if control is None or control.emag is None:
        return q, None
    e = control.emag
    q32, ema = q.astype(jnp.float32), jnp.asarray(e.ema, jnp.float32)
    delta = jnp.where(e.accumulate & e.started, jnp.mean(jnp.abs(ema - q32), axis=(1, 2, 3)), 0.0)
    moved = jnp.where(e.started, e.beta * ema + (1.0 - e.beta) * q32, q32)
    ema = jnp.where(e.accumulate, moved, ema)
    mixed = (e.strength * ema + (1.0 - e.strength) * q32).astype(q.dtype)
    return jnp.where(jnp.reshape(e.apply, (-1, 1, 1, 1)), mixed, q), (ema, delta)


def emag_queries(module, q: Array, control: AttentionControl | None) -> Array:
    """``update_queries`` in a Flax layer: its (E_new, delta) sown as the module's
    "intermediates"/"emag" (kept under ``mutable=["intermediates"]``; under ``nn.scan``
    that collection needs a layer axis). Returns the queries the attention uses."""
    q, found = update_queries(q, control)
    if found is not None:
        module.sow("intermediates", "emag", found)
    return q


def sown_state(intermediates: Any) -> tuple[Array, Array]:
    """Every layer's sown (E_new, delta) in layer order: (layers, b, N, h, d), (layers, b).

    Args:
      intermediates: the "intermediates" collection a model's apply returned. Its
        top-level entries are runs of layers named after their first layer, as the DiT
        and the MMDiT name their blocks ("blocks_3", "blocks_0_to_12"; "blocks" is a
        scan from layer 0); a scanned run holds its entries with a leading layer axis.
    """
    found = []

    def visit(tree, first):
        for key, value in tree.items():
            if key == "emag":
                ema, delta = value[0]
                stacked = ema.ndim == 5  # a scanned run: (n, b, N, h, d)
                found.append((first, (ema, delta) if stacked else (ema[None], delta[None])))
            elif isinstance(value, Mapping):
                visit(value, first)

    for key, value in intermediates.items():
        index = re.match(r"[A-Za-z_]*?_?(\d+)", key)
        visit(value, int(index.group(1)) if index else 0)
    if not found:
        raise ValueError("no EMA of the queries was sown: the control's emag is unset")
    parts = [part for _, part in sorted(found, key=lambda f: f[0])]
    ema, delta = (jnp.concatenate(p) for p in zip(*parts, strict=True))
    return ema, delta


def candidates(layers, num_layers: int) -> Array:
    """(layers,) bool: the candidate layers (None: every layer; ids, -1 padding; a mask)."""
    if layers is None:
        return jnp.ones((num_layers,), bool)
    layers = jnp.asarray(layers)
    if layers.dtype == jnp.bool_:
        if layers.shape != (num_layers,):
            raise ValueError(
                f"emag layers: a mask must have shape ({num_layers},) (no heads), got "
                f"{layers.shape}"
            )
        return layers
    return jnp.any(jnp.arange(num_layers)[:, None] == layers.reshape(-1)[None, :], axis=1)


def control(term, state: EMAGState, t, num_layers: int) -> EMAGControl:
    """The EMAG control of a term's weak forward at noise level t, from its state."""
    s = term.emag
    cand = candidates(term.emag_layers, num_layers)
    inside = lambda w: (t >= w[0]) & (t <= w[1])  # noqa: E731
    acc = cand & inside(s.accumulate)
    # each sample's layer: the largest delta of the previous forward (first wins ties)
    chosen = jnp.argmax(jnp.where(cand[:, None], state.delta, -jnp.inf), axis=0)
    one_hot = jnp.arange(num_layers)[:, None] == chosen[None, :]
    ready = cand & (state.started | acc)  # E holds queries once this forward has run
    apply = one_hot & ready[:, None] & inside(s.apply)
    full = lambda v: jnp.full((num_layers,), v, jnp.float32)  # noqa: E731
    return EMAGControl(state.ema, state.started, acc, apply, full(s.beta), full(s.strength))


def init_state(x: Array, queries: tuple[int, ...] | None, rule: Any = None) -> EMAGState:
    """An EMAG term's state before the first step, for x (b, ...).

    Args:
      queries: (layers, N_img, heads, head_dim) of the denoiser (``query_shape``).
      rule: the term's rule or APG state, held alongside.
    """
    if queries is None:
        raise ValueError(
            "emag keeps the image queries across steps: the guider's state needs their "
            "shape, initial_carry(guider, x, denoiser) (the denoiser's query_shape)"
        )
    layers, b = queries[0], x.shape[0]
    return EMAGState(
        jnp.zeros((layers, b) + tuple(queries[1:]), jnp.float32),
        jnp.zeros((layers, b), jnp.float32),
        jnp.zeros((layers,), bool),
        rule,
    )


def query_shape(guider, denoiser, x: Array) -> tuple[int, ...] | None:
    """(layers, N_img, heads, head_dim) for a guider with EMAG terms, else None."""
    if not any(t.emag is not None for t in guider.terms):
        return None
    den = denoiser[0] if isinstance(denoiser, list | tuple) else denoiser
    if den is None or not hasattr(den, "query_shape"):
        raise ValueError(
            f"{guider.name}: emag needs the denoiser's query shape (its query_shape(x)): "
            f"initial_carry(guider, x, denoiser); got {type(den).__name__}"
        )
    return (int(den.num_layers),) + tuple(int(n) for n in den.query_shape(x))


def stateful(guider) -> tuple[int, ...]:
    """Branches (strong = 0) that run alone on the guider's state: EMAG's weak ones."""
    return tuple(i for i, term in enumerate(guider.terms, 1) if term.emag is not None)


def weak_passes(guider, denoisers, x, native, conds, controls, raw, state, t, num_layers):
    """Runs every EMAG weak branch alone through the denoiser's ``with_emag``.

    Args:
      denoisers, x, native: as the sampler's ``evaluate``; conds, controls: every
        branch's (strong first); raw: the branches' outputs so far (raw[0] the strong
        one); state: the guider's per-term state; t: the noise level.

    Returns:
      raw with the EMAG branches' outputs (the strong one's outside the apply window),
      and the state with their new EMAGStates.
    """
    raw, state = list(raw), list(state)
    for i in stateful(guider):
        term, held = guider.terms[i - 1], state[i - 1]
        emag = control(term, held, t, num_layers)
        ctl = AttentionControl() if controls[i] is None else controls[i]
        ctl = ctl.replace(emag=emag)
        den = denoisers[term.model]

        def run(ctl, den=den, i=i):
            out, found = den.with_emag(x, native, conds[i], ctl)
            return out.astype(raw[0].dtype), found

        def skip(ctl):
            return raw[0], (ctl.emag.ema, jnp.zeros(ctl.emag.apply.shape, jnp.float32))

        busy = jnp.any(emag.accumulate) | jnp.any(emag.apply)
        out, (ema, delta) = jax.lax.cond(busy, run, skip, ctl)
        applied = (t >= term.emag.apply[0]) & (t <= term.emag.apply[1])
        raw[i] = jnp.where(applied, out, raw[0])  # outside: the term adds nothing, exactly
        acc = emag.accumulate
        state[i - 1] = held.replace(
            ema=ema,
            delta=jnp.where(acc[:, None], delta, held.delta),
            started=held.started | acc,
        )
    return raw, tuple(state)


def check(guider, denoisers) -> None:
    """Refuses what EMAG cannot do: the weak-branch cache (the EMA moves with every weak
    forward), SAG beside it, per-head targets, and a denoiser without ``with_emag``."""
    terms = [t for t in guider.terms if t.emag is not None]
    if not terms:
        return
    if guider.cache is not None:
        raise ValueError(
            f"{guider.name}: emag cannot use the weak-branch cache: its EMA of the queries "
            "moves with every weak forward"
        )
    if any(t.uses_sag for t in guider.terms):
        raise ValueError(
            f"{guider.name}: emag and sag cannot share a guider: each runs a weak branch "
            "alone, SAG's on the strong output, EMAG's on its carried state"
        )
    for term in terms:
        layers = term.emag_layers
        if layers is not None and not isinstance(layers, jax.core.Tracer):
            if np.ndim(layers) == 2:
                raise ValueError(f"{guider.name}: emag perturbs whole layers; it takes no heads")
        den = denoisers[term.model]
        if not hasattr(den, "with_emag"):
            kind = getattr(den, "config", {}).get("kind", type(den).__name__)
            raise ValueError(
                f"{guider.name}: emag needs a denoiser with with_emag(x, t, cond, attention) "
                f"(the DiT and MMDiT have one; FLUX.1 does not); got {kind}"
            )
