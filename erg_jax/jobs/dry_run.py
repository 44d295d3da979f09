"""A dry run of the sampling job: does the configured model fit the chips, at which batch?

Nothing is read but config files, nothing large is allocated. The denoiser's parameters
are built abstractly (``jax.eval_shape`` of its init, in the dtype the job would load
them in) and given the NamedShardings of their logical axes on the job's mesh; the VAE
and, where their folders are known, the text encoders likewise. The job's own program
(``pipeline.generate_fn``: noise -> a scan of guided steps, every branch of the method in
``guidance.methods`` with the most branches, the first of a tie -> VAE decode) is then
lowered with abstract, sharded inputs and compiled for the mesh at the configured batch b
and at 2b; a scan holds one step's working memory whatever the number of steps. XLA's
``memory_analysis`` gives per device

    need(b) = arguments (denoiser and VAE params, the batch's inputs) + outputs
              + temporaries  ~  fixed + per_sample * b   (the line through b and 2b)

The configured batch fits when need(b) <= ``dry_run_memory_gb`` (GiB). The line's
largest batch (a multiple of the data-parallel size) is compiled to check it, and
bisected down while it does not fit: XLA's need is not linear in b. The text encoders
run, and are freed, before sampling: their parameters make a separate, earlier peak.

A video model (Wan) is sized at its ``video`` section's frames and pixels, with the
video VAE; a mesh axis "context" splits its token sequence, the attention running as the
job runs it (ring or Ulysses, ``sharding.sequence_attention``).

Time: FLOPs per sample of each method's program, from XLA's cost analysis of the
lowered, unpartitioned program with every loop trip counted (``dry_run_flops``), its
attention on the einsum path. Per sample is (F(2b) - F(b)) / b; the text encoders, run
once per prompt, are not counted. ``dry_run_table.estimate`` turns it into seconds and
hours per chip kind at an assumed MFU: an estimate, not a measurement.

The compiler is the one of the machine the dry run runs on: on a CPU host its layouts,
fusions and attention paths differ from a TPU's (docs/BENCHMARKS.md, "Dry run").
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from erg_jax import checkpoint, sharding
from erg_jax import guidance as G
from erg_jax import loading as L
from erg_jax import samplers as S
from erg_jax.convert import pipeline as pipe
from erg_jax.energy import Energy
from erg_jax.jobs import output
from erg_jax.jobs.dry_run_flops import abstract_guider, program_flops
from erg_jax.jobs.dry_run_table import GIB, estimate, verdict
from erg_jax.jobs.dry_run_table import format_table as format_table  # launch.sample's name
from erg_jax.jobs.job_setup import make_methods
from erg_jax.models import registry
from erg_jax.pipeline import generate_fn
from erg_jax.settings import checked_layout

CLIP_TOKENS = 77  # CLIP's learned positions: the sd3 layout's tokens before T5's


def devices_needed(mesh_config) -> int:
    """Devices the mesh asks for, an axis of size -1 counted as 1 (the launcher makes
    this many CPU devices for a dry run on a host without them)."""
    return math.prod(max(int(v), 1) for v in dict(mesh_config).values())


def model_config(config, pretrained: pipe.Pretrained | None = None) -> tuple[Any, dict, str]:
    """(model module, model config, where it came from), from config files only.

    model.pretrained: the pipeline's transformer/config.json mapped as the converters map
    it (a DiT / SiT .pt file holds no config: model.preset at model.sample_size stands
    in); model.checkpoint: its config.json; otherwise model.preset with model.overrides,
    at model.sample_size where the preset stands in for a checkpoint not yet given.
    ``pretrained`` is model.pretrained already opened (``pipeline.open_pretrained``).
    """
    mc = config.model
    entry = registry.get(mc.kind)
    mod, preset = entry.module(), entry.make_config
    size = {"sample_size": int(mc.sample_size)} if mc.sample_size else {}
    stored = None
    if mc.pretrained:
        src = pretrained or pipe.open_pretrained(mc.pretrained)
        if registry.for_pipeline(src.kind).name != mc.kind:
            raise ValueError(
                f"model.kind is {mc.kind!r}, but model.pretrained holds a {src.kind} model"
            )
        dtype = mc.param_dtype or "float32"  # what the conversion stores
        reader = registry.converter(src.kind).config
        if reader is None:
            source = f"preset {mc.preset!r} (a .pt file holds no config file)"
            stored = preset(mc.preset, param_dtype=dtype, **size)
        else:  # mapped as the converter maps it
            source = os.path.join(src.transformer, "config.json")
            raw = pipe.read_json(source, "transformer config")
            stored = registry.resolve(reader)(raw, param_dtype=dtype)
    elif mc.checkpoint and not mc.random_init:
        stored = checkpoint.read_config(mc.checkpoint)
        source = os.path.join(mc.checkpoint, checkpoint.CONFIG)
        if stored.get("kind") != mc.kind:
            raise ValueError(
                f"model.kind is {mc.kind!r}, the checkpoint holds {stored.get('kind')!r}"
            )
    runtime = L.runtime_fields(mc)
    if stored is not None and entry.any_latent_side:  # rotary positions
        stored = dict(stored, **size)
    if stored is not None:
        if size and int(stored["sample_size"]) != size["sample_size"]:
            raise ValueError(
                f"model.sample_size is {mc.sample_size}, but {source} describes a model of "
                f"latent side {stored['sample_size']}"
            )
        return mod, dict(stored, **runtime), source
    overrides = L.parse_overrides(mc.overrides)
    if not mc.random_init:  # standing in for a checkpoint: at the size it must have
        overrides = {**size, **overrides}
    return mod, preset(mc.preset, **runtime, **overrides), f"preset {mc.preset!r}"


def sharded_abstract(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their NamedShardings (jit's abstract arguments)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def param_bytes(tree: Any) -> dict:
    """Bytes of sharded abstract params: per device (each device holds one shard of every
    leaf, the same shape on every device), of which replicated, and in all."""
    per_device = replicated = total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        item = np.dtype(leaf.dtype).itemsize
        shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * item
        per_device += shard
        total += math.prod(leaf.shape) * item
        replicated += shard if leaf.sharding.is_fully_replicated else 0
    return {"per_device": per_device, "replicated": replicated, "total": total}


def _vae(config, latent_channels: int, pretrained, attention=None) -> tuple[Any, Any, str]:
    """The VAE's abstract params (in the dtype the job restores them in), its decode as
    ``loading.load_vae`` builds it (with ``attention`` its attention implementation), and
    where its config came from; Nones if disabled. A video model's is the Wan VAE."""
    vc = config.vae
    if not vc.enabled:
        return None, None, "disabled"
    video = bool(registry.get(config.model.kind).video)
    vcfg, source = _vae_config(vc, latent_channels, pretrained, video)
    if vc.dtype:
        vcfg = dict(vcfg, dtype=vc.dtype, param_dtype=vc.dtype)
    if attention:
        vcfg = dict(vcfg, attention_implementation=attention)
    if video:
        from erg_jax.models import wan_vae as W

        module, init = W.WanAutoencoder(vcfg), W.init_params

        def decode(p, z):
            return W.decode_raw(module, p, W.denormalize_latents(z.astype(jnp.float32), vcfg))

    else:
        from erg_jax.models import vae

        module, init = vae.vae_module(vcfg), vae.init_params

        def decode(p, z):
            z = vae.unscale_latents(z.astype(jnp.float32), vcfg)
            return module.apply({"params": p}, z, method=vae.AutoencoderKL.decode)

    dtype = jnp.dtype(vcfg.get("param_dtype", "float32"))
    shapes = jax.eval_shape(lambda k: init(vcfg, k), jax.random.key(0))
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), shapes)
    return abstract, decode, source


