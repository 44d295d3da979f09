"""The conditions of each sample: class labels or prompt encodings, with C-ERG's tempered one.

A sample's condition depends only on its global index i (class ``classes[i % len]``,
prompt ``prompts[i % len]``), never on the batch it falls in. Text conditions are
encoded once per prompt, the strong (tau_c = 1) and tempered (tau_c) encodings in one
vmapped call (C-ERG, Berrada Ifriqi et al. 2025, sec. 3.2), plus the negative prompts
(by default the empty prompt) as the null condition. Layouts:

- "single": one encoder; context = its chosen hidden state, pooled = its pooled output
  (or the masked mean of the hidden state when it has none).
- "sd3": CLIP-L, CLIP-G and T5 as Stable Diffusion 3 combines them (Esser et al. 2024,
  sec. 3.2; diffusers' StableDiffusion3Pipeline), token for token: each encoder runs on
  its full padded length (CLIP 77, T5 ``max_sequence_length``) without a padding mask;
  the two CLIPs' penultimate hidden states are concatenated on features and zero-padded
  to T5's width, then T5's tokens appended on the sequence axis (zeros when the
  pipeline has no T5); pooled = the two CLIPs' projected pooled outputs.
- "flux": CLIP-L and T5 as FLUX.1 uses them (diffusers' FluxPipeline): context = T5's last
  hidden state at ``max_sequence_length`` tokens, pooled = CLIP-L's unprojected pooled
  output at 77 tokens, both encoders run on their padded length without a padding mask.
  FLUX.1 [dev]'s distilled guidance scale is no part of the condition: it is a constant
  of the job (``erg_jax.models.flux.with_distilled_guidance``), so CADS never anneals it.
- "wan": umT5 as Wan 2.1 / 2.2 use it (diffusers' WanPipeline): the prompt cleaned (HTML
  entities undone, runs of white space made one space), ``max_sequence_length`` (512)
  tokens run with the padding mask, and the rows past each prompt's own tokens set to
  zero; the denoiser's cross-attention still reads all 512 rows, zeros included.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax.energy import Energy

LAYOUTS = ("single", "sd3", "flux", "wan")
ENCODERS = {"single": 1, "sd3": 3, "flux": 2, "wan": 1}  # encoders per layout, in this order
MASKED = ("single", "wan")  # layouts whose encoders run with the padding mask


def clean_prompt(text: str) -> str:
    """Wan's cleaning of a prompt before tokenizing, as its pipeline does it: ftfy's text
    repair where ftfy is installed, HTML entities undone twice, white space runs made one
    space."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def parse_classes(spec: str, num_classes: int) -> list[int] | None:
    """'all' (every class in turn), 'none' (unconditional) or comma-separated ids."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(num_classes))
    if spec in ("none", ""):
        return None
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"conditioning.classes must be 'all', 'none' or ids, got {spec!r}") from e
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad or not ids:
        raise ValueError(f"conditioning.classes must be in [0, {num_classes}), got {spec!r}")
    return ids


def check_conditions(items, kind: str, text: bool, num_classes: int) -> list:
    """The call's conditions, checked against the model's kind before anything runs."""
    if isinstance(items, str | int) or not isinstance(items, Sequence) or not items:
        raise ValueError(
            "prompts_or_classes must be a non-empty list of "
            + ("prompts (str)" if text else "class ids (int)")
            + f", got {items!r}"
        )
    items = list(items)
    if text:
        bad = [x for x in items if not isinstance(x, str) or "|" in x]
        if bad:
            raise ValueError(
                f"prompts_or_classes: {kind} is a text-to-image model: give prompts "
                f"(str, without '|', the sampling job's separator), got {bad[0]!r}"
            )
        items = [x.strip() for x in items]  # as the job reads text.prompts
        if "" in items and any(items):
            raise ValueError(
                "prompts_or_classes: an empty prompt among others (the job skips it); "
                "give only empty prompts for unconditional samples"
            )
        return items
    ok = lambda x: isinstance(x, int | np.integer) and not isinstance(x, bool)
    bad = [x for x in items if not ok(x) or not 0 <= int(x) < num_classes]
    if bad:
        raise ValueError(
            f"prompts_or_classes: {kind} is class-conditional: give class ids, "
            f"ints in [0, {num_classes}), got {bad[0]!r}"
        )
    return [int(x) for x in items]


class ClassConditions:
    """Class labels per sample; the null class is ``num_classes``."""

    def __init__(self, num_classes: int, classes: list[int] | None):
        self.num_classes = num_classes
        self.classes = classes

    def labels(self, indices: np.ndarray) -> np.ndarray:
        if self.classes is None:
            return np.full(len(indices), self.num_classes, np.int32)
        return np.asarray(self.classes, np.int32)[np.asarray(indices) % len(self.classes)]

    def slots(self, indices: np.ndarray, tau_c: float | None = None) -> dict:
        if tau_c not in (None, 1.0):
            raise ValueError(f"class labels have no text encoder to temper (tau_c {tau_c})")
        null = np.full(len(indices), self.num_classes, np.int32)
        return {"cond": self.labels(indices), "null": null}

    def describe(self, index: int) -> str:
        return "unconditional" if self.classes is None else f"class {self.labels([index])[0]}"


def _pooled(out: dict, mask) -> jax.Array:
    if "pooled" in out:
        return out["pooled"]
    h = out["hidden_state"].astype(jnp.float32)
    w = jnp.asarray(mask, jnp.float32)[..., None]
    return jnp.sum(h * w, axis=-2) / jnp.maximum(jnp.sum(w, axis=-2), 1.0)


class TextConditions:
    """Prompt encodings per sample: 'cond', 'tempered' (C-ERG) and 'null' (the negative
    prompt, by default the empty one).

    Args:
      encoders: TextEncoder objects (``erg_jax.models.text``): one for "single",
        (clip_l, clip_g, t5) for "sd3", where t5 may be None (SD3 without its T5: the
        pipeline then feeds zeros of ``t5_shape``), or (clip_l, t5) for "flux".
      prompts: the prompts, cycled over sample indices; empty = unconditional.
      tau_c: C-ERG's temperature in every encoder layer (1 = no C-ERG), or several:
        each is encoded in the same vmapped call, and ``slots(indices, tau_c)`` picks one.
      layout: "single", "sd3" or "flux".
      negative_prompts: cycled over sample indices as the prompts are; empty = "".
      t5_shape: (tokens, width) of the zero T5 encoding when the sd3 layout has no T5.
    """

    def __init__(
        self,
        encoders: Sequence,
        prompts: Sequence[str],
        tau_c: float | Sequence[float],
        layout: str = "single",
        negative_prompts: Sequence[str] = (),
        t5_shape: tuple[int, int] | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"text.layout must be one of {LAYOUTS}, got {layout!r}")
        need = ENCODERS[layout]
        if len(encoders) != need:
            raise ValueError(f"text layout {layout!r} needs {need} encoders, got {len(encoders)}")
        if layout == "sd3" and encoders[2] is None and t5_shape is None:
            raise ValueError("the sd3 layout without a T5 encoder needs t5_shape")
        self.prompts = list(prompts)
        self.negatives = list(negative_prompts) or [""]
        texts = list(dict.fromkeys(self.prompts + self.negatives))
        self._row = {text: i for i, text in enumerate(texts)}
        values = [float(v) for v in (tau_c if isinstance(tau_c, Sequence) else [tau_c])]
        self.tau_cs = list(dict.fromkeys(values or [1.0]))
        energies = [Energy()] + [Energy(tau=v) for v in self.tau_cs]
        outs = []
        for enc in encoders:
            if enc is None:
                outs.append(None)
                continue
            ids, mask = enc.tokenize([clean_prompt(x) for x in texts] if layout == "wan" else texts)
            # SD3 and FLUX.1 were trained on CLIP and T5 run without a padding mask (every
            # token attends to the padding), so their encoders are called the same way.
            out = enc.encode_branches(ids, mask if layout in MASKED else None, energies)
            outs.append((out, np.asarray(mask)))
        both = jax.tree_util.tree_map(np.asarray, _combine(outs, layout, t5_shape))
        self.table = {"cond": {k: v[0] for k, v in both.items()}}
        for b, value in enumerate(self.tau_cs, 1):
            self.table[("tempered", value)] = {k: v[b] for k, v in both.items()}

    def _rows(self, texts: list[str], indices: np.ndarray) -> np.ndarray:
        return np.asarray([self._row[texts[i % len(texts)]] for i in np.asarray(indices)])

    def slots(self, indices: np.ndarray, tau_c: float | None = None) -> dict:
        """'cond', 'tempered' (at ``tau_c``; None: the first encoded) and 'null'."""
        tau_c = self.tau_cs[0] if tau_c is None else float(tau_c)
        if ("tempered", tau_c) not in self.table:
            raise ValueError(f"tau_c {tau_c} was not encoded; encoded: {self.tau_cs}")
        null_rows = self._rows(self.negatives, indices)

        def take(table, r):
            return {k: v[r] for k, v in table.items()}

        tempered = self.table[("tempered", tau_c)]
        if not self.prompts:  # unconditional: the (negative or empty) prompt everywhere
            cond = take(self.table["cond"], null_rows)
            # C-ERG still tempers the encoder on that prompt (tau_c = 1: the same encoding)
            return {"cond": cond, "tempered": take(tempered, null_rows), "null": cond}
        rows = self._rows(self.prompts, indices)
        return {
            "cond": take(self.table["cond"], rows),
            "tempered": take(tempered, rows),
            "null": take(self.table["cond"], null_rows),
        }

    def describe(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)] if self.prompts else "unconditional"


def _combine(outs, layout: str, t5_shape) -> dict:
    """The denoiser's {'context', 'pooled'} of every text, with a leading branch axis."""
    if layout == "single":
        out, mask = outs[0]
        pooled = jax.vmap(lambda o: _pooled(o, mask))(out)
        return {"context": out["hidden_state"], "pooled": pooled}
    if layout == "wan":
        out, mask = outs[0]
        keep = jnp.asarray(mask, out["last_hidden_state"].dtype)[None, :, :, None]
        return {"context": out["last_hidden_state"] * keep}
    if layout == "flux":
        (clip, _), (t5, _) = outs
        # FluxPipeline pools CLIPTextModel, which has no projection: a folder's
        # CLIPTextModelWithProjection gives its unprojected pooler_output alike.
        pooled = clip.get("pooler_output", clip["pooled"])
        return {"context": t5["last_hidden_state"], "pooled": pooled}
    (l_out, _), (g_out, _), t5 = outs
    clip = jnp.concatenate([l_out["hidden_state"], g_out["hidden_state"]], axis=-1)
    if t5 is None:
        t5_hidden = jnp.zeros(clip.shape[:2] + tuple(t5_shape), clip.dtype)
    else:
        t5_hidden = t5[0]["last_hidden_state"]
    width = t5_hidden.shape[-1]
    clip = jnp.pad(clip, [(0, 0)] * (clip.ndim - 1) + [(0, width - clip.shape[-1])])
    context = jnp.concatenate([clip, t5_hidden.astype(clip.dtype)], axis=-2)
    pooled = jnp.concatenate([l_out["pooled"], g_out["pooled"]], axis=-1)
    return {"context": context, "pooled": pooled}
