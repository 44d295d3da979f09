"""The negative-prompt bench: does a negative prompt keep an attribute out of the images?

On the shipped text model, each held-out caption is sampled without its colour word
("a small triangle in the upper left"), with a negative prompt naming one colour ("a
small red triangle in the upper left"; by default the colour the unguided samples show
most). Rows: no guidance (the negative unused), CFG with
the negative prompt as its null condition, NAG (Chen et al. 2025: the negative inside
the one forward) and CFG + NAG. Read with the attribute classifier: the share of samples
of the negative colour (lower is better), the share with the caption's shape (the
prompt still obeyed), and the Frechet distance to held-out real images.

    python -m launch.quality --config=configs/quality.py:mmdit --config.mode=negative \\
        --workdir=out/negative
"""

from __future__ import annotations

import json
import os

import numpy as np

from erg_jax import data, metrics
from erg_jax.jobs.scoring import Scorer, bench_guider, forwards
from erg_jax.models import registry

COLUMNS = ("method", "weight", "negative_share", "shape_accuracy", "fd", "nfe", "seconds")


def _without_colour(caption: str) -> str:
    words = [w for w in caption.split() if w not in data.COLOURS]
    return " ".join(words)


def _with_colour(caption: str, colour: str) -> str:
    out = [colour if w in data.COLOURS else w for w in caption.split()]
    return " ".join(out)


def check_config(config) -> None:
    """The negative mode's fields, named before any model loads."""
    if not registry.get(config.model).text:
        raise ValueError("mode 'negative' needs the text model (configs/quality.py:mmdit)")
    colour = config.negative.colour
    if colour != "auto" and colour not in data.COLOURS:
        raise ValueError(f"negative.colour must be 'auto' or one of {data.COLOURS}, got {colour!r}")


def run_negative(model, classifier, config, workdir: str) -> list[dict]:
    """Samples every row of ``config.negative`` on held-out captions stripped of their
    colour, the negative prompt naming ``negative.colour`` ("auto": the colour the
    unguided samples show most, found by sampling them first); writes negative.json and
    negative.md to workdir and returns the rows."""
    check_config(config)
    neg = config.negative
    scorer = Scorer(model, classifier, config, start=config.num_real, seed=config.seed)
    captions = list(scorer.cond_set["caption"])
    prompts = [_without_colour(c) for c in captions]
    guidance = config.guidance.to_dict()

    def row(method, weight, conds, colour):
        guider = bench_guider(method, weight, guidance)
        images, seconds = scorer.sample(guider, conds)
        read = classifier(np.clip(images, -1.0, 1.0))
        colours = np.asarray(read["colour"])
        shares = np.bincount(colours, minlength=len(data.COLOURS)) / len(colours)
        out = dict(
            method=method,
            weight=float(weight),
            negative_share=float(shares[colour]) if colour is not None else None,
            shape_accuracy=float(np.mean(read["shape"] == scorer.cond_set["shape"])),
            fd=float(metrics.frechet_distance(scorer.real_feats, read["features"])),
            nfe=forwards(guider, scorer.smp),
            seconds=seconds,
            colour_shares=dict(zip(data.COLOURS, (float(x) for x in shares), strict=True)),
        )
        print(f"{method:>10} w={weight:g} shares {out['colour_shares']}", flush=True)
        return out

    plain = model.encode(prompts, [""] * len(prompts))
    first = row("none", 1.0, plain, None)
    colour = neg.colour
    if colour == "auto":
        colour = max(first["colour_shares"], key=first["colour_shares"].get)
    index = data.COLOURS.index(colour)
    first["negative_share"] = first["colour_shares"][colour]
    conds = model.encode(prompts, [_with_colour(c, colour) for c in captions])
    rows = [first]
    for method in [m for m in neg.methods.split(",") if m and m != "none"]:
        for weight in [1.0] if method == "nag" else list(neg.weights):
            rows.append(row(method, weight, conds, index))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "negative.json"), "w") as f:
        json.dump({"colour": colour, "rows": rows}, f, indent=2)
    lines = [f"negative colour: {colour}", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(workdir, "negative.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows
