"""A loaded model and its sampler, called for images per guidance method.

    pipe = Pipeline.load("models/demo-mmdit")
    out = pipe(["a small red circle in the upper left"], methods=("cfg", "erg"), scale=4.0)
    out.images["erg"]  # (n, H, W, 3) uint8; a video model's (n, frames, H, W, 3)

A ``Pipeline`` is its parts: the denoiser (its config, its parameters on the mesh and the
function that builds it from them inside the compiled program), the sampler (time grid
and solver), the VAE's decoder (None in pixel space), the text encoders (None for a class
model) and the device mesh, with the settings sections (``erg_jax.settings``) the call
reads: the text layout and negative prompts, the sampler section another number of steps
is built from, and the guidance section a call's methods start from. Build one from parts,
from settings (``from_settings``), or from a folder (``load``).

``Pipeline.load`` takes
- a model folder written by ``launch.train`` or ``launch.convert`` (config.json and
  params). A pixel-space one (the shipped demo models) runs on its kind's ``tiny`` recipe
  without a VAE, with 20 Euler steps on the even grid and the text encoder its config.json
  names; a latent one on the kind's default recipe, with ``vae=`` and, for a text model,
  its text encoders as settings (``fields={"text.encoders": ..., "text.tokenizers": ...}``);
- a diffusers pipeline folder (model_index.json) or an original DiT / SiT .pt file: the
  kind's default recipe with ``model.pretrained`` = the path, converted on first use into
  ``cache_dir`` (a .pt file also needs ``vae=``).

Sample i of a call is drawn from the key fold_in(seed, i) and condition i, as the
sampling job draws it (the job is this object plus files, resume, hosts and reports), so
``python -m launch.sample`` with ``Pipeline.job_flags(out.settings[method])`` writes the
same images. Each guider structure compiles once per number of steps; the scale, tau,
kappa, the seed and the prompts are data, so another call reuses the program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from erg_jax import guidance as G
from erg_jax import loading as L
from erg_jax import samplers as S
from erg_jax import settings as settings_lib
from erg_jax import sharding
from erg_jax.conditioning import ClassConditions, check_conditions
from erg_jax.guidance.guider import check_layers
from erg_jax.models import registry
from erg_jax.shipped_models import resolve

MODEL_FIELDS = ("checkpoint", "pretrained", "cache_dir", "kind", "preset")


@dataclasses.dataclass
class Samples:
    """What one Pipeline call returns.

    Legend: images[method] (n, H, W, C) uint8 in [0, 255], a video model's (n, frames,
    H, W, C), row i drawn from the key
    fold_in(seed, i) and condition i; settings[method]: the settings fields that draw
    them (seed, output, model, sampler, guidance, and text or conditioning), as nested
    dicts; conditions: the prompts or class ids, in order.
    """

    images: dict[str, np.ndarray]
    settings: dict[str, dict]
    conditions: list


def generate_fn(
    make_denoiser, sampler, num_layers: int, decode=None, embed_conditions=None, experts=None
):
    """(params, vae_params, noise, conds, keys, guider) -> images in [-1, 1]: noise, a
    scan of guided steps, the VAE's decoder; class ids embedded first where CADS anneals
    them (``ModelKind.embed_conditions``); ``experts`` (noise level, weight): every
    term's weight below that level (two experts, each with its own)."""

    def generate(params, vae_params, noise, conds, keys, guider):
        if experts is not None:
            guider = G.with_low_noise_weight(guider, *experts)
        den = make_denoiser(params)
        if guider.cads is not None and embed_conditions is not None:
            conds = embed_conditions(den, conds)
        x = S.sample(den, noise, conds, guider, sampler, keys=keys, num_layers=num_layers)
        images = decode(vae_params, x) if decode is not None else x
        return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

    return generate


def global_array(host: np.ndarray, spec) -> jax.Array:
    """A batch-sharded global array from the host copy every process holds."""
    return jax.make_array_from_callback(host.shape, spec, lambda idx: host[idx])