def _vae_config(vc, latent_channels: int, pretrained, video: bool) -> tuple[dict, str]:
    """The VAE's config and where it came from: vae.checkpoint's config file, a published
    folder's (vae.pretrained, or the pipeline's vae/), else vae.preset."""
    folder = vc.pretrained or (pretrained.vae if pretrained is not None else None)
    if vc.checkpoint and not vc.random_init:
        return checkpoint.read_config(vc.checkpoint), vc.checkpoint
    if folder and not vc.random_init:
        if video:
            from erg_jax.convert.wan_vae import config_from_diffusers
        else:
            from erg_jax.convert.vae import config_from_diffusers
        source = os.path.join(folder, "config.json")
        return config_from_diffusers(pipe.read_json(source, "VAE config")), source
    if video:
        from erg_jax.models.wan_vae import wan_vae_config

        return wan_vae_config(vc.preset), f"preset {vc.preset!r}"
    from erg_jax.models.vae import vae_config

    return vae_config(vc.preset, latent_channels=latent_channels), f"preset {vc.preset!r}"


def _text_encoders(config, mesh, rules, pretrained) -> list[dict] | None:
    """Per known encoder folder: its parameter bytes per device as the job shards them
    (config.json and the safetensors header only; the weights stay memory-mapped)."""
    from erg_jax.models.text.encoder import FAMILIES
    from erg_jax.weights import read_config, read_folder

    t = config.text
    folders = L.text_folders(t, L.Sources(pretrained, ""))
    if not folders:
        return None
    dtype = jnp.dtype(t.dtype or "float32")
    out = []
    for pair in folders:
        if pair is None:  # an SD3 pipeline without its T5
            continue
        hf = read_config(pair[0])
        if hf.get("model_type") not in FAMILIES:
            raise ValueError(
                f"{pair[0]}: text encoder model_type {hf.get('model_type')!r} is not one of "
                f"{sorted(FAMILIES)}"
            )
        family, module_cls = FAMILIES[hf["model_type"]]
        cfg = family.make_config(hf, read_folder(pair[0])[0])
        module = module_cls(cfg, dtype=dtype, param_dtype=dtype)
        boxed = jax.eval_shape(
            lambda m=module: m.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), None, Energy())
        )["params"]
        shardings = sharding.param_shardings(boxed, mesh, rules)
        out.append({"folder": pair[0], **param_bytes(sharded_abstract(nn.unbox(boxed), shardings))})
    return out


