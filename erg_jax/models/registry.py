"""One entry per model kind: what the jobs, the dry run, the Pipeline, the converters and
the entropy probe look up about a ``model.kind`` (big_vision's ``models.{name}``).

A kind's code stays in its own module (``erg_jax.models.<name>``: preset, params, axes,
denoiser); its entry here says where that module is and how the rest of the library treats
the kind: text- or class-conditioned, which published checkpoints convert into it, which
config file samples it, and the few FLUX.1-style behaviours (any latent side, a distilled
guidance embedding, the pipeline's own sigmas). Modules are named by import path and
imported on use: the model code loads only when a model of that kind does, and the
converters, which sit above the models (``erg_jax.convert``), are never imported from here
at module level. Adding an architecture is its module and one ``ModelKind`` in ``KINDS``
(docs/INTERFACES.md, "Adding an architecture").
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any


def resolve(path: str) -> Any:
    """'package.module:name' -> that object, or 'package.module' -> the module, imported now."""
    module, _, name = path.partition(":")
    out = importlib.import_module(module)
    return getattr(out, name) if name else out


def embed_classes(den: Any, conds: dict) -> dict:
    """Class ids -> the denoiser's class embeddings, slot by slot: CADS anneals embeddings
    (Sadat et al. 2024), so a class model's ids are embedded before the guider sees them."""
    return {k: den.embed_classes(v) for k, v in conds.items()}


@dataclasses.dataclass(frozen=True)
class Converter:
    """How one kind of published checkpoint becomes an erg_jax checkpoint of a model kind.

    Attributes:
      pipeline: ``convert.pipeline.Pretrained.kind`` of the checkpoint ("sd3", "dit-pt").
      source: its ``launch.convert --source`` and conversion-cache name ("diffusers-sd3").
      pipeline_class: the diffusers ``_class_name`` in model_index.json; None: a file.
      convert: "module:function", (path, **settings) -> (params, config).
      config: "module:function", (transformer config.json dict, **overrides) -> our
        config dict; None where the checkpoint holds no config (a .pt: the preset stands in).
      text: the pipeline folder's (text encoder, tokenizer) sub-folders, in the order of
        its ``text.layout``.
      optional_text: the text encoders a folder may leave out (SD3's T5).
    """

    pipeline: str
    source: str
    pipeline_class: str | None
    convert: str
    config: str | None = None
    text: tuple[tuple[str, str], ...] = ()
    optional_text: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """A model kind as the library looks it up.

    Attributes:
      name: ``model.kind`` and the ``kind`` of a checkpoint's config.json.
      module_path: import path of its model module, which has make_denoiser,
        init_params, abstract_params, param_axes and its preset function.
      preset: the preset function's name in that module, (name, **overrides) -> config.
      network: the function there building its Flax module from a config (training).
      config_file: configs/<config_file>.py samples it (one variant per recipe).
      recipes: "module:name" of its recipes, recipe name -> settings fields
        (``erg_jax.settings``) of how a published size is sampled, the first the default.
      text: conditioned on prompts (text encoders); otherwise on class ids.
      converters: the published checkpoints that convert into it.
      pipeline_layout: the ``text.layout`` its published pipeline folders need (None: no
        text encoders in them).
      any_latent_side: any latent side runs (rotary positions), not only the stored one.
      distilled_guidance: it may carry a distilled guidance embedding, whose scale
        ``guidance.distilled`` fills into every branch (FLUX.1 [dev]).
      pipeline_sigmas: its diffusers pipeline hands the scheduler sigmas of its own,
        linspace(1, 1 / steps, steps) (FluxPipeline).
      entropy_probe: its denoiser has ``with_entropy`` (launch.entropy).
      demo: a shipped demo model, models/demo-<name>, exists (quality bench, probe, quickstart).
      trainable: ``launch.train``'s flow-matching trainer builds and trains it.
      layout: "module:function", config -> ``guidance.Layout``: its blocks as layer
        targets name them ("joint_blocks.3"), its heads, NAG's default blend.
      context_parallel: its attention splits the sequence over ``mesh.context``
        (``sharding.sequence_attention``); other kinds refuse a context axis.
      video: "module:function", (config, num_frames, height, width) -> the latent shape
        (frames, h, w, channels) of a video of that many frames and pixels, each checked
        (a ValueError naming the ``video.*`` field); "" for an image model.
    """

    name: str
    module_path: str
    preset: str
    network: str
    config_file: str
    recipes: str
    text: bool
    converters: tuple[Converter, ...] = ()
    pipeline_layout: str | None = None
    any_latent_side: bool = False
    distilled_guidance: bool = False
    pipeline_sigmas: bool = False
    entropy_probe: bool = False
    demo: bool = False
    trainable: bool = False
    layout: str = ""
    context_parallel: bool = False
    video: str = ""

    def module(self) -> Any:
        """Its model module, imported now."""
        return resolve(self.module_path)

    def make_config(self, preset: str, **overrides: Any) -> dict:
        """The config dict of a named preset with fields overridden."""
        return getattr(self.module(), self.preset)(preset, **overrides)

    def make_network(self, config: dict) -> Any:
        """Its Flax module of a config dict."""
        return getattr(self.module(), self.network)(config)

    def make_layout(self, config: dict) -> Any:
        """Its ``guidance.Layout`` of a config dict (None where the kind has none)."""
        return resolve(self.layout)(config) if self.layout else None

    def latent_shape(self, config: dict, num_frames: int, height: int, width: int) -> tuple:
        """The latents (frames, h, w, c) of a video (``video``); a ValueError for an image model."""
        if not self.video:
            raise ValueError(f"{self.name} is an image model: it samples no video")
        return tuple(resolve(self.video)(config, num_frames, height, width))

    def recipe_names(self) -> tuple[str, ...]:
        """Its recipes' names, the default first."""
        return tuple(resolve(self.recipes))

    def recipe(self, name: str = "") -> dict:
        """The settings fields of a recipe ("" = the default); another name is a ValueError
        naming them."""
        recipes = resolve(self.recipes)
        if not name:
            name = next(iter(recipes))
        if name not in recipes:
            raise ValueError(f"{self.name} recipe must be one of {tuple(recipes)}, got {name!r}")
        return dict(recipes[name])

    @property
    def embed_conditions(self) -> Callable | None:
        """(denoiser, condition slots) -> what CADS anneals: class ids embedded for a class
        model; None for a text model, whose conditions are already embeddings."""
        return None if self.text else embed_classes


