"""The one factory from a method to a Guider: a name ("cfg", "erg+apg", "cfg+pag+cache")
and a section of settings per method or modifier, each handed to its constructor as
keyword arguments; the defaults are the constructors' own (``defaults()``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from erg_jax.guidance.combination import (
    with_apg_mix,
    with_fdg,
    with_mambo,
    with_tcfg,
    with_zero_star,
)
from erg_jax.guidance.guider import Guider
from erg_jax.guidance.methods import (
    apg,
    autoguidance,
    cache,
    cfg,
    compose,
    emag,
    erg,
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
from erg_jax.schedules import check_range

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
    "nag": nag,
    "tpg": tpg,
    "emag": emag,
}
MODIFIERS = {
    "apg": with_apg,
    "cads": with_cads,
    "zero_star": with_zero_star,
    "tcfg": with_tcfg,
    "mambo": with_mambo,
    "fdg": with_fdg,
    "apg_mix": with_apg_mix,
    "cache": cache,
}
# The combination rules as base methods: CFG's null branch under the rule.
ALIASES = {
    "cfg_zero_star": "cfg+zero_star",
    "tcfg": "cfg+tcfg",
    "mambo": "cfg+mambo",
    "fdg": "cfg+fdg",
    "apg_mix": "cfg+apg_mix",
}
# Settings every base term takes, given once for all of them (a section may override).
COMMON = ("scale", "shape", "interval")
# Methods whose scale and interval are their own, never the common weight's: NAG's scale
# extrapolates attention, not the x0 sum.
OWN_SCALE = ("nag",)
# A labelled term (``terms=``): a method, its settings, and this term's own CFG rescale.
TERM_FIELDS = ("method", "rescale")
LIBRARY_ONLY = ("energy",)  # typed values with no config form (an Energy of arrays)


def _keywords(fn, own: bool = False) -> dict[str, Any]:
    """A factory's keyword settings and their defaults (the guider argument left out;
    the common ones too, unless the method's scale is its own)."""
    out = {}
    skip = ("guider", *LIBRARY_ONLY) if own else ("guider", *COMMON, *LIBRARY_ONLY)
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD or p.name in skip:
            continue
        if p.default is not p.empty:
            out[p.name] = p.default
    return out


def defaults() -> dict[str, dict[str, Any]]:
    """Every method's and modifier's settings with their defaults, a section per name.

    This is what a config holds (``config.guidance.erg.tau``) and what ``make_guider``
    takes: ``make_guider("erg+apg", scale=3, erg={"tau": 0.3}, apg={"momentum": -0.5})``.
    A name that is a method and a modifier ("apg", "tcfg", ...) has one section for both.
    None (every layer, the middle block) is written "" so that a config can override it.
    """
    sections: dict[str, dict[str, Any]] = {}
    for name, fn in [*BUILDERS.items(), *MODIFIERS.items()]:
        for key, value in _keywords(fn, own=name in OWN_SCALE and fn is BUILDERS[name]).items():
            value = "" if value is None else value
            section = sections.setdefault(name, {})
            if key in section and section[key] != value:
                raise AssertionError(f"{name}.{key}: its method and modifier disagree")
            section[key] = value
    return {name: section for name, section in sections.items() if section}


def _call(fn, name: str, common: Mapping[str, Any], section: Mapping[str, Any], *args):
    """fn(*args, **settings): the common settings it takes, then its own section's; a
    section's setting that this use of the name does not take is refused by name (the
    method "apg" takes apg.interval, the modifier in "erg+apg" does not)."""
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in common.items() if k in params and v is not None}
    if name in OWN_SCALE:
        kwargs = {}
    ignored = [k for k in section if k not in params]
    if ignored:
        role = "modifier" if args else "method"
        raise ValueError(
            f"{name}.{ignored[0]} is not a setting of the {name} {role}; it takes "
            f"{sorted(k for k in params if k not in ('guider',))}"
        )
    kwargs.update({k: v for k, v in section.items() if k in params})
    return fn(*args, **kwargs)


def _check_sections(method: str, sections: Mapping[str, Any]) -> None:
    known = defaults()
    for name, section in sections.items():
        if name not in known and name not in BUILDERS:
            raise ValueError(
                f"{method!r}: no method or modifier is named {name!r}; sections: {sorted(known)}"
            )
        if not isinstance(section, Mapping):
            raise ValueError(f"{method!r}: the {name} settings must be a mapping, got {section!r}")
        allowed = set(known.get(name, {})) | set(COMMON) | set(LIBRARY_ONLY)
        unknown = sorted(set(section) - allowed)
        if unknown:
            raise ValueError(
                f"{name}.{unknown[0]} is not a setting of {name}; it takes {sorted(allowed)}"
            )


