"""Turns a sampling-job config into a Plan: checked settings, mesh, models, guiders.

All config errors are raised here, naming the field, before any weights load or any
program compiles: an unknown method, a missing checkpoint folder, a batch the data
axes do not divide, a workdir made by another config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax import sharding
from erg_jax.conditioning import ClassConditions, parse_classes
from erg_jax.energy import IMPLEMENTATIONS, Energy
from erg_jax.guider import check_layers
from erg_jax.jobs import job_loading as L
from erg_jax.jobs import output

# Combination rules: each a base method on CFG's null branch and a modifier of any method.
RULES = {
    "zero_star": G.with_zero_star,
    "tcfg": G.with_tcfg,
    "mambo": G.with_mambo,
    "fdg": G.with_fdg,
    "apg_mix": G.with_apg_mix,
}
RULE_BASES = {"cfg_zero_star": "zero_star", "tcfg": "tcfg", "mambo": "mambo", "fdg": "fdg"}
RULE_BASES["apg_mix"] = "apg_mix"
BASE_METHODS = ("none", "cfg", "apg", "erg", "pag", "seg", "slg", "sag", *RULE_BASES)
MODIFIERS = ("apg", "cads", *RULES)


def _rule_settings(name: str, g) -> dict:
    """The keyword arguments of rule ``name`` from the job's guidance section."""
    if name == "zero_star":
        return dict(zero_steps=g.zero_star_steps)
    if name == "mambo":
        return dict(alpha=g.mambo_alpha)
    if name == "fdg":
        spec = str(g.fdg_scales).strip()
        try:
            scales = tuple(float(v) for v in spec.split(",")) if spec else (g.scale, g.scale)
        except ValueError as e:
            raise ValueError(
                f"guidance.fdg_scales must be '' or weights like '10,5', got {spec!r}"
            ) from e
        return dict(scales=scales, parallel=g.fdg_parallel)
    if name == "apg_mix":
        apg = dict(momentum=g.apg_momentum, norm_threshold=g.apg_norm_threshold, eta=g.apg_eta)
        return dict(scale=g.apg_mix_scale, cfg_steps=g.apg_mix_cfg_steps, **apg)
    return {}


@dataclasses.dataclass
class Plan:
    """Everything a sampling job needs, built and checked.

    Legend: params / vae_params are placed on the mesh; make_denoiser(params) builds
    the denoiser inside the jitted program (params are arguments, never constants);
    decode(vae_params, latents) -> images; conditions.slots(indices) -> condition slots;
    conversions: per part converted from model.pretrained, "converted" now or "reused";
    model_config, sources: what the models were built from (another sampler:
    job_loading.make_sampler(section, model_config, sources)); text_encoders: left on the
    devices by build_plan(keep_text_encoders=True) to encode other prompts, else None.
    """

    config_dict: dict
    mesh: Any
    seed: int
    num_samples: int
    batch_size: int
    latent_shape: tuple
    params: Any
    vae_params: Any
    make_denoiser: Callable
    decode: Callable | None
    sampler: S.Sampler
    methods: dict
    conditions: Any
    num_layers: int
    embed_conditions: Callable | None
    progress: bool
    grid_size: int
    conversions: dict
    rules: tuple = sharding.DEFAULT_RULES
    model_config: dict | None = None
    sources: Any = None
    text_encoders: list | None = None


def _layers(spec: str, field: str):
    spec = str(spec).strip()
    if spec in ("", "all"):
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{field} must be '' (all layers) or layer ids like '3,4,5'") from e


def _interval(spec: str, default: tuple, field: str) -> tuple:
    spec = str(spec).strip()
    if not spec:
        return default
    try:
        lo, hi = (float(v) for v in spec.split(","))
    except ValueError as e:
        raise ValueError(f"{field} must be '' or two noise levels 'lo,hi', got {spec!r}") from e
    return lo, hi


def _sag_layer(spec: str):
    """guidance.sag_layer: "" is the model's middle block (None), else one block index."""
    spec = str(spec).strip()
    if not spec:
        return None
    try:
        layer = int(spec)
    except ValueError as e:
        raise ValueError(
            f"guidance.sag_layer must be '' (the middle block) or one index, got {spec!r}"
        ) from e
    if layer < 0:
        raise ValueError(f"guidance.sag_layer must be a block index >= 0, got {layer}")
    return layer


def _f32(tree):
    """Python numbers as float32 arrays, so every sweep value has the same type."""
    return jax.tree_util.tree_map(
        lambda x: np.float32(x) if isinstance(x, int | float) and not isinstance(x, bool) else x,
        tree,
    )