def text_tokens(config) -> int:
    """Tokens of the denoiser's text context: the sd3 layout's CLIP tokens (text.max_length
    or CLIP's 77) and T5's max_sequence_length; "flux" and "wan": T5's (umT5's)
    max_sequence_length alone; "single": text.max_length, else 77."""
    t = config.text
    if t.layout in ("flux", "wan"):
        return int(t.max_sequence_length)
    clip = int(t.max_length) or CLIP_TOKENS
    return clip + int(t.max_sequence_length) if t.layout == "sd3" else clip


def batch_inputs(config, mcfg: dict, batch: int, mesh, rules) -> tuple:
    """Abstract, batch-sharded (noise, conditions, keys) of one batch, as the job's."""

    def spec(shape, dtype):
        where = sharding.batch_sharding(mesh, shape, rules)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=where)

    keys = jax.eval_shape(lambda: S.sample_keys(0, jnp.arange(batch)))
    if not registry.get(mcfg["kind"]).text:  # class ids
        conds = {slot: spec((batch,), jnp.int32) for slot in ("cond", "null")}
    else:
        dtype, tokens = jnp.dtype(config.text.dtype or "float32"), text_tokens(config)
        # MMDiT / FLUX.1 name the context's width joint_attention_dim, Wan text_dim
        width = int(mcfg.get("joint_attention_dim") or mcfg["text_dim"])
        slot = {"context": spec((batch, tokens, width), dtype)}
        if config.text.layout != "wan":  # umT5 alone pools nothing (conditioning._combine)
            # "single" pools the context's own rows
            pooled = int(mcfg.get("pooled_projection_dim") or width)
            slot["pooled"] = spec((batch, pooled), dtype)
        conds = {name: dict(slot) for name in ("cond", "tempered", "null")}
    shape = (batch, *latent_shape(config, mcfg))
    return spec(shape, jnp.dtype(jnp.float32)), conds, spec(keys.shape, keys.dtype)


def latent_shape(config, mcfg: dict) -> tuple[int, ...]:
    """One sample's latents: (h, w, c) of an image model, (frames, h, w, c) of a video
    model at the config's ``video`` frames and pixels (``Pipeline.latent_shape``)."""
    entry = registry.get(mcfg["kind"])
    if entry.video:
        v = config.video
        return tuple(entry.latent_shape(mcfg, int(v.num_frames), int(v.height), int(v.width)))
    side = int(mcfg["sample_size"])
    return side, side, int(mcfg["in_channels"])