_DIT = "erg_jax.convert.dit"
_CLIPS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
KINDS: dict[str, ModelKind] = {
    k.name: k
    for k in (
        ModelKind(
            name="dit",
            module_path="erg_jax.models.dit",
            layout="erg_jax.models.dit_config:layout",
            preset="dit_config",
            network="dit_module",
            config_file="dit",
            recipes="erg_jax.models.dit_config:RECIPES",
            text=False,
            converters=(
                Converter(
                    "dit",
                    "diffusers-dit",
                    "DiTPipeline",
                    f"{_DIT}:convert_diffusers_dit",
                    f"{_DIT}:config_from_diffusers",
                ),
                Converter("dit-pt", "dit-pt", None, f"{_DIT}:load_dit_pt"),
            ),
            entropy_probe=True,
            demo=True,
            trainable=True,
        ),
        ModelKind(
            name="mmdit",
            module_path="erg_jax.models.mmdit",
            layout="erg_jax.models.mmdit_config:layout",
            preset="mmdit_config",
            network="mmdit_module",
            config_file="sd3",
            recipes="erg_jax.models.mmdit_config:RECIPES",
            text=True,
            converters=(
                Converter(
                    "sd3",
                    "diffusers-sd3",
                    "StableDiffusion3Pipeline",
                    "erg_jax.convert.sd3:convert_diffusers_sd3",
                    "erg_jax.convert.sd3:config_from_diffusers",
                    text=_CLIPS + (("text_encoder_3", "tokenizer_3"),),
                    optional_text=("text_encoder_3",),  # the pipeline feeds zeros for it
                ),
            ),
            pipeline_layout="sd3",
            entropy_probe=True,
            demo=True,
            trainable=True,
        ),
        ModelKind(
            name="flux",
            module_path="erg_jax.models.flux",
            layout="erg_jax.models.flux_config:layout",
            preset="flux_config",
            network="flux_module",
            config_file="flux",
            recipes="erg_jax.models.flux_config:RECIPES",
            text=True,
            converters=(
                Converter(
                    "flux",
                    "diffusers-flux",
                    "FluxPipeline",
                    "erg_jax.convert.flux:convert_diffusers_flux",
                    "erg_jax.convert.flux:config_from_diffusers",
                    text=_CLIPS,  # CLIP-L, T5
                ),
            ),
            pipeline_layout="flux",
            any_latent_side=True,
            distilled_guidance=True,
            pipeline_sigmas=True,
        ),
        ModelKind(
            name="wan",
            module_path="erg_jax.models.wan",
            layout="erg_jax.models.wan_config:layout",
            preset="wan_config",
            network="wan_module",
            config_file="wan",
            recipes="erg_jax.models.wan_config:RECIPES",
            text=True,
            converters=(
                Converter(
                    "wan",
                    "diffusers-wan",
                    "WanPipeline",
                    "erg_jax.convert.wan:convert_diffusers_wan",
                    "erg_jax.convert.wan:config_from_diffusers",
                    text=(("text_encoder", "tokenizer"),),  # umT5
                ),
            ),
            pipeline_layout="wan",
            any_latent_side=True,
            context_parallel=True,
            video="erg_jax.models.wan_config:latent_shape",
        ),
    )
}


def names(**where: Any) -> tuple[str, ...]:
    """The kinds whose fields equal ``where``, in registration order: names(text=True)."""
    return tuple(
        k.name for k in KINDS.values() if all(getattr(k, f) == v for f, v in where.items())
    )


def get(kind: str) -> ModelKind:
    """The entry of a model.kind; any other is a ValueError naming the known kinds."""
    if kind not in KINDS:
        raise ValueError(f"model.kind must be one of {names()}, got {kind!r}")
    return KINDS[kind]


def converters() -> dict[str, Converter]:
    """Every model kind's converters, by ``Pretrained.kind``."""
    return {c.pipeline: c for k in KINDS.values() for c in k.converters}


def converter(pipeline: str) -> Converter:
    """The converter of a ``Pretrained.kind``; an unknown one is a ValueError naming all."""
    found = converters()
    if pipeline not in found:
        raise ValueError(
            f"no model kind converts a {pipeline!r} checkpoint; known: {sorted(found)}"
        )
    return found[pipeline]


def for_pipeline(pipeline: str) -> ModelKind:
    """The kind a published checkpoint of ``Pretrained.kind`` ``pipeline`` converts into."""
    wanted = converter(pipeline)
    return next(k for k in KINDS.values() if wanted in k.converters)


def pipeline_classes() -> dict[str, str]:
    """diffusers pipeline ``_class_name`` -> its ``Pretrained.kind``."""
    return {c.pipeline_class: p for p, c in converters().items() if c.pipeline_class}


__all__ = [
    "KINDS",
    "Converter",
    "ModelKind",
    "converter",
    "converters",
    "embed_classes",
    "for_pipeline",
    "get",
    "names",
    "pipeline_classes",
    "resolve",
]