def _labelled(label: str, entry: Mapping[str, Any], common: Mapping[str, Any]) -> Guider:
    """A labelled term of ``terms=``: its method built from its own settings, renamed."""
    if label in BUILDERS or label in MODIFIERS or label in ALIASES:
        raise ValueError(f"guidance.terms: {label!r} is a method's name; label the term otherwise")
    if not isinstance(entry, Mapping) or entry.get("method") not in BUILDERS:
        got = entry.get("method") if isinstance(entry, Mapping) else entry
        raise ValueError(
            f"guidance.terms.{label}.method must name a method of {sorted(BUILDERS)}, got {got!r}"
        )
    settings = {k: v for k, v in entry.items() if k not in TERM_FIELDS}
    guider = _call(BUILDERS[entry["method"]], label, common, settings)
    rescale = entry.get("rescale", None)
    if rescale not in (None, ""):
        check_range(rescale, f"guidance.terms.{label}.rescale", 0.0, 1.0)
        guider = guider.replace(terms=tuple(t.replace(rescale=rescale) for t in guider.terms))
    return guider.replace(name=label)


def make_guider(
    method: str,
    *,
    scale=None,
    shape=None,
    interval=None,
    terms: Mapping[str, Mapping[str, Any]] | None = None,
    **sections: Mapping[str, Any],
) -> Guider:
    """The one factory from a method name and its settings to a Guider.

    Args:
      method: base names joined by "+" ("cfg", "erg", "cfg+pag", "cfg+nag"), then
        modifiers ("erg+apg", "erg+cads", "erg+tcfg", "cfg+pag+zero_star", "erg+cache").
        The combination rules are also base methods: "tcfg" is "cfg+tcfg". A base may be
        the label of one of ``terms``.
      scale, shape, interval: the weight w, its schedule and its noise-level window for
        every base term (None: each factory's own default). NAG's scale and window are
        its own (its section's).
      terms: labelled terms, each a method of its own with its own settings, weight,
        schedule, window, layers and CFG ``rescale``, e.g. ``terms={"late_slg":
        {"method": "slg", "layers": "joint_blocks.7-9", "scale": 2.8, "interval":
        (0.01, 0.2)}}`` and ``method="cfg+late_slg"``: one entry per term, the same
        method as often as wanted.
      sections: per method or modifier name, its keyword settings (``defaults()`` lists
        them), e.g. ``erg={"tau": 0.3, "layers": "3,4"}``, ``apg={"momentum": -0.5}``,
        ``cache={"every": 2}``. A section may also hold scale, shape or interval: that
        term's own.

    Every number becomes float32 data, so guiders that differ only in numbers share one
    compiled program.
    """
    terms = dict(terms or {})
    parts = [p.strip() for p in str(method).split("+") if p.strip()]
    if parts and parts[0] in ALIASES:
        parts = ALIASES[parts[0]].split("+") + parts[1:]
    _check_sections(method, sections)
    common = dict(scale=scale, shape=shape, interval=interval)
    bases, mods = [], []
    for i, p in enumerate(parts):
        if i > 0 and p in MODIFIERS:
            mods.append(p)
        elif p in terms and not mods:
            bases.append(_labelled(p, terms[p], common))
        elif p in BUILDERS and not mods:
            bases.append(_call(BUILDERS[p], p, common, sections.get(p, {})))
        else:
            raise ValueError(
                f"guidance.methods: unknown or misplaced method {p!r} in {method!r}; methods: "
                f"{sorted([*BUILDERS, *ALIASES])}, terms: {sorted(terms)}, then modifiers: "
                f"{sorted(MODIFIERS)}"
            )
    if not bases:
        raise ValueError(
            f"guidance.methods: {method!r} names no method; methods: {sorted(BUILDERS)}"
        )
    guider = bases[0] if len(bases) == 1 else compose(*bases)
    for m in mods:
        if m == "cache" and not guider.terms:
            raise ValueError(f"{method!r}: the cache reuses weak branches; {parts[0]} has none")
        guider = _call(MODIFIERS[m], m, {}, sections.get(m, {}), guider)
    return _float32(guider.replace(name=method))


def tempered_tau_c(guider: Guider) -> float:
    """The text encoder temperature of the guider's "tempered" condition (1: none)."""
    values = {float(t.tau_c) for t in guider.terms} - {1.0}
    if len(values) > 1:
        raise ValueError(f"{guider.name}: its terms ask for tau_c {sorted(values)}; give one")
    return values.pop() if values else 1.0