@dataclasses.dataclass
class Pipeline:
    """A model's parts, called for images (module docstring).

    Attributes:
      model_config: the denoiser's config dict (kind, num_layers, sample_size, ...).
      params: its parameters, placed on ``mesh``.
      make_denoiser: params -> denoiser, called inside the compiled program.
      sampler: the time grid and solver of ``settings.sampler.steps``.
      mesh, rules: the devices and the logical -> mesh axis rules.
      settings: the settings sections (``erg_jax.settings.sections()``) the parts come
        from; a call reads text, sampler and guidance there.
      vae_params, decode: the VAE's parameters and (vae_params, latents) -> images in
        [-1, 1]; None in pixel space.
      text_encoders: in ``settings.text.layout``'s order (None: a pipeline's absent T5);
        None for a class model.
      sources: where published parts came from (another number of steps reads the same
        scheduler).
      recipe: the kind's recipe ``load`` started from ("" when built otherwise).
    """

    model_config: dict
    params: Any
    make_denoiser: Callable
    sampler: S.Sampler
    mesh: Any
    settings: Any
    vae_params: Any = None
    decode: Callable | None = None
    text_encoders: list | None = None
    rules: tuple = sharding.DEFAULT_RULES
    sources: L.Sources = dataclasses.field(default_factory=lambda: L.Sources(None, ""))
    recipe: str = ""
    _programs: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        # parts made elsewhere (one device, the host) are replicated over the mesh; what
        # the loaders placed keeps its sharding
        devices = set(self.mesh.devices.flat)
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def place(a):
            held = getattr(a, "sharding", None)
            return (
                a
                if held is not None and held.device_set == devices
                else jax.device_put(a, replicated)
            )

        self.params = jax.tree_util.tree_map(place, self.params)
        self.vae_params = jax.tree_util.tree_map(place, self.vae_params)

    @property
    def kind(self) -> str:
        return str(self.model_config["kind"])

    @property
    def text(self) -> bool:
        """Conditioned on prompts (else on class ids)."""
        return registry.get(self.kind).text

    @property
    def num_layers(self) -> int:
        return int(self.model_config["num_layers"])

    @property
    def layout(self):
        """The model's blocks as layer targets name them (``guidance.Layout``)."""
        return registry.get(self.kind).make_layout(self.model_config)

    @property
    def num_classes(self) -> int:
        return int(self.model_config.get("num_classes", 0))

    @property
    def video(self) -> bool:
        """Samples are videos (n, frames, H, W, 3)."""
        return bool(registry.get(self.kind).video)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(h, w, c) of an image's latents, (frames, h, w, c) of a video's (settings.video)."""
        if self.video:
            v = self.settings.video
            entry = registry.get(self.kind)
            return entry.latent_shape(self.model_config, v.num_frames, v.height, v.width)
        side = int(self.model_config["sample_size"])
        return side, side, int(self.model_config["in_channels"])

    @property
    def batch_size(self) -> int:
        return int(self.settings.sampler.batch_size)

    @property
    def config_file(self) -> str:
        """ "configs/<name>.py:<recipe>", the sampling job's config of ``load``'s recipe."""
        if not self.recipe:
            raise ValueError("this Pipeline was not loaded from a recipe: it has no job config")
        return f"configs/{registry.get(self.kind).config_file}.py:{self.recipe}"

    # ---- building ---------------------------------------------------------------------

    @classmethod
    def from_settings(cls, config, *, workdir: str = "", recipe: str = "") -> Pipeline:
        """Checks settings sections and loads their parts: every error names its field
        before any weights are read. Published checkpoints convert into
        ``model.cache_dir`` (""= WORKDIR/converted)."""
        entry = registry.get(config.model.kind)
        settings_lib.check_video(config, entry)
        sources = L.resolve_sources(config, workdir)
        settings_lib.check_experts(
            config, bool(sources.pretrained and sources.pretrained.transformer_2)
        )
        L.check_scheduler(config.sampler, sources)
        if entry.text:
            L.text_folders(config.text, sources)  # missing folders are named before loading
        rules, mesh, _ = settings_lib.checked_layout(config)
        # the mesh context lets kernels outside GSPMD (splash attention) in the text
        # encoders shard themselves over the mesh
        with sharding.mesh_context(mesh, rules):
            key = jax.random.key(config.model.init_seed)
            mod, mcfg, params = L.load_model(config.model, mesh, key, sources)
            channels = int(mcfg["in_channels"])
            vae_params, decode = L.load_vae(
                config.vae, mesh, jax.random.fold_in(key, 1), channels, sources, bool(entry.video)
            )
            encoders = L.load_text_encoders(config, mesh, sources) if entry.text else None
        return cls(
            model_config=mcfg,
            params=params,
            make_denoiser=L.denoiser_maker(mod, mcfg, config),
            sampler=L.make_sampler(config.sampler, mcfg, sources),
            mesh=mesh,
            settings=config,
            vae_params=vae_params,
            decode=decode,
            text_encoders=encoders,
            rules=rules,
            sources=sources,
            recipe=recipe,
        )

    @classmethod
    def load(
        cls,
        path: str,
        *,
        variant: str = "",
        vae: str = "",
        fields: Mapping[str, Any] | None = None,
        cache_dir: str = "",
    ) -> Pipeline:
        """Loads a model folder, a diffusers pipeline folder or a .pt file (module docstring).

        Args:
          path: the model.
          variant: the kind's recipe to start from ("" = as the module docstring).
          vae: a launch.convert VAE folder (vae.checkpoint) or a diffusers AutoencoderKL
            folder (vae.pretrained).
          fields: more settings by dotted name, e.g. {"sampler.shift": 3.0,
            "text.encoders": "DIR,DIR,DIR", "model.dtype": "bfloat16"}.
          cache_dir: where published checkpoints are converted on first use ("" =
            $XDG_CACHE_HOME/erg_jax or ~/.cache/erg_jax).
        """
        path = resolve(str(path))  # models/... : the shipped copy outside a checkout
        kind, default, own = settings_lib.describe_path(path, vae)
        recipe = variant or default or registry.get(kind).recipe_names()[0]
        config = settings_lib.sections(kind, recipe)
        # each call names its methods and conditions
        own = dict(own, **{"text.prompts": "", "text.prompts_file": "", "guidance.methods": "none"})
        if "model.pretrained" in own or vae:  # what is converted goes there
            own["model.cache_dir"] = cache_dir or settings_lib.default_cache_dir()
        if vae:
            own["vae.checkpoint" if settings_lib.is_model_folder(vae) else "vae.pretrained"] = vae
            own.update({"vae.random_init": False, "vae.enabled": True})
        settings_lib.apply(config, own, "Pipeline.load")
        settings_lib.apply(config, dict(fields or {}), "Pipeline.load(fields=...)")
        if registry.get(config.model.kind).text and not (
            config.text.encoders or config.model.pretrained
        ):
            raise ValueError(
                f"Pipeline.load: {path} carries no text encoders: give "
                "fields={'text.encoders': 'DIR,...', 'text.tokenizers': 'DIR,...'}"
            )
        # one batch per data-parallel group of devices: the batch is a multiple of them
        data = sharding.data_parallel_size(sharding.mesh_from_config(dict(config.mesh)))
        config.sampler.batch_size = -(-config.sampler.batch_size // data) * data
        return cls.from_settings(config, recipe=recipe)

    def drop_text_encoders(self) -> None:
        """Frees the text encoders' device memory (prompts already encoded stay usable)."""
        for enc in self.text_encoders or []:
            if enc is not None:
                jax.tree_util.tree_map(lambda a: a.delete(), enc.params)
        self.text_encoders = None

    # ---- sampling ---------------------------------------------------------------------

    def program(self, steps: int | None = None):
        """(sampler, jitted (params, vae_params, noise, conds, keys, guider) -> images) of
        ``steps`` (None: the settings' sampler.steps), built once per number of steps;
        another number is checked as the settings are and reads the same scheduler."""
        steps = int(self.settings.sampler.steps) if steps is None else steps
        if steps not in self._programs:
            if steps == int(self.settings.sampler.steps):
                sampler = self.sampler
            else:
                section = self.settings.sampler.copy_and_resolve_references()
                settings_lib.apply(section, {"steps": steps}, "steps")
                L.check_scheduler(section, self.sources)
                sampler = L.make_sampler(section, self.model_config, self.sources)
            embed = registry.get(self.kind).embed_conditions
            low, ratio = float(self.settings.guidance.low_noise_scale), self.model_config.get(
                "boundary_ratio"
            )  # fmt: skip
            experts = (float(ratio), low) if low and ratio is not None else None
            fn = generate_fn(
                self.make_denoiser, sampler, self.num_layers, self.decode, embed, experts
            )
            self._programs[steps] = (sampler, jax.jit(fn))
        return self._programs[steps]

    def batch_spec(self, shape):
        """The NamedSharding of a batch-leading input on the mesh and rules."""
        return sharding.batch_sharding(self.mesh, shape, self.rules)

    def batch_inputs(self, seed: int, conditions, idx: np.ndarray, guider):
        """(noise, condition slots, keys) of global sample indices ``idx``, as global
        arrays split over the batch: sample i from fold_in(key(seed), i), condition i."""
        keys = S.sample_keys(seed, jnp.asarray(idx))
        noise = np.asarray(S.initial_noise(keys, self.latent_shape))
        key_data = np.asarray(jax.random.key_data(keys))
        conds = conditions.slots(idx, G.tempered_tau_c(guider))
        put = lambda a: global_array(np.asarray(a), self.batch_spec(np.shape(a)))
        return (
            put(noise),
            jax.tree_util.tree_map(put, conds),
            jax.random.wrap_key_data(put(key_data)),
        )

    def generate(self, guider, conditions, indices, *, seed: int = 0, steps=None):
        """Images of global sample indices for one guider: (len(indices), H, W, 3) float32
        in [-1, 1]. The indices are padded to whole batches (the padding rows dropped),
        so any subset gives the same images as the whole job."""
        _, fn = self.program(steps)
        idx = np.asarray(indices, np.int64)
        out = []
        for start in range(0, len(idx), self.batch_size):
            chunk = idx[start : start + self.batch_size]
            padded = np.concatenate([chunk, np.full(self.batch_size - len(chunk), chunk[-1])])
            noise, conds, keys = self.batch_inputs(seed, conditions, padded, guider)
            with sharding.mesh_context(self.mesh, self.rules):
                images = fn(self.params, self.vae_params, noise, conds, keys, guider)
            out.append(np.asarray(images)[: len(chunk)])
        return np.concatenate(out)

    def encode(self, prompts=None, tau_cs=(1.0,)):
        """Prompts (None: settings.text's) encoded strong, C-ERG tempered at each of
        ``tau_cs`` and the negatives (settings.text.negative_prompts) as null."""
        if self.text_encoders is None:
            raise ValueError("the text encoders were dropped (drop_text_encoders)")
        width = int(self.model_config.get("joint_attention_dim", 0))
        with sharding.mesh_context(self.mesh, self.rules):  # kernels that shard themselves
            return L.encode_prompts(self.settings, self.text_encoders, width, prompts, tau_cs)

    def conditions(self, items: list, guiders: Mapping[str, Any]):
        """The condition table of a call: prompts encoded at every C-ERG temperature the
        guiders ask for, or class ids."""
        if self.text:
            return self.encode(items, sorted({G.tempered_tau_c(g) for g in guiders.values()}))
        return ClassConditions(self.num_classes, items)

    def guidance(self, scale=None, **guidance) -> dict:
        """``guidance.make_guider``'s settings of a call: the settings' guidance section,
        with the call's scale, shape, interval and sections (typed values, kept as
        given) laid over it."""
        out = G.section_settings(self.settings.guidance)
        for key, value in guidance.items():
            if key in G.COMMON:
                out[key] = value
            elif isinstance(out.get(key), dict):
                if not isinstance(value, Mapping):
                    raise ValueError(
                        f"{key}= takes {key}'s settings as a dict, e.g. {key}=dict("
                        f"{next(iter(out[key]))}=...), got {value!r}"
                    )
                out[key] = {**out[key], **value}
            else:
                raise ValueError(
                    f"{key!r} is not a guidance setting a call takes; settings: "
                    f"{sorted(set(out) - {'scale'})}"
                )
        if scale is not None:
            out["scale"] = scale
        return out

    def __call__(
        self,
        prompts_or_classes: Sequence[str] | Sequence[int],
        methods: Sequence[str] | str = ("cfg", "erg"),
        *,
        seed: int = 0,
        steps: int | None = None,
        scale: float | None = None,
        num_frames: int | None = None,
        **guidance,
    ) -> Samples:
        """Samples every method from the same noise: sample i from fold_in(seed, i).

        Args:
          prompts_or_classes: prompts for a text model, class ids for a class model.
          methods: method names ("none", "cfg", "erg", "erg+apg", "pag", ...).
          seed, steps, scale: the seed, sampler.steps and guidance.scale (None: the
            settings').
          num_frames: a video model's frames per sample (None: settings.video's); 4k + 1
            for Wan, whose VAE makes 4 frames of each latent frame after the first.
          **guidance: ``guidance.make_guider``'s settings over the settings': shape,
            interval, and a dict per method or modifier (erg=dict(tau=0.5, layers=[3, 4],
            kappa=0.1, tau_c=0.5), apg=dict(momentum=-0.5), cache=dict(every=2), ...).
        """
        conditions = check_conditions(prompts_or_classes, self.kind, self.text, self.num_classes)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"seed takes an int, got {seed!r}")
        if num_frames is not None:  # this call's, the settings' again afterwards
            if not self.video:
                raise ValueError(f"num_frames: {self.kind} is an image model")
            own = self.settings.video.num_frames
            settings_lib.apply(self.settings, {"video.num_frames": num_frames}, "num_frames")
            try:
                return self(conditions, methods, seed=seed, steps=steps, scale=scale, **guidance)
            finally:
                self.settings.video.num_frames = own
        self.latent_shape  # noqa: B018  (a bad video size is named before anything runs)
        settings = self.guidance(scale, **guidance)
        guiders = G.make_guiders(methods, **settings)
        G.check_text_guiders(guiders, text=self.text, kind=self.kind)
        guiders = {m: G.resolve_targets(g, self.layout) for m, g in guiders.items()}
        for guider in guiders.values():
            check_layers(guider, self.num_layers)
        self.program(steps)  # a bad number of steps is named before the prompts are encoded
        table = self.conditions(conditions, guiders)
        indices = np.arange(len(conditions))
        images = {
            m: to_uint8(self.generate(g, table, indices, seed=int(seed), steps=steps))
            for m, g in guiders.items()
        }
        record = self._record(conditions, int(seed), steps)
        if self.video:
            record["video"] = self.settings.video.to_dict()
        described = {
            m: dict(record, guidance=dict(record["guidance"], **settings, methods=m))
            for m in guiders
        }
        return Samples(images, described, conditions)

    def _record(self, conditions: list, seed: int, steps: int | None) -> dict:
        """The settings fields of a call (its guidance added per method)."""
        d = self.settings.to_dict()
        sampler = dict(d["sampler"], **({} if steps is None else {"steps": steps}))
        cond = {"text": {"prompts": "|".join(conditions)}} if self.text else {
            "conditioning": {"classes": ",".join(map(str, conditions))}
        }  # fmt: skip
        return {
            "seed": seed,
            "output": {"num_samples": len(conditions)},
            "model": {k: d["model"][k] for k in MODEL_FIELDS},
            "sampler": sampler,
            "guidance": d["guidance"],
            **cond,
        }

    def job_flags(self, settings: Mapping) -> list[str]:
        """The launch.sample flags (less --workdir) that draw a method's images: the
        recipe's config file, then every field of the load and the call that differs
        from the recipe's settings, and the number of samples."""
        base = settings_lib.sections(self.kind, self.recipe)
        config = self.settings.copy_and_resolve_references()
        settings = dict(settings)
        output = settings.pop("output", {})
        settings_lib.apply(config, dict(settings_lib.flatten(settings)), "settings")
        new = dict(settings_lib.flatten(config.to_dict()))
        old = dict(settings_lib.flatten(base.to_dict()))
        flags = [f"--config={self.config_file}"]
        flags += [f"--config.{k}={v}" for k, v in new.items() if old.get(k) != v]
        flags += [f"--config.output.{k}={v}" for k, v in output.items()]
        return flags


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] to uint8 (round to nearest), as the sampling job writes its PNGs."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