def make_method(method: str, g, *, text: bool, cached: bool = False) -> G.Guider:
    """A guider from a method name ("cfg", "erg+apg", "cfg+pag", ...) and the flat
    guidance section of a job config; under the weak-branch cache when
    ``guidance.cache_every`` is not 1 or ``cached`` (a sweep over the cache fields)."""
    parts = [p.strip() for p in method.split("+")]
    shape, interval = g.schedule, (g.interval_min, g.interval_max)
    common = dict(shape=shape, interval=interval)
    bases, mods = [], []
    for i, p in enumerate(parts):
        if i > 0 and p in MODIFIERS:
            mods.append(p)
            continue
        if p not in BASE_METHODS or mods:
            raise ValueError(
                f"guidance.methods: unknown or misplaced method {p!r} in "
                f"{method!r}; methods: {BASE_METHODS}, modifiers: {MODIFIERS}"
            )
        if p == "none":
            bases.append(G.none())
        elif p == "cfg":
            bases.append(G.cfg(g.scale, rescale=g.rescale, **common))
        elif p == "apg":
            bases.append(
                G.apg(
                    g.scale,
                    momentum=g.apg_momentum,
                    norm_threshold=g.apg_norm_threshold,
                    eta=g.apg_eta,
                    **common,
                )
            )
        elif p == "erg":
            energy = Energy(g.tau, g.alpha, g.gamma) if g.image_energy else None
            cond = "tempered" if text and g.tau_c != 1.0 else "cond"
            if g.erg_condition:
                if g.erg_condition not in ("cond", "null", "tempered"):
                    raise ValueError(
                        "guidance.erg_condition must be '', 'cond', 'null' or 'tempered', "
                        f"got {g.erg_condition!r}"
                    )
                cond = g.erg_condition
            bases.append(
                G.erg(
                    g.scale,
                    energy=energy,
                    layers=_layers(g.layers, "guidance.layers"),
                    kappa=g.kappa,
                    kappa_unit=g.kappa_unit,
                    steps=g.energy_steps,
                    condition=cond,
                    **common,
                )
            )
        elif p == "pag":
            bases.append(
                G.pag(g.scale, layers=_layers(g.pag_layers, "guidance.pag_layers"), **common)
            )
        elif p == "seg":
            bases.append(
                G.seg(
                    g.scale,
                    sigma=g.seg_sigma,
                    layers=_layers(g.seg_layers, "guidance.seg_layers"),
                    **common,
                )
            )
        elif p in RULE_BASES:
            rule = RULE_BASES[p]
            base = G.cfg(g.scale, rescale=g.rescale, **common)
            bases.append(RULES[rule](base, **_rule_settings(rule, g)))
        elif p == "sag":
            layer = _sag_layer(g.sag_layer)
            bases.append(G.sag(g.scale, layer=layer, sigma=g.sag_sigma, **common))
        elif p == "slg":
            slg = dict(
                common, interval=_interval(g.slg_interval, interval, "guidance.slg_interval")
            )
            bases.append(G.slg(g.scale, layers=_layers(g.slg_layers, "guidance.slg_layers"), **slg))
    guider = bases[0] if len(bases) == 1 else G.compose(*bases)
    for m in mods:
        if m in RULES:
            guider = RULES[m](guider, **_rule_settings(m, g))
        elif m == "apg":
            guider = G.with_apg(
                guider, momentum=g.apg_momentum, norm_threshold=g.apg_norm_threshold, eta=g.apg_eta
            )
        else:
            guider = G.with_cads(
                guider,
                tau1=g.cads_tau1,
                tau2=g.cads_tau2,
                noise_scale=g.cads_noise_scale,
                psi=g.cads_psi,
            )
    if (cached or g.cache_every != 1) and guider.terms:
        window = (g.cache_t_min, g.cache_t_max)
        guider = G.cache(guider, every=g.cache_every, window=window)
    return _f32(guider.replace(name=method))