def job_program(mod, mcfg: dict, sampler: S.Sampler, decode, config=None):
    """The job's program ``(params, vae_params, noise, conds, keys, guider) -> images``;
    config: the job config, for FLUX.1 [dev]'s guidance.distilled."""
    make = L.denoiser_maker(mod, mcfg, config) if config else lambda p: mod.make_denoiser(mcfg, p)
    # CADS anneals class embeddings, as the job's Pipeline does
    embed = registry.get(mcfg["kind"]).embed_conditions
    return generate_fn(make, sampler, int(mcfg["num_layers"]), decode, embed)


def compile_program(program, args: tuple, guider, mesh, rules) -> dict:
    """Lowers and compiles ``program(*args, guider)`` for the mesh, every argument kept
    (the job holds them all on the devices); XLA's per-device bytes and the seconds."""
    guider = abstract_guider(guider, mesh)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        compiled = jax.jit(program, keep_unused=True).lower(*args, guider).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    if m is None:
        raise ValueError(f"the {jax.default_backend()} backend gives no memory analysis")
    out = {
        "temp": int(m.temp_size_in_bytes),
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
    }
    out["need"] = out["temp"] + out["arguments"] + out["outputs"] - out["aliased"]
    return dict(out, compile_seconds=seconds)


def flops_per_sample(config, parts: tuple, methods: dict, mesh, rules, pretrained) -> dict:
    """{method: FLOPs per sample}: (F(2b) - F(b)) / b of ``program_flops`` at the configured
    batch b, every method's own program, its attention (denoiser's and VAE's) on the einsum
    path: a kernel's custom call (splash, cuDNN) hides its FLOPs from XLA, CPU query chunks
    add padding rows. parts: (module, model config, sampler, params, VAE params)."""
    mod, mcfg, sampler, params, vae_params = parts
    mcfg = dict(mcfg, attention_implementation="einsum")
    decode = _vae(config, int(mcfg["in_channels"]), pretrained, attention="einsum")[1]
    program = job_program(mod, mcfg, sampler, decode, config)
    b = int(config.sampler.batch_size)
    args = [(params, vae_params, *batch_inputs(config, mcfg, n, mesh, rules)) for n in (b, 2 * b)]
    out = {}
    for name, guider in methods.items():
        one, two = (program_flops(program, a, guider, mesh, rules) for a in args)
        out[name] = (two - one) / b
    return out


def _checked_batch(compile_at, report: dict, memory: float, checks: int) -> int:
    """The largest compiled batch that fits: the line's estimate compiled and, while it
    does not fit, the gap to the largest batch known to fit halved, ``checks`` compiles
    at most. Off the compiled batches the line missed by up to 29% (SD3.5-large;
    docs/BENCHMARKS.md, "Dry run")."""
    unit, compiled = report["data_parallel"], report["compiled"]
    lo = max([c["batch"] for c in compiled if c["need"] <= memory], default=0)
    hi, candidate = None, report["largest_batch_line"]
    for _ in range(checks):
        if candidate is None or candidate <= lo or candidate in [c["batch"] for c in compiled]:
            break
        compiled.append(compile_at(candidate))
        if compiled[-1]["need"] <= memory:
            lo = candidate
            if hi is None:  # the line's own estimate fits
                break
        else:
            hi = candidate
        candidate = (lo + hi) // 2 // unit * unit
    return lo


def _checked_config(config) -> tuple:
    """(methods, axis rules, mesh, data-parallel size, memory bytes) of a config whose
    every setting the dry run reads is checked, as ``job_setup.build_plan`` checks them."""
    mc = config.model
    memory = float(config.dry_run_memory_gb) * GIB
    if memory <= 0:
        raise ValueError(f"dry_run_memory_gb must be > 0, got {config.dry_run_memory_gb}")
    methods = make_methods(config, text=registry.get(mc.kind).text)
    rules, mesh, unit = checked_layout(config)
    return methods, rules, mesh, unit, memory


