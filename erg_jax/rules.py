"""Combination rules: how one guidance term turns its strong and weak predictions into a
change of the guided one (docs/METHOD.md, "Combination rules").

A term adds ``delta`` to the strong x0 estimate D_s. Without a rule that is
``(w - 1) (D_s - D_w)``; with APG's projection (Sadat et al. 2025) the difference is
projected first. The other rules come from the papers below; each works in the space its
paper defines, one of three views of the same prediction at x_t = a x0 + s eps:

    "x0"        the denoised estimate
    "eps"       the noise, eps = (x_t - a x0) / s
    "velocity"  u = eps - x0 (the flow's dx/dt when a = 1 - t, s = t)

Only D_s, D_w go through the conversion; a change delta of the prediction in "eps" is
the x0 change -(s / a) delta, in "velocity" -(s / (a + s)) delta. At a = 0 (pure noise)
every eps estimate equals x_t and says nothing about x0: an eps rule adds nothing there.

- CFG-Zero* (Fan et al. 2025, arXiv 2503.18886; velocity): the weak prediction scaled by
  s* = <D_s, D_w> / |D_w|^2 per sample, and zero velocity for the first ``zero_steps``
  (the guided prediction's, once, however many terms carry the rule).
- TCFG (Kwon et al. 2025, arXiv 2503.18137; eps): the weak prediction projected onto the
  first right singular vector of the (2, n) matrix [D_s; D_w] of each sample.
- FDG (Sadat et al. 2025, arXiv 2506.19713; x0): the difference split into Laplacian
  pyramid bands (5-tap binomial blur, reflected borders, bilinear halving), each band with
  its own weight and weight of its component parallel to D_s's band.
- MAMBO-G (arXiv 2508.03442; velocity): w becomes 1 + (w - 1) exp(-alpha r) with
  r = |D_s - D_w| / |D_w| per sample.
- APG-Mix (HunyuanImage 2.1; x0): CFG for the first ``cfg_steps`` steps while APG's
  momentum accumulates, then APG with its own weight, only where the term's is on.

Every number is traced (a sweep compiles once); the number of FDG bands and the space are
static. ``index`` is the sampler's step number (0 first).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from erg_jax.schedules import check_range

Array = jax.Array
SPACES = ("x0", "eps", "velocity")


def per_sample(fn, x):
    """``fn`` over every axis but the leading (sample) one, kept for broadcasting."""
    return fn(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def _norm(x):
    return jnp.sqrt(per_sample(jnp.sum, jnp.square(x)))


def project(v, onto):
    """(parallel, orthogonal) parts of v against ``onto``, per sample (leading axis)."""
    unit = onto / jnp.maximum(_norm(onto), 1e-12)
    parallel = per_sample(jnp.sum, v * unit) * unit
    return parallel, v - parallel


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


def apg_project(diff, strong, buf, apg: APG):
    """Momentum, norm cap and parallel / orthogonal split of a difference; (diff, buf)."""
    diff = diff + apg.momentum * buf
    buf = diff
    diff = diff * jnp.minimum(1.0, apg.norm_threshold / jnp.maximum(_norm(diff), 1e-12))
    parallel, orthogonal = project(diff, strong)
    return orthogonal + apg.eta * parallel, buf


def check_apg(momentum, norm_threshold, eta) -> APG:
    check_range(momentum, "apg momentum", -1.0, 1.0, lo_open=True, hi_open=True)
    check_range(norm_threshold, "apg norm_threshold", 0.0, math.inf, lo_open=True)
    return APG(momentum, norm_threshold, eta)


# ---- the rules ---------------------------------------------------------------------


@struct.dataclass
class ZeroStar:
    """CFG-Zero*: optimised weak scale and zero-velocity first steps.

    On a zero step (``zeroes``) the change is -D_s: by itself it takes the strong
    prediction to zero in ``space``. It is the whole guided prediction, not one term's
    share: every term of ``with_zero_star`` carries the rule, so the guider puts
    D_s + this change in place of the sum of the terms' changes (``Guider.combine``).
    """

    zero_steps: Any = 1
    space: str = struct.field(pytree_node=False, default="velocity")

    def init(self, x):
        return None

    def zeroes(self, index):
        return index < self.zero_steps

    def delta(self, strong, weak, w, state, index):
        s_star = per_sample(jnp.sum, strong * weak) / (per_sample(jnp.sum, weak * weak) + 1e-8)
        d = (w - 1.0) * (strong - s_star * weak)
        return jnp.where(self.zeroes(index), -strong, d), state


def tangential_weak(strong, weak):
    """The weak prediction on the first right singular vector of [strong; weak].

    The 2 x 2 Gram matrix M M^T of M = [strong; weak] (flattened) has the same left
    singular vectors; its top eigenvector e gives v = M^T e / |M^T e| without an n-wide SVD.
    """
    b = strong.shape[0]
    m = jnp.stack([strong.reshape(b, -1), weak.reshape(b, -1)], axis=1)  # (b, 2, n)
    gram = jnp.einsum("bin,bjn->bij", m, m, precision="highest")
    _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
    v = jnp.einsum("bi,bin->bn", vecs[..., -1], m, precision="highest")
    v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-30)
    coef = jnp.sum(m[:, 1] * v, axis=-1, keepdims=True)
    return (coef * v).reshape(weak.shape)


@struct.dataclass
class Tangential:
    """TCFG: the weak prediction kept only along the pair's principal direction."""

    space: str = struct.field(pytree_node=False, default="eps")

    def init(self, x):
        return None

    def delta(self, strong, weak, w, state, index):
        return (w - 1.0) * (strong - tangential_weak(strong, weak)), state