def _float32(tree):
    """Python numbers as float32 arrays, so every sweep value has the same type."""
    return jax.tree_util.tree_map(
        lambda x: np.float32(x) if isinstance(x, int | float) and not isinstance(x, bool) else x,
        tree,
    )


def _sweep_value(text: str, old, field: str):
    """One sweep value, read as the type of the setting it replaces."""
    text = text.strip()
    try:
        if isinstance(old, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
    except ValueError as e:
        kind = "True or False" if isinstance(old, bool) else type(old).__name__
        raise ValueError(f"guidance.sweep: {field} takes {kind} values, got {text!r}") from e
    if isinstance(old, str):
        return text
    raise ValueError(f"guidance.sweep: {field} ({type(old).__name__}) cannot be swept")


def make_guiders(methods, *, sweep: str = "", **settings) -> dict[str, Guider]:
    """Method name -> guider for every method, and every value of a sweep.

    Args:
      methods: "cfg,erg,erg+apg" or a sequence of names.
      sweep: "" or "FIELD=v1,v2,...": every method at each value, the name suffixed
        "_{leaf}{v}" (``sweep="scale=2,3"`` gives "erg_scale2", "erg_scale3"; a section's
        field is dotted: "erg.tau=0.3,0.5", "cache.every=2,4", "erg.tau_c=0.5,0.8").
        Values are read as the setting's type (booleans as True / False).
      settings: ``make_guider``'s scale, shape, interval and sections.
    """
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    names = [m for m in names if m]
    if not names:
        raise ValueError("guidance.methods: name at least one method, e.g. 'cfg,erg'")
    sweep = str(sweep).strip()
    if not sweep:
        return {m: make_guider(m, **settings) for m in names}
    field, _, values = sweep.partition("=")
    field, values = field.strip(), [v.strip() for v in values.split(",") if v.strip()]
    *section, leaf = field.split(".")
    known = defaults()
    if len(section) > 1 or not values:
        raise ValueError(
            f"guidance.sweep must be 'FIELD=v1,v2' (FIELD: scale or erg.tau ...), got {sweep!r}"
        )
    if section:
        own = settings.get(section[0], {})
        if section[0] not in known or leaf not in {*known[section[0]], *own}:
            raise ValueError(f"guidance.sweep: {field!r} is not a guidance setting")
        old = own.get(leaf, known[section[0]].get(leaf))
    else:
        if leaf not in COMMON or leaf == "interval":
            raise ValueError(
                f"guidance.sweep: {field!r} is not a guidance setting "
                "(scale, shape, or SECTION.FIELD)"
            )
        old = (
            settings.get(leaf) if settings.get(leaf) is not None else ({"scale": 1.0}.get(leaf, ""))
        )
    out = {}
    for text in values:
        value = _sweep_value(text, old, field)
        swept = dict(settings)
        if section:
            swept[section[0]] = dict(settings.get(section[0], {}), **{leaf: value})
        else:
            swept[leaf] = value
        for m in names:
            out[f"{m}_{leaf}{text}"] = make_guider(m, **swept)
    return out


# Fields of a settings guidance section (erg_jax.settings) that are not a guider's own:
# the methods' names, the sweep over them, FLUX.1 [dev]'s distilled embedding scale (a
# model input) and a two-expert model's low-noise weight, both fixed in the program.
SECTION_FIELDS = ("methods", "sweep", "distilled", "low_noise_scale")


def section_settings(section) -> dict:
    """``make_guider``'s settings of a guidance settings section (a dict or ConfigDict)."""
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    return {k: v for k, v in d.items() if k not in SECTION_FIELDS}


def guiders_from_section(section) -> dict[str, Guider]:
    """Method name -> guider of a guidance settings section: its methods, at every value
    of its sweep, each built by ``make_guider`` from the section's settings."""
    field = str(section["sweep"]).partition("=")[0].strip()
    if field in SECTION_FIELDS:
        raise ValueError(
            f"guidance.sweep cannot vary guidance.{field} (a constant of the compiled "
            "program): run one job per value"
        )
    return make_guiders(section["methods"], sweep=section["sweep"], **section_settings(section))


def check_text_guiders(guiders: Mapping[str, Guider], *, text: bool, kind: str) -> None:
    """Refuses C-ERG (tau_c != 1) and NAG on a model without a text encoder, by name."""
    if text:
        return
    for name, guider in guiders.items():
        if guider.nag is not None:
            raise ValueError(
                f"guidance.methods: {name} uses nag, which guides a text stream, and {kind} "
                "has none (class-conditional)"
            )
        if tempered_tau_c(guider) != 1.0:
            raise ValueError(
                f"guidance.erg.tau_c: {name} tempers a text encoder, and {kind} has none "
                "(class-conditional); leave tau_c at 1"
            )