def dry_run(
    config, workdir: str | None = None, *, compile: bool = True, checks: int = 3, flops: bool = True
) -> dict:
    """Per-device memory of a sampling-job config and the batch that fits (module
    docstring); also written to WORKDIR/dry_run.json and printable by ``format_table``.

    Args:
      config: a sampling-job config (configs/dit.py, configs/sd3.py).
      workdir: where dry_run.json goes (None: nowhere).
      compile: False reports the parameters only, compiling nothing.
      checks: compiles at most spent checking the line's largest batch.
      flops: count each method's FLOPs per sample (two traces and lowerings per method,
        no compile) for the time estimate; with compile only.

    Raises:
      ValueError: a config error (unknown method, mesh the devices do not form, batch
        the data axes do not divide, ...), named before anything compiles.
    """
    methods, rules, mesh, unit, memory = _checked_config(config)
    smp, mc = config.sampler, config.model
    pretrained = pipe.open_pretrained(mc.pretrained) if mc.pretrained else None
    L.check_distilled(config, L.Sources(pretrained, ""))
    mod, mcfg, source = model_config(config, pretrained)
    layout = registry.get(mc.kind).make_layout(mcfg)  # block names, as the job resolves them
    methods = {m: G.resolve_targets(g, layout) for m, g in methods.items()}
    sampler = L.make_sampler(smp, mcfg, L.Sources(pretrained, ""))
    abstract = mod.abstract_params(mcfg)
    shardings = sharding.shardings_from_axes(mod.param_axes(mcfg), abstract, mesh, rules)
    params = sharded_abstract(abstract, shardings)
    vae_abstract, decode, vae_source = _vae(config, int(mcfg["in_channels"]), pretrained)
    vae_params = None
    if vae_abstract is not None:  # replicated, as the job places it
        everywhere = NamedSharding(mesh, PartitionSpec())
        vae_params = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=everywhere), vae_abstract
        )
    text = registry.get(mc.kind).text
    encoders = _text_encoders(config, mesh, rules, pretrained) if text else None
    # the widest program: a method's working memory grows with its branches
    method = max(methods, key=lambda m: methods[m].num_branches)  # the first of a tie
    guider = methods[method]
    p = param_bytes(params)
    vae_bytes = param_bytes(vae_params)["per_device"] if vae_params else 0
    report: dict[str, Any] = {
        "model": {
            "kind": mc.kind,
            "source": source,
            "param_dtype": str(jnp.dtype(mcfg["param_dtype"])),
            "scan_blocks": bool(mcfg.get("scan_blocks")),
            "num_params": int(sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(params))),
            "latent_shape": list(latent_shape(config, mcfg)),
        },
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "devices": f"{mesh.size} {jax.default_backend()}",
        "method": method,
        "branches": guider.num_branches,
        "methods": {m: g.num_branches for m, g in methods.items()},
        "sampler": f"{sampler.solver}, {sampler.steps} steps",
        "params_bytes_per_device": p["per_device"],
        "params_replicated_bytes_per_device": p["replicated"],
        "params_bytes_total": p["total"],
        "vae": {"source": vae_source, "bytes_per_device": vae_bytes},
        "text_encoders": encoders,
        "memory_bytes": int(memory),
        "batch_size": int(smp.batch_size),
        "data_parallel": unit,
        "compiled": [],
    }
    if encoders:
        report["encoding_peak_bytes_per_device"] = (
            p["per_device"] + vae_bytes + sum(e["per_device"] for e in encoders)
        )
    report.update(verdict(report, memory))
    report["largest_batch"] = report["largest_batch_line"]
    if compile:
        program = job_program(mod, mcfg, sampler, decode, config)

        def compile_at(b: int) -> dict:
            args = (params, vae_params, *batch_inputs(config, mcfg, b, mesh, rules))
            return {"batch": b, **compile_program(program, args, guider, mesh, rules)}

        report["compiled"] = [compile_at(smp.batch_size), compile_at(2 * smp.batch_size)]
        (b1, c1), (b2, c2) = ((c["batch"], c) for c in report["compiled"])
        report["fit"] = {}
        for key in ("temp", "need"):
            per_sample = (c2[key] - c1[key]) / (b2 - b1)
            report["fit"][key] = {"fixed": c1[key] - per_sample * b1, "per_sample": per_sample}
        report.update(verdict(report, memory))
        report["largest_batch"] = _checked_batch(compile_at, report, memory, checks)
    if compile and flops:
        parts = (mod, mcfg, sampler, params, vae_params)
        report["flops_per_sample"] = flops_per_sample(
            config, parts, methods, mesh, rules, pretrained
        )
    report["estimate"] = estimate(report, int(config.output.num_samples))
    if workdir and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        output.atomic_write_json(os.path.join(workdir, "dry_run.json"), report)
    return report
