"""NAG's inputs to a text-conditioned model (Chen et al. 2025; ``control.nag_blend``): the
negative text of cond["negative"] and the doubled [positive; negative] batch the MMDiT
and FLUX.1 run it on (docs/METHOD.md, "NAG")."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from erg_jax.control import AttentionControl


def nag_inputs(attention, negative, blocks, context, pooled, *shared):
    """Under NAG (``attention.nag``, Chen et al. 2025; ``negative`` the negative (context,
    pooled) then, else None): the text [positive; negative] on the batch axis and the
    per-sample ``shared`` (t, guidance or None) repeated. Otherwise all as they are."""
    if (attention is not None and attention.nag is not None) != (negative is not None):
        raise ValueError("NAG's negative text goes with a control whose nag is set, and only then")
    if negative is None:
        return (context, pooled, *shared)
    if blocks is not None:
        raise ValueError("NAG (attention.nag) runs the model's own blocks, not `blocks` (branched)")
    want, got = [context.shape, pooled.shape], [a.shape for a in negative]
    if got != want:
        raise ValueError(
            f"cond['negative'] (context, pooled) {got}: must be shaped as the positive's {want}"
        )
    twice = lambda a: a if a is None else jnp.concatenate([a, a])
    doubled = [jnp.concatenate([a, n]) for a, n in zip((context, pooled), negative, strict=True)]
    return (*doubled, *map(twice, shared))


def nag_text(cond: dict, attention: AttentionControl | None, where: str | None = None):
    """(context, pooled) of cond['negative'] where the control has nag, else None; where: a
    denoiser entry that runs no NAG, for which such a control is an error."""
    if attention is None or attention.nag is None:
        return None
    if where is not None:
        raise ValueError(f"{where} does not run NAG (attention.nag): call the denoiser itself")
    neg = cond.get("negative")
    if not isinstance(neg, Mapping) or not {"context", "pooled"} <= set(neg):
        raise ValueError(
            "NAG (attention.nag) needs cond['negative'], the negative text's 'context' and 'pooled'"
        )
    return neg["context"], neg["pooled"]
