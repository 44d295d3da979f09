"""The quickstart (``python -m launch.quickstart``, scripts/demo.sh): guidance methods side
by side from the same noise, on the shipped text-to-image model (``run_quickstart``) or
on the exact toy (``run_toy``).

The toy job: guided sampling of the exact pattern denoiser, with simple metrics.

Metrics per method, against the stored patterns (the whole "data set"):
consistency, the share of samples whose nearest pattern has the requested class;
coverage, the share of each class's patterns that are some sample's nearest; distance,
the mean RMS distance from a sample to its nearest pattern (0 = on the data).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.jobs import output
from erg_jax.models.toy import PatternDenoiser, shape_patterns


def make_guiders(config) -> dict:
    """The quickstart's guiders: ``guidance.make_guiders`` on its config's guidance section."""
    return G.make_guiders(config.guidance.methods, **G.section_settings(config.guidance))


def toy_metrics(samples, labels, patterns, pattern_labels) -> dict:
    flat = samples.reshape(samples.shape[0], -1)
    pats = patterns.reshape(patterns.shape[0], -1)
    d2 = np.mean((flat[:, None, :] - pats[None]) ** 2, axis=-1)
    nearest = np.argmin(d2, axis=1)
    consistency = float(np.mean(pattern_labels[nearest] == labels))
    coverage = []
    for c in np.unique(pattern_labels):
        hit = set(nearest[(labels == c) & (pattern_labels[nearest] == c)].tolist())
        coverage.append(len(hit) / int(np.sum(pattern_labels == c)))
    return {
        "consistency": consistency,
        "coverage": float(np.mean(coverage)),
        "distance": float(np.mean(np.sqrt(np.min(d2, axis=1)))),
    }


def run_toy(config, workdir: str) -> dict:
    """Samples every method of the config from the same noise; writes grid and metrics."""
    m = config.model
    patterns, plabels = shape_patterns(m.num_classes, m.per_class, m.size, m.pattern_seed)
    den = PatternDenoiser(patterns, plabels, m.num_classes)
    n = config.output.samples_per_class * m.num_classes
    labels = jnp.arange(n) % m.num_classes
    keys = S.sample_keys(config.seed, jnp.arange(n))
    noise = S.initial_noise(keys, patterns.shape[1:])
    conds = {"cond": labels, "null": jnp.full((n,), m.num_classes)}
    smp = S.make_sampler(config.sampler.solver, config.sampler.steps, shift=config.sampler.shift)
    guiders = make_guiders(config)
    results, rows = {}, []
    for name, guider in guiders.items():
        run = jax.jit(lambda g: S.sample(den, noise, conds, g, smp, keys=keys, num_layers=1))
        start = time.perf_counter()
        x = np.asarray(run(guider))
        seconds = time.perf_counter() - start
        results[name] = toy_metrics(x, np.asarray(labels), patterns, plabels)
        results[name]["seconds"] = seconds
        results[name]["nfe"] = guider.num_branches * smp.steps * smp.nfe_per_step
        rows.append(x[: min(n, 16)])
    write_grid(os.path.join(workdir, "grid.png"), rows)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump({"methods": results, "config": config.to_dict()}, f, indent=2)
    return results


def write_grid(path: str, rows: list) -> None:
    """Rows of NHWC images in [-1, 1] as one PNG, written atomically."""
    img = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    img = np.repeat(np.repeat(output.to_uint8(img), 4, axis=0), 4, axis=1)  # 4x, nearest
    output.atomic_write_bytes(path, output.png_bytes(img))


def run_quickstart(config, workdir: str) -> dict:
    """CFG against ERG on the shipped text-to-image model, from the same noise.

    Writes workdir/grid.png (a labelled row per method; columns: the first
    ``grid_per_prompt`` samples of each prompt, labelled with it), workdir/metrics.json
    and metrics.md (per method: consistency read by the shipped classifier with its
    standard error, shape and colour accuracy, seconds, function evaluations) and
    workdir/index.html (the grid, the table, the settings).
    """
    from erg_jax import data, metrics
    from erg_jax.jobs import report
    from erg_jax.jobs.quality import load_demo
    from erg_jax.models.classifier import load_classifier
    from erg_jax.shipped_models import resolve

    g = config.guidance
    guiders = make_guiders(config)
    model = load_demo("mmdit", config.models_dir)
    classifier = load_classifier(resolve(config.classifier))
    prompts = [p.strip() for p in config.prompts.split("|") if p.strip()]
    n = len(prompts) * config.samples_per_prompt
    captions = [prompts[i % len(prompts)] for i in range(n)]
    attrs = [data.parse_caption(c) for c in captions]
    cond_set = {"caption": captions}
    keys = S.sample_keys(config.seed, jnp.arange(n))
    noise = S.initial_noise(keys, model.latent_shape)
    smp = S.make_sampler("euler", config.steps, time=model.time)
    # grid columns: sample i of prompt p sits at index p + i * len(prompts)
    shown = [
        p + i * len(prompts) for p in range(len(prompts)) for i in range(config.grid_per_prompt)
    ]
    shown = [i for i in shown if i < n]
    results, rows = {}, []
    for name, guider in guiders.items():
        conds = model.conditions(cond_set, tau_c=G.tempered_tau_c(guider))
        run = jax.jit(
            lambda gd, c: S.sample(
                model.denoiser, noise, c, gd, smp, keys=keys, num_layers=model.num_layers
            )
        )
        start = time.perf_counter()
        x = np.clip(np.asarray(jax.block_until_ready(run(guider, conds))), -1, 1)
        seconds = time.perf_counter() - start
        read = classifier(x)
        scores = metrics.consistency_scores(
            read["shape"], read["colour"], [a[0] for a in attrs], [a[1] for a in attrs]
        )
        p = scores["consistency"]
        scores["consistency_se"] = math.sqrt(p * (1.0 - p) / n)
        weight = float(guider.terms[0].weight.scale) if guider.terms else 1.0
        results[name] = dict(
            scores, weight=weight, seconds=seconds, nfe=guider.num_branches * config.steps
        )
        rows.append(x[shown])
    _compare_to_none(results)
    labels = [f"{m} (w={r['weight']:g})" if m != "none" else "none" for m, r in results.items()]
    grid = report.labelled_grid(rows, labels, [captions[i] for i in shown], scale=3)
    report.write_png(os.path.join(workdir, "grid.png"), grid)
    table = _table(results, n)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump({"methods": results, "prompts": prompts, "config": config.to_dict()}, f, indent=2)
    output.atomic_write_bytes(os.path.join(workdir, "metrics.md"), table.encode())
    columns = COLUMNS
    report.write_html(
        os.path.join(workdir, "index.html"),
        title="erg-jax quickstart: guidance on the shipped text-to-image model",
        grid="grid.png",
        grid_caption=(
            f"rows: methods; columns: prompts ({config.steps} Euler steps, "
            "the same noise down each column)"
        ),
        columns=columns,
        rows=[dict(zip(columns, r, strict=True)) for r in _rows(results)],
        settings={
            "guidance": g.to_dict(),
            "steps": config.steps,
            "seed": config.seed,
            "samples_per_prompt": config.samples_per_prompt,
            "prompts": prompts,
        },
        notes=[
            f"Consistency: the share of the {n} samples per method whose shape and colour "
            "the shipped classifier reads as the prompt's; +- is its standard error. "
            "Each method runs at its own weight w, the one the quality bench found best for it on "
            "this model (docs/RESULTS.md). 'vs none' is the difference to no guidance with "
            "its standard error; a difference is claimed only where it exceeds it.",
        ],
        column_labels=[captions[i] for i in shown],
    )
    print(table)
    return results


def _compare_to_none(results: dict) -> None:
    """Each method's consistency against no guidance: the difference, its standard error
    (the two samples' errors combined) and a verdict that claims a difference only
    where it is larger than one standard error."""
    base = results.get("none")
    for name, r in results.items():
        if base is None or name == "none":
            r["vs_none"], r["vs_none_se"], r["verdict"] = None, None, ""
            continue
        diff = r["consistency"] - base["consistency"]
        se = math.hypot(r["consistency_se"], base["consistency_se"])
        r["vs_none"], r["vs_none_se"] = diff, se
        if abs(diff) <= se:
            r["verdict"] = "within noise"
        else:
            r["verdict"] = "higher" if diff > 0 else "lower"


COLUMNS = ["method", "w", "consistency", "+-", "vs none", "", "shape", "colour", "seconds"]
COLUMNS += ["nfe"]


def _rows(results: dict) -> list[tuple]:
    return [
        (
            m,
            r["weight"],
            r["consistency"],
            r["consistency_se"],
            "" if r["vs_none"] is None else f"{r['vs_none']:+.3f} +- {r['vs_none_se']:.3f}",
            r["verdict"],
            r["shape_accuracy"],
            r["colour_accuracy"],
            r["seconds"],
            r["nfe"],
        )
        for m, r in results.items()
    ]


def _table(results: dict, n: int) -> str:
    """The per-method figures as a Markdown table."""
    lines = [
        f"| method | w | consistency (n={n}) | +- | vs none | | shape | colour | seconds | nfe |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, w, c, se, vs, verdict, s, col, sec, nfe in _rows(results):
        lines.append(
            f"| {m} | {w:g} | {c:.3f} | {se:.3f} | {vs} | {verdict} | {s:.3f} | {col:.3f} "
            f"| {sec:.1f} | {nfe} |"
        )
    return "\n".join(lines) + "\n"