def make_methods(config, *, text: bool) -> dict:
    """Method name -> guider, one per method and sweep value (guidance.sweep='scale=2,3')."""
    g = config.guidance
    names = [m.strip() for m in str(g.methods).split(",") if m.strip()]
    if not names:
        raise ValueError("guidance.methods: name at least one method, e.g. 'cfg,erg'")
    sweep = str(g.sweep).strip()
    if not sweep:
        return {m: make_method(m, g, text=text) for m in names}
    field, _, values = sweep.partition("=")
    field = field.strip()
    if field not in g or not values:
        raise ValueError(
            f"guidance.sweep must be 'FIELD=v1,v2' with a guidance field, got {sweep!r}"
        )
    out = {}
    for v in values.split(","):
        gv = g.copy_and_resolve_references()
        with gv.unlocked():
            gv[field] = (
                type(g[field])(float(v)) if isinstance(g[field], float) else type(g[field])(v)
            )
        for m in names:
            cached = field.startswith("cache_")
            out[f"{m}_{field}{v.strip()}"] = make_method(m, gv, text=text, cached=cached)
    return out


def checked_layout(config):
    """(axis rules, mesh, data-parallel size) of a job config, its attention
    implementation, rules, mesh and batch checked, each error naming its field."""
    impl = str(config.model.attention_implementation)
    if impl and impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention_implementation must be '' (per backend) or one of "
            f"{IMPLEMENTATIONS}, got {impl!r}"
        )
    rules = sharding.parse_rules(config.logical_axis_rules)
    mesh = sharding.mesh_from_config(dict(config.mesh))
    data = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
    batch = config.sampler.batch_size
    if batch % data:
        raise ValueError(
            f"sampler.batch_size {batch} is not divisible by the mesh's "
            f"data axes (data x fsdp = {data})"
        )
    return rules, mesh, data


def build_plan(config, workdir: str, *, keep_text_encoders: bool = False) -> Plan:
    """Checks a job config and builds its Plan (see module docstring)."""
    cfg = config.to_dict()
    out, smp = config.output, config.sampler
    if out.num_samples < 1:
        raise ValueError(f"output.num_samples must be >= 1, got {out.num_samples}")
    if smp.batch_size < 1:
        raise ValueError(f"sampler.batch_size must be >= 1, got {smp.batch_size}")
    text = config.model.kind in L.TEXT_KINDS
    methods = make_methods(config, text=text)
    sources = L.resolve_sources(config, workdir)
    L.check_scheduler(smp, sources)
    if text:
        L.text_folders(config.text, sources)  # missing folders are named before loading
    rules, mesh, _ = checked_layout(config)
    output.check_workdir(workdir, cfg)
    # the mesh context lets kernels outside GSPMD (splash attention) in the text encoders
    # shard themselves over the mesh
    with sharding.mesh_context(mesh, rules):
        return _load(config, cfg, mesh, rules, methods, sources, text, keep_text_encoders)


def _load(config, cfg, mesh, rules, methods, sources, text, keep_encoders=False) -> Plan:
    """The Plan's models, conditions and sampler, once every setting is checked."""
    out, smp = config.output, config.sampler
    key = jax.random.key(config.model.init_seed)
    mod, mcfg, params = L.load_model(config.model, mesh, key, sources)
    for guider in methods.values():  # layer ids past the depth, named before compiling
        check_layers(guider, int(mcfg["num_layers"]))
    latent = (int(mcfg["sample_size"]),) * 2 + (int(mcfg["in_channels"]),)
    vae_params, decode = L.load_vae(
        config.vae, mesh, jax.random.fold_in(key, 1), latent[-1], sources
    )
    embed, encoders = None, None
    if text:
        width = int(mcfg.get("joint_attention_dim", 0))
        if keep_encoders:
            encoders = L.load_text_encoders(config, mesh, sources)
            conditions = L.encode_prompts(config, encoders, width)
        else:
            conditions = L.text_conditions(config, mesh, sources, width)
    else:
        ncls = int(mcfg.get("num_classes", 0))
        conditions = ClassConditions(
            ncls, parse_classes(config.conditioning.classes, ncls) if ncls else None
        )

        def embed(den, conds):
            return {k: den.embed_classes(v) for k, v in conds.items()}

    return Plan(
        config_dict=cfg,
        mesh=mesh,
        seed=config.seed,
        num_samples=out.num_samples,
        batch_size=smp.batch_size,
        latent_shape=latent,
        params=params,
        vae_params=vae_params,
        make_denoiser=L.denoiser_maker(mod, mcfg, config),
        decode=decode,
        sampler=L.make_sampler(smp, mcfg, sources),
        methods=methods,
        conditions=conditions,
        num_layers=int(mcfg["num_layers"]),
        embed_conditions=embed,
        progress=bool(out.progress),
        grid_size=int(out.grid_size),
        conversions=dict(sources.conversions),
        rules=rules,
        model_config=mcfg,
        sources=sources,
        text_encoders=encoders,
    )
