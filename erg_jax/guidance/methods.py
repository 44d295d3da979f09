"""The guidance methods' constructors: checked settings in, a Guider out.

Each returns an ``erg_jax.guidance.guider.Guider`` whose terms say the method's weak branch (the
formulas are in the package docstring and docs/METHOD.md); every number stays data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax import emag as EMAG
from erg_jax import rules as R
from erg_jax.control import NAG_NORMS
from erg_jax.energy import Energy, check_energy, check_positive
from erg_jax.guidance.guider import CADS, NAG, SLOTS, Cache, Guider, Term
from erg_jax.schedules import check_range, schedule
from erg_jax.targets import Target, is_named


def layer_ids(layers, name):
    """Layer ids or a boolean mask, as the guider takes them: None, "" or "all" (every
    layer), "3,4" (a config string), a sequence or array of ints, or of booleans (a mask
    over the model's layers, or (layers, heads); a Python list of booleans is a mask,
    never ids 0 and 1). Block names and heads ("joint_blocks.0-5", "blocks.12@0-3")
    stay a ``targets.Target`` until the model is known (``erg_jax.targets``)."""
    if layers is None or isinstance(layers, jax.core.Tracer | Target):
        return layers
    if isinstance(layers, str):
        spec = layers.strip()
        if spec in ("", "all"):
            return None
        if is_named(spec):
            return Target(spec, name)
        try:
            layers = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(
                f"{name} must be '' (every layer) or ids like '3,4', got {spec!r}"
            ) from e
    value = np.asarray(layers)
    if value.dtype == np.bool_:
        if value.ndim not in (1, 2) or not value.size:
            raise ValueError(
                f"{name}: a layer mask must be (layers,) or (layers, heads), got {value.shape}"
            )
        return jnp.asarray(value)
    if value.size == 0:
        raise ValueError(f"{name} must name at least one layer, got an empty list")
    if not np.issubdtype(value.dtype, np.integer) and not np.all(value % 1 == 0):
        raise ValueError(f"{name} must hold whole layer indices, got {layers!r}")
    if int(value.min()) < -1:
        raise ValueError(f"{name} must hold layer indices >= 0 (or -1 as padding), got {layers!r}")
    return jnp.asarray(value.reshape(-1), jnp.int32)


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
    tau=0.5,
    alpha=1.0,
    gamma=1.0,
    image_energy: bool = True,
    layers=None,
    kappa=0.0,
    kappa_unit: str = "noise",
    steps: int = 1,
    tau_c=1.0,
    condition: str = "auto",
    energy: Energy | None = None,
    shape="constant",
    interval=(0.0, 1.0),
) -> Guider:
    """Entropy Rectifying Guidance (Berrada Ifriqi et al. 2025).

    Args:
      scale: w; 1 is no guidance.
      tau, alpha, gamma: I-ERG's Energy in the selected denoiser layers.
      image_energy: False turns I-ERG off (C-ERG alone: the weak branch differs only by
        its tempered condition).
      layers: the I-ERG layers (None or "" = all), indices, "3,4" or a boolean mask.
      kappa: kickoff. With ``kappa_unit="noise"`` (the paper's definition) I-ERG is on
        while the noise level t <= 1 - kappa; with "steps", from the step whose share of
        the sampler's steps done is >= kappa (kappa = 0.1 of 50 steps: from step 5).
        A shifted grid (SD3's shift 3) spends more steps at high noise, so the two differ.
      steps: energy updates K in those layers (static).
      tau_c: C-ERG's temperature in the text encoder's layers (1 = no C-ERG). The guider
        records it; whoever encodes the prompts (the Pipeline, the sampling job) makes the
        "tempered" condition at this value.
      condition: the weak branch's condition slot: "tempered" (C-ERG), "cond"
        (class-conditional or I-ERG only), "null", or "auto" (the tempered one when the
        conditions hold it, else "cond").
      energy: an Energy in place of tau, alpha and gamma (per-layer or per-head values).

    Raises:
      ValueError: naming the field, for a bad value, or when nothing is perturbed
        (image_energy False, tau_c 1 and the strong condition: the weak branch would be
        the strong one, guidance at twice the cost that does nothing).
    """
    if condition not in SLOTS:
        raise ValueError(f"erg condition must be one of {SLOTS}, got {condition!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"erg steps must be an integer >= 1, got {steps!r}")
    if not isinstance(image_energy, bool | np.bool_):
        raise ValueError(f"erg image_energy must be True or False, got {image_energy!r}")
    check_range(kappa, "erg kappa", 0.0, 1.0)
    check_positive(tau_c, "erg tau_c")
    if kappa_unit not in ("noise", "steps"):
        raise ValueError(f"erg kappa_unit must be 'noise' or 'steps', got {kappa_unit!r}")
    if energy is None and image_energy:
        energy = Energy(tau=tau, alpha=alpha, gamma=gamma)
    elif not image_energy:
        energy = None
    if energy is not None:
        check_energy(energy)
    cerg_off = not isinstance(tau_c, jax.core.Tracer) and float(tau_c) == 1.0
    if energy is None and (condition == "cond" or (condition == "auto" and cerg_off)):
        raise ValueError(
            "erg perturbs nothing: image_energy is False (no I-ERG) and tau_c is 1 (no "
            "C-ERG), so the weak branch is the strong one; set image_energy=True, "
            "tau_c != 1 (text models) or condition='tempered'/'null'"
        )
    term = Term(
        schedule(scale, shape, interval),
        condition,
        energy=energy,
        energy_layers=layer_ids(layers, "erg layers"),
        kappa=kappa,
        kappa_unit=kappa_unit,
        energy_steps=steps,
        tau_c=tau_c,
    )
    return Guider((term,), name="erg")


def pag(scale=3.0, *, layers=None, shape="constant", interval=(0.0, 1.0)) -> Guider:
    """Perturbed-attention guidance: identity attention in the layers (Ahn et al. 2024)."""
    term = Term(
        schedule(scale, shape, interval),
        "cond",
        identity_layers=layer_ids(layers, "layers"),
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
        blur_layers=layer_ids(layers, "layers"),
        uses_blur=True,
    )
    return Guider((term,), name="seg")


def slg(scale=3.0, *, layers="0", shape="constant", interval=(0.0, 1.0)) -> Guider:
    """Skip-layer guidance: the weak branch skips the layers."""
    term = Term(
        schedule(scale, shape, interval),
        "cond",
        skip_layers=layer_ids(layers, "layers"),
        uses_skip=True,
    )
    return Guider((term,), name="slg")


def tpg(scale=4.0, *, layers=None, shape="constant", interval=(0.0, 1.0)) -> Guider:
    """Token perturbation guidance (Rajabi et al. 2025): the weak branch moves each chosen
    block's update to the image tokens onto other tokens, by a permutation drawn afresh
    for every step and layer and shared by the batch (``control.shuffle_update``; the
    authors' SDXL code shuffles the tokens entering its transformer blocks, whose stream
    returns to the unshuffled convolutional residual).

    Args:
      scale: w; the authors' tpg_scale gamma is w - 1 (their default 3: w = 4).
      layers: the perturbed blocks (None = all), ids or block names.
    """
    term = Term(
        schedule(scale, shape, interval),
        "cond",
        shuffle_layers=layer_ids(layers, "tpg layers"),
        uses_shuffle=True,
    )
    return Guider((term,), name="tpg")


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
    if isinstance(layer, str):  # a config field: "" is the middle block
        try:
            layer = int(layer) if layer.strip() else None
        except ValueError as e:
            raise ValueError(
                f"sag layer must be '' (the middle block) or one index, got {layer!r}"
            ) from e
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


def emag(
    scale=1.5,
    *,
    layers=None,
    beta=0.988,
    strength=1.0,
    accumulate=(0.2, 1.0),
    apply=(0.2, 0.8),
    shape="constant",
    interval=(0.0, 1.0),
) -> Guider:
    """EMAG-Q, exponential moving average guidance on the queries (Yadav, Ta, Liu 2025,
    arXiv 2512.17303; ``erg_jax.emag``): the weak branch is the model with, in one
    candidate layer per sample (the one whose queries moved most from their EMA at the
    previous step), the image queries replaced by their EMA over the sampling steps.

    D = D_s + (w - 1)(D_s - D_emag), the authors' Eq. 14 with w = w_e. Their Eq. 15 then
    multiplies EMAG's difference by the CFG weight; with "cfg+emag" here the terms add,
    so their (w_cfg, w_e) is our cfg scale w_cfg and emag scale 1 + w_cfg (w_e - 1)
    (their quickstart: 7 and 1.5, so emag scale 4.5). Only the queries variant (their
    ``use_q_ema``, the quickstart default) is built: the full one would keep an EMA of
    the attention maps, layers x heads x N x (N + L) values per sample.

    Args:
      scale: w (the authors' w_e; 1 is no guidance).
      layers: the candidate layers (None = all), ids or block names; the authors'
        SD3-Medium "joint_blocks.6-8", DiT-XL/2 "blocks.12-15". No heads.
      beta: the EMA's decay, E := beta E + (1 - beta) q (0.988).
      strength: the selected layer's queries become strength E + (1 - strength) q (1:
        the authors' hard replacement; 0: the plain model).
      accumulate: the noise levels (lo, hi) where the EMA is updated (the authors'
        250-index window 50..250 is (0.2, 1.0)).
      apply: the noise levels where the EMA replaces the queries (50..200: (0.2, 0.8));
        outside it the term adds nothing.
    """
    term = Term(
        schedule(scale, shape, interval),
        "cond",
        emag=EMAG.settings(beta, strength, accumulate, apply),
        emag_layers=layer_ids(layers, "emag layers"),
    )
    return Guider((term,), name="emag")


def nag(scale=5.0, *, tau=2.5, alpha=None, norm="l1", layers=None, interval=(0.0, 1.0)) -> Guider:
    """Normalized Attention Guidance (Chen et al. 2025, arXiv 2505.21179) on the strong
    branch: negative prompts without a second forward, usable on distilled models.

    In the chosen layers the image rows Z+ of the attention against the prompt and Z-
    against the negative prompt (the "null" condition) become
    Z~ = s Z+ - (s - 1) Z-,  Z^ = Z~ min(r, tau) / r (r = |Z~| / |Z+| per sample and image
    token, over all channels),  alpha Z^ + (1 - alpha) Z+. Text rows are never changed.

    Args:
      scale: s (the authors' examples: 5); 1 is the model exactly.
      tau: the cap on the norm ratio (2.5).
      alpha: the blend (None: the model kind's, 0.25 FLUX.1, 0.125 SD3).
      norm: "l1" (the paper's Algorithm 1) or "l2" (the authors' FLUX processor).
      layers: the guided layers (None = all), ids, block names, "@" heads.
      interval: the noise levels where NAG is on; the authors' nag_end is 1 - interval[0].
    """
    check_range(scale, "nag scale", 1.0, math.inf)
    check_positive(tau, "nag tau")
    alpha = None if isinstance(alpha, str) and not alpha.strip() else alpha  # config ""
    if alpha is not None:
        check_range(alpha, "nag alpha", 0.0, 1.0)
    if norm not in NAG_NORMS:
        raise ValueError(f"nag norm must be one of {NAG_NORMS}, got {norm!r}")
    lo, hi = interval
    check_range(lo, "nag interval[0]", 0.0, 1.0)
    check_range(hi, "nag interval[1]", 0.0, 1.0)
    layers = layer_ids(layers, "nag layers")
    return Guider(name="nag", nag=NAG(scale, tau, alpha, layers, lo, hi, norm))


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
    if any(t.emag is not None for t in guider.terms):
        raise ValueError(
            f"{guider.name}: emag cannot use the weak-branch cache: its EMA of the queries "
            "moves with every weak forward"
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
    nags = [g.nag for g in guiders if g.nag is not None]
    if len(nags) > 1:
        raise ValueError("compose takes one nag: NAG guides the strong branch once")
    terms = tuple(t for g in guiders for t in g.terms)
    if nags and any(t.uses_sag for t in terms):
        raise ValueError("nag and sag: SAG's attention map is taken without NAG's text")
    if any(t.uses_sag for t in terms) and any(t.emag is not None for t in terms):
        raise ValueError(
            "emag and sag cannot share a guider: each runs a weak branch alone, SAG's on "
            "the strong output, EMAG's on its carried state"
        )
    nag = nags[0] if nags else None
    return Guider(terms, rescale, name="+".join(g.name for g in guiders), nag=nag)
