"""Layer and head targets by name: "joint_blocks.0-5", "double_blocks.3", "blocks.12@0-3".

A guidance term perturbs chosen attention layers. Global indices ("3,4") count every
attention layer of the model in order; a recipe written that way changes meaning when it
moves between architectures (FLUX's layer 20 is its second single block). Named targets
use the architecture's own block names instead, and may pick heads:

    spec   := "" | "all" | item ("," item)*
    item   := [group "."] range ["@" heads]
    range  := N | N "-" M                        (inclusive, as "joint_blocks.0-5")
    heads  := range ("+" range)*                 ("@0-3+7": heads 0, 1, 2, 3 and 7)

A model kind describes its blocks once as a ``Layout`` (each model's config module,
``layout(config)``); ``resolve`` turns a spec into what the guider takes: global layer
ids (int32), or a boolean (layers, heads) mask where heads are named. A spec that names
a group is held as a ``Target`` until the model is known (``resolve_targets``; the
sampler, the Pipeline and the jobs do it), and a name the model lacks is refused with
the names it has.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np

_ITEM = re.compile(r"^(?:([A-Za-z_][A-Za-z0-9_]*)\.)?(\d+)(?:-(\d+))?(?:@([0-9+\-]+))?$")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A model's attention layers as its own blocks name them.

    Attributes:
      groups: (name, count) per kind of block, in the order of the global layer index
        (FLUX: ("double_blocks", 19), ("single_blocks", 38)).
      heads: attention heads per layer.
      aliases: other names of a group (diffusers': "transformer_blocks").
      nag_alpha: NAG's default blend for this kind (None: no text stream to guide).
    """

    groups: tuple[tuple[str, int], ...]
    heads: int
    aliases: tuple[tuple[str, str], ...] = ()
    nag_alpha: float | None = None

    @property
    def num_layers(self) -> int:
        return sum(n for _, n in self.groups)

    def names(self) -> list[str]:
        """The group names a spec may use, each with its range."""
        out = [f"{g}.0-{n - 1}" for g, n in self.groups]
        return out + [f"{a} (= {g})" for a, g in self.aliases]

    def offset(self, group: str, spec: str) -> tuple[int, int]:
        """(first global index, count) of a group or alias."""
        group = dict(self.aliases).get(group, group)
        start = 0
        for name, count in self.groups:
            if name == group:
                return start, count
            start += count
        raise ValueError(
            f"{spec!r}: this model has no blocks named {group!r}; it has {self.names()}"
        )


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Target:
    """A named layer spec not yet resolved (a static leaf-less pytree node): the guider
    carries it until ``resolve_targets`` meets the model's Layout."""

    spec: str
    field: str


def _range(text: str, hi: str | None, spec: str) -> range:
    a, b = int(text), int(hi) if hi is not None else int(text)
    if b < a:
        raise ValueError(f"{spec!r}: a range must run upward, got {a}-{b}")
    return range(a, b + 1)


def _items(spec: str, field: str) -> list[tuple[str | None, range, list[int] | None]]:
    out = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        m = _ITEM.match(item)
        if m is None:
            raise ValueError(
                f"{field}: {item!r} is not a layer target; write ids ('3,4'), block names "
                "('joint_blocks.0-5', 'double_blocks.3') and heads after '@' ('blocks.12@0-3+7')"
            )
        group, lo, hi, heads = m.groups()
        picked = None
        if heads is not None:
            picked = []
            for part in heads.split("+"):
                a, _, b = part.partition("-")
                if not a.isdigit() or (b and not b.isdigit()):
                    raise ValueError(f"{field}: heads {heads!r} in {item!r} must be like 0-3+7")
                picked += list(_range(a, b or None, item))
        out.append((group, _range(lo, hi, item), picked))
    if not out:
        raise ValueError(f"{field} must name at least one layer, got {spec!r}")
    return out


def is_named(spec: str) -> bool:
    """Whether a config string names blocks or heads (needs the model's Layout)."""
    return any(c.isalpha() or c == "@" for c in spec) and spec.strip() != "all"


def resolve(spec: str, layout: Layout, field: str = "layers"):
    """Global int32 layer ids, or a (layers, heads) boolean mask where heads are named."""
    items = _items(spec, field)
    n = layout.num_layers
    mask = np.zeros((n, layout.heads), bool)
    for group, layers, heads in items:
        start, count = (0, n) if group is None else layout.offset(group, spec)
        for i in layers:
            if i >= count:
                where = f"{group} has {count} (0..{count - 1})" if group else f"the model has {n}"
                raise ValueError(f"{field}: {spec!r} names layer {i}, and {where}")
            for h in heads if heads is not None else range(layout.heads):
                if h >= layout.heads:
                    raise ValueError(
                        f"{field}: {spec!r} names head {h}; each layer has {layout.heads} "
                        f"(0..{layout.heads - 1})"
                    )
                mask[start + i, h] = True
    if all(heads is None for *_, heads in items):
        return np.flatnonzero(mask.any(axis=1)).astype(np.int32)
    return mask


LAYER_FIELDS = (
    "energy_layers",
    "identity_layers",
    "blur_layers",
    "skip_layers",
    "shuffle_layers",
    "emag_layers",
)


def resolve_targets(guider, layout: Layout | None):
    """The guider with every named target resolved on the model's Layout (and NAG's
    alpha, where left to the model, set to the kind's default)."""
    terms = []
    for term in guider.terms:
        changes = {}
        for name in LAYER_FIELDS:
            value = getattr(term, name)
            if isinstance(value, Target):
                if layout is None:
                    raise ValueError(unresolved(value))
                changes[name] = resolve(value.spec, layout, value.field)
        terms.append(term.replace(**changes) if changes else term)
    guider = guider.replace(terms=tuple(terms))
    if guider.nag is not None:
        nag = guider.nag
        if layout is not None and layout.nag_alpha is None:
            raise ValueError(f"{guider.name}: nag guides a text stream; this model has none")
        if isinstance(nag.layers, Target):
            if layout is None:
                raise ValueError(unresolved(nag.layers))
            nag = nag.replace(layers=resolve(nag.layers.spec, layout, nag.layers.field))
        if nag.alpha is None:
            if layout is None:
                raise ValueError(
                    f"{guider.name}: nag alpha is left to the model kind (0.125 SD3, 0.25 "
                    "FLUX); give nag alpha, or sample through a model that has a layout"
                )
            nag = nag.replace(alpha=np.float32(layout.nag_alpha))
        guider = guider.replace(nag=nag)
    return guider


def unresolved(target: Target) -> str:
    return (
        f"{target.field}: {target.spec!r} names blocks; it needs the model's layout "
        "(guidance.resolve_targets(guider, layout); the Pipeline, the jobs and a denoiser "
        "with a .layout do it)"
    )