@struct.dataclass
class Magnitude:
    """MAMBO-G: the weight shrinks as the difference grows against the weak prediction."""

    alpha: Any = 8.0
    space: str = struct.field(pytree_node=False, default="velocity")

    def init(self, x):
        return None

    def delta(self, strong, weak, w, state, index):
        diff = strong - weak
        ratio = _norm(diff) / jnp.maximum(_norm(weak), 1e-12)
        return (w - 1.0) * jnp.exp(-self.alpha * ratio) * diff, state


_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x):
    """5-tap binomial blur over H and W of (b, H, W, c), borders reflected (not repeated)."""
    k = jnp.asarray(_BINOMIAL, x.dtype) / 16.0
    for axis in (1, 2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (2, 2)
        xp = jnp.pad(x, pad, mode="reflect")
        n = x.shape[axis]
        x = sum(k[i] * jax.lax.slice_in_dim(xp, i, i + n, axis=axis) for i in range(5))
    return x


def _down(x):
    """Blur, then halve H and W by bilinear sampling at pixel centres (a 2 x 2 mean)."""
    x = _blur(x)
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _up(x):
    """Double H and W by bilinear sampling at pixel centres (edges clamped), then blur."""
    for axis in (1, 2):
        n = x.shape[axis]
        prev = jnp.concatenate(
            [
                jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                jax.lax.slice_in_dim(x, 0, n - 1, axis=axis),
            ],
            axis=axis,
        )
        nxt = jnp.concatenate(
            [
                jax.lax.slice_in_dim(x, 1, n, axis=axis),
                jax.lax.slice_in_dim(x, n - 1, n, axis=axis),
            ],
            axis=axis,
        )
        even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
        x = jnp.stack([even, odd], axis=axis + 1)
        shape = list(x.shape[:axis]) + [2 * n] + list(x.shape[axis + 2 :])
        x = x.reshape(shape)
    return _blur(x)


def laplacian_pyramid(x, levels: int) -> list:
    """Bands of (b, H, W, c), finest first; the last is the coarsest Gaussian level.

    H and W must be divisible by 2 ** (levels - 1); ``reconstruct`` inverts it exactly.
    """
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(_down(gauss[-1]))
    return [g - _up(g_next) for g, g_next in zip(gauss, gauss[1:], strict=False)] + [gauss[-1]]


def reconstruct(bands: list):
    """The array whose ``laplacian_pyramid`` is ``bands``."""
    x = bands[-1]
    for band in reversed(bands[:-1]):
        x = _up(x) + band
    return x


@struct.dataclass
class Frequency:
    """FDG: per-band weights (finest band first) and per-band parallel weights.

    A band's change is (scale_l - 1) g(t) (P_par + P_orth) of its difference, with
    g(t) = w(t) - 1 the term's schedule at scale 2 (1 inside the interval for the
    constant shape), so the schedule shapes and windows FDG like every other term.
    """

    scales: Any = (10.0, 5.0)
    parallel: Any = (1.0, 1.0)
    space: str = struct.field(pytree_node=False, default="x0")

    @property
    def levels(self) -> int:
        return len(self.scales)

    def init(self, x):
        return None

    def delta(self, strong, weak, w, state, index):
        if strong.ndim != 4:
            raise ValueError(f"FDG needs (b, H, W, c) predictions, got shape {strong.shape}")
        levels, (h, w_) = self.levels, strong.shape[1:3]
        if h % 2 ** (levels - 1) or w_ % 2 ** (levels - 1):
            raise ValueError(
                f"FDG with {levels} bands needs H and W divisible by {2 ** (levels - 1)}, "
                f"got {h} x {w_}"
            )
        strong_bands = laplacian_pyramid(strong, levels)
        diff_bands = laplacian_pyramid(strong - weak, levels)
        out = []
        for level in range(levels):
            par, orth = project(diff_bands[level], strong_bands[level])
            band = self.parallel[level] * par + orth
            out.append((self.scales[level] - 1.0) * (w - 1.0) * band)
        return reconstruct(out), state


@struct.dataclass
class Mix:
    """APG-Mix: CFG (the term's weight) for ``cfg_steps`` steps, then APG at ``scale``.

    APG runs only while the term's guidance is on, w(t) != 1, as diffusers' APG-Mix runs
    APG only while its CFG is enabled: outside the guidance interval, at a schedule's
    value 1 and at scale 1 the change is 0 and the momentum does not accumulate. The
    weight gates APG, it does not scale it: a shaped schedule (linear, cosine) switches
    APG on wherever w(t) != 1, at the full ``scale``.
    """

    apg: APG = APG(momentum=-0.5, norm_threshold=10.0)
    scale: Any = 10.0
    cfg_steps: Any = 6
    space: str = struct.field(pytree_node=False, default="x0")

    def init(self, x):
        return jnp.zeros_like(x)

    def delta(self, strong, weak, w, buf, index):
        on = w != 1.0
        diff = strong - weak
        projected, new_buf = apg_project(diff, strong, buf, self.apg)
        late = jnp.where(on, (self.scale - 1.0) * projected, 0.0)
        change = jnp.where(index < self.cfg_steps, (w - 1.0) * diff, late)
        return change, jnp.where(on, new_buf, buf)


# ---- spaces ------------------------------------------------------------------------


def to_space(x0, x, a, s, space: str):
    """An x0 estimate at x_t = a x0 + s eps, in ``space``."""
    if space == "x0":
        return x0
    eps = (x - a * x0) / s
    if space == "eps":
        return eps
    if space == "velocity":
        return eps - x0
    raise ValueError(f"rule space must be one of {SPACES}, got {space!r}")


def x0_change(delta, a, s, space: str):
    """The x0 change that goes with a change ``delta`` of the prediction in ``space``."""
    if space == "x0":
        return delta
    if space == "eps":
        return jnp.where(a > 0, -(s / jnp.where(a > 0, a, 1.0)) * delta, 0.0)
    return -(s / (a + s)) * delta


def rule_delta(rule, strong, weak, w, state, index, x=None, a=None, s=None):
    """A rule's x0 change and its new state; strong, weak are x0 estimates."""
    if rule.space != "x0":
        if x is None or a is None or s is None:
            raise ValueError(f"a rule in the {rule.space!r} space needs x, a and s to convert")
        strong, weak = (to_space(p, x, a, s, rule.space) for p in (strong, weak))
    delta, state = rule.delta(strong, weak, w, state, index)
    return x0_change(delta, a, s, rule.space), state


def check_space(space: str, name: str) -> str:
    if space not in SPACES:
        raise ValueError(f"{name} space must be one of {SPACES}, got {space!r}")
    return space
