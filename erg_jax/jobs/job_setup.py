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

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax import sharding
from erg_jax.conditioning import ClassConditions, parse_classes
from erg_jax.energy import IMPLEMENTATIONS
from erg_jax.guidance.guider import check_layers
from erg_jax.jobs import job_loading as L
from erg_jax.jobs import output
from erg_jax.models import registry

# Fields of the guidance section that are the job's, not a guider's settings.
JOB_FIELDS = ("methods", "sweep", "distilled")


def guidance_settings(section) -> dict:
    """``guidance.make_guider``'s settings from a config's guidance section."""
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    return {k: v for k, v in d.items() if k not in JOB_FIELDS}


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


def make_methods(config, *, text: bool) -> dict:
    """Method name -> guider, one per method and sweep value (guidance.sweep='scale=2,3'),
    each built by ``guidance.make_guiders`` from the config's guidance section."""
    g = config.guidance
    field = str(g.sweep).partition("=")[0].strip()
    if field in JOB_FIELDS:
        raise ValueError(
            f"guidance.sweep cannot vary guidance.{field} (a constant of the compiled "
            "program): run one job per value"
        )
    guiders = G.make_guiders(g.methods, sweep=g.sweep, **guidance_settings(g))
    check_text_guiders(guiders, text=text, kind=config.model.kind)
    return guiders


def check_text_guiders(guiders: dict, *, text: bool, kind: str) -> None:
    """Refuses C-ERG (tau_c != 1) on a model without a text encoder, by name."""
    if text:
        return
    for name, guider in guiders.items():
        if G.tempered_tau_c(guider) != 1.0:
            raise ValueError(
                f"guidance.erg.tau_c: {name} tempers a text encoder, and {kind} has none "
                "(class-conditional); leave tau_c at 1"
            )


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
    text = registry.get(config.model.kind).text
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
        # one tempered encoding per C-ERG temperature the methods ask for
        tau_cs = sorted({G.tempered_tau_c(g) for g in methods.values()})
        if keep_encoders:
            encoders = L.load_text_encoders(config, mesh, sources)
            conditions = L.encode_prompts(config, encoders, width, tau_cs=tau_cs)
        else:
            conditions = L.text_conditions(config, mesh, sources, width, tau_cs=tau_cs)
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
