"""One call from a model folder to images per guidance method: the sampling job, in memory.

    pipe = Pipeline.load("models/demo-mmdit")
    out = pipe(["a small red circle in the upper left"], methods=("cfg", "erg"), scale=4.0)
    out.images["erg"]  # (n, H, W, 3) uint8: the bytes of the PNGs the job writes

``Pipeline.load`` takes
- a model folder written by ``launch.train`` or ``launch.convert`` (config.json and
  params). A pixel-space one (the shipped demo models) runs on the ``tiny`` variant of its
  configs/*.py without a VAE, with the quickstart's sampler (20 Euler steps on the even grid)
  and the text encoder its config.json names; a latent one on the config's default
  variant, with ``vae=`` and, for a text model, its text encoders given as job fields
  (``fields={"text.encoders": ..., "text.tokenizers": ...}``);
- a diffusers pipeline folder (model_index.json) or an original DiT / SiT .pt file: the
  config's default variant with ``model.pretrained`` = the path, converted on first use
  into ``cache_dir`` (a .pt file also needs ``vae=``).

Everything is the sampling job's (``erg_jax.jobs.job``): its config, its checks
(``job_setup.build_plan``), its loading and its compiled program, so sample i of a call,
drawn from the key fold_in(seed, i) and condition i, is the image ``python -m
launch.sample`` writes with the flags ``Pipeline.job_flags(out.settings[method])``. The
models stay loaded between calls; each guider structure compiles once per number of
steps, and the scale, tau, kappa, the seed and the prompts are data, so another call
with other values reuses the compiled program. One process (the job spans several hosts).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from erg_jax import guidance as G
from erg_jax import sharding
from erg_jax.conditioning import ClassConditions
from erg_jax.guidance.guider import check_layers
from erg_jax.jobs import job, output
from erg_jax.jobs import job_loading as L
from erg_jax.jobs.job_setup import build_plan, check_text_guiders, guidance_settings
from erg_jax.models import registry
from erg_jax.shipped_models import resolve

MODEL_FIELDS = ("checkpoint", "pretrained", "cache_dir", "kind", "preset")


@dataclasses.dataclass
class Samples:
    """What one Pipeline call returns.

    Legend: images[method] (n, H, W, C) uint8 in [0, 255], row i drawn from the key
    fold_in(seed, i) and condition i (the bytes of the job's PNG of sample i);
    settings[method]: the job config fields that draw them (seed, output, model, sampler,
    guidance, and text or conditioning), as nested dicts; conditions: the prompts or
    class ids, in order.
    """

    images: dict[str, np.ndarray]
    settings: dict[str, dict]
    conditions: list


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "erg_jax")


def _set(config, dotted: str, value, origin: str) -> None:
    """config[a][b] = value for "a.b", each error naming the field and where it came from."""
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        if p not in node:
            raise ValueError(f"{origin}: {dotted!r} is not a field of the job config")
        node = node[p]
    if leaf not in node or hasattr(node[leaf], "keys"):
        raise ValueError(f"{origin}: {dotted!r} is not a field of the job config")
    old = node[leaf]
    if isinstance(old, str) and isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)  # layers=[3, 4] -> "3,4"
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ValueError(f"{origin}: {dotted} takes a {type(old).__name__}, got {value!r}") from e


def _config_module(name: str):
    """configs/<name>.py: erg-jax's own erg_jax_configs (the installed wheel, or the
    checkout's folder under pip install -e), else a checkout's configs/ on sys.path."""
    try:
        return importlib.import_module(f"erg_jax_configs.{name}")
    except ModuleNotFoundError as e:
        if e.name != "erg_jax_configs":
            raise
    return importlib.import_module(f"configs.{name}")


def _is_model_folder(path: str) -> bool:
    """An erg_jax checkpoint (launch.train, launch.convert): config.json and params/."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
        os.path.join(path, "params")
    )


def _describe(path: str, vae: str) -> tuple[str, str, dict]:
    """(configs module, default variant, job fields) for a model path; bad paths named."""
    if not os.path.exists(path):
        raise ValueError(f"Pipeline.load: {path!r} does not exist")
    if _is_model_folder(path):
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
            return entry.config_file, "tiny", fields
        if not vae:
            raise ValueError(
                f"Pipeline.load: {path} holds a latent {kind} model "
                f"({mcfg.get('in_channels')} channels) and no VAE: give vae= a launch.convert "
                "--source=diffusers-vae folder or a diffusers AutoencoderKL folder"
            )
        return entry.config_file, "", fields
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(
            f"Pipeline.load: {path} is neither an erg_jax model folder (config.json and "
            "params/) nor a diffusers pipeline folder (model_index.json)"
        )
    from erg_jax.convert import pipeline as pipe

    entry = registry.for_pipeline(pipe.open_pretrained(path).kind)  # names a bad file
    return entry.config_file, "", {"model.pretrained": path, "model.sample_size": 0}


class Pipeline:
    """A loaded model and the sampling job's settings for it; call it for images.

    Attributes:
      config: the job config (a locked ConfigDict of ``config_file``) the calls start from.
      config_file: "configs/<name>.py:<variant>", for ``python -m launch.sample``.
      plan: the job's Plan (models on the devices, text encoders kept).
    """

    def __init__(self, config, config_file: str, plan):
        self.config, self.config_file, self.plan = config, config_file, plan
        self.text = registry.get(config.model.kind).text
        self.num_classes = int(plan.model_config.get("num_classes", 0))
        self._programs: dict = {}  # steps -> (sampler, the job's jitted program)

    @classmethod
    def load(
        cls,
        path: str,
        *,
        variant: str = "",
        vae: str = "",
        fields: dict | None = None,
        cache_dir: str = "",
    ) -> Pipeline:
        """Loads a model folder, a diffusers pipeline folder or a .pt file (module docstring).

        Args:
          path: the model.
          variant: the configs/*.py variant to start from ("" = as the module docstring).
          vae: a launch.convert VAE folder (vae.checkpoint) or a diffusers AutoencoderKL
            folder (vae.pretrained).
          fields: more job config fields by dotted name, e.g. {"sampler.shift": 3.0,
            "text.encoders": "DIR,DIR,DIR", "model.dtype": "bfloat16"}.
          cache_dir: where published checkpoints are converted on first use ("" =
            $XDG_CACHE_HOME/erg_jax or ~/.cache/erg_jax).
        """
        path = resolve(str(path))  # models/... : the shipped copy outside a checkout
        name, default, own = _describe(path, vae)
        module = _config_module(name)
        variant = variant or default
        config = module.get_config(variant or None)
        variant = variant or module.VARIANTS[0]
        cache_dir = cache_dir or _default_cache()
        # each call names its methods and conditions (and its methods' layers are checked then)
        own = dict(own, **{"output.progress": False, "text.prompts": "", "text.prompts_file": "",
                           "guidance.methods": "none"})  # fmt: skip
        if "model.pretrained" in own or vae:  # what is converted goes there
            own["model.cache_dir"] = cache_dir
        if vae:
            own["vae.checkpoint" if _is_model_folder(vae) else "vae.pretrained"] = vae
            own.update({"vae.random_init": False, "vae.enabled": True})
        for key, value in own.items():
            _set(config, key, value, "Pipeline.load")
        for key, value in (fields or {}).items():
            _set(config, key, value, "Pipeline.load(fields=...)")
        text = registry.get(config.model.kind).text
        if text and not config.text.encoders and not config.model.pretrained:
            raise ValueError(
                f"Pipeline.load: {path} carries no text encoders: give "
                "fields={'text.encoders': 'DIR,...', 'text.tokenizers': 'DIR,...'} (as the "
                f"job's text section for configs/{name}.py:{variant})"
            )
        # one batch per data-parallel group of devices: the batch is a multiple of them
        mesh = sharding.mesh_from_config(dict(config.mesh))
        data = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
        config.sampler.batch_size = -(-config.sampler.batch_size // data) * data
        plan = build_plan(config, cache_dir, keep_text_encoders=True)
        return cls(config, f"configs/{name}.py:{variant}", plan)

    def _conditions(self, items) -> list:
        """The call's conditions, checked against the model's kind before anything runs."""
        if isinstance(items, str | int) or not isinstance(items, Sequence) or not items:
            raise ValueError(
                "prompts_or_classes must be a non-empty list of "
                + ("prompts (str)" if self.text else "class ids (int)")
                + f", got {items!r}"
            )
        items = list(items)
        if self.text:
            bad = [x for x in items if not isinstance(x, str) or "|" in x]
            if bad:
                raise ValueError(
                    f"prompts_or_classes: {self.config.model.kind} is a text-to-image model: "
                    f"give prompts (str, without '|', the job's separator), got {bad[0]!r}"
                )
            items = [x.strip() for x in items]  # as the job reads text.prompts
            if "" in items and any(items):
                raise ValueError(
                    "prompts_or_classes: an empty prompt among others (the job skips it); "
                    "give only empty prompts for unconditional samples"
                )
            return items
        ok = lambda x: isinstance(x, int | np.integer) and not isinstance(x, bool)
        bad = [x for x in items if not ok(x) or not 0 <= int(x) < self.num_classes]
        if bad:
            raise ValueError(
                f"prompts_or_classes: {self.config.model.kind} is class-conditional: give "
                f"class ids, ints in [0, {self.num_classes}), got {bad[0]!r}"
            )
        return [int(x) for x in items]

    def job_config(self, conditions: list, methods, *, seed=0, steps=None):
        """The job config of a call but for its guidance (every field checked as the job
        checks it)."""
        c = self.config.copy_and_resolve_references()
        names = [methods] if isinstance(methods, str) else list(methods)
        _set(c, "guidance.methods", ",".join(names), "methods")
        for key, value in (("seed", seed), ("sampler.steps", steps)):
            if value is not None:
                _set(c, key, value, key.rpartition(".")[2])
        _set(c, "output.num_samples", len(conditions), "prompts_or_classes")
        if self.text:
            _set(c, "text.prompts", "|".join(conditions), "prompts_or_classes")
        else:
            _set(c, "conditioning.classes", ",".join(map(str, conditions)), "prompts_or_classes")
        return c

    def guidance(self, scale=None, **guidance) -> dict:
        """``guidance.make_guider``'s settings of a call: the loaded config's guidance
        section, with the call's scale, shape, interval and sections (typed values, kept
        as given) laid over it."""
        settings = guidance_settings(self.config.guidance)
        for key, value in guidance.items():
            if key in G.COMMON:
                settings[key] = value
            elif isinstance(settings.get(key), dict):
                if not isinstance(value, Mapping):
                    raise ValueError(
                        f"{key}= takes {key}'s settings as a dict, e.g. {key}=dict("
                        f"{next(iter(settings[key]))}=...), got {value!r}"
                    )
                settings[key] = {**settings[key], **value}
            else:
                raise ValueError(
                    f"{key!r} is not a guidance setting a call takes; settings: "
                    f"{sorted(set(settings) - {'scale'})}"
                )
        if scale is not None:
            settings["scale"] = scale
        return settings

    def _program(self, c):
        """(sampler, jitted program) of the call's number of steps, built once."""
        steps = int(c.sampler.steps)
        if steps not in self._programs:
            sampler = L.make_sampler(c.sampler, self.plan.model_config, self.plan.sources)
            plan = dataclasses.replace(self.plan, sampler=sampler)
            self._programs[steps] = (sampler, job.make_program(plan))
        return self._programs[steps]

    def __call__(
        self,
        prompts_or_classes: Sequence[str] | Sequence[int],
        methods: Sequence[str] | str = ("cfg", "erg"),
        *,
        seed: int = 0,
        steps: int | None = None,
        scale: float | None = None,
        **guidance,
    ) -> Samples:
        """Samples every method from the same noise: sample i from fold_in(seed, i).

        Args:
          prompts_or_classes: prompts for a text model, class ids for a class model.
          methods: names the job takes ("none", "cfg", "erg", "erg+apg", "pag", ...).
          seed, steps, scale: the job's seed, sampler.steps and guidance.scale (None:
            the config's).
          **guidance: ``guidance.make_guider``'s settings over the config's: shape,
            interval, and a dict per method or modifier (erg=dict(tau=0.5, layers=[3, 4],
            kappa=0.1, tau_c=0.5), apg=dict(momentum=-0.5), cache=dict(every=2), ...).
        """
        conditions = self._conditions(prompts_or_classes)
        c = self.job_config(conditions, methods, seed=seed, steps=steps)
        settings = self.guidance(scale, **guidance)
        guiders = G.make_guiders(c.guidance.methods, **settings)
        check_text_guiders(guiders, text=self.text, kind=self.config.model.kind)
        for guider in guiders.values():
            check_layers(guider, self.plan.num_layers)
        L.check_scheduler(c.sampler, self.plan.sources)
        sampler, program = self._program(c)
        if self.text:
            width = int(self.plan.model_config.get("joint_attention_dim", 0))
            tau_cs = sorted({G.tempered_tau_c(g) for g in guiders.values()})
            encoders = self.plan.text_encoders
            table = L.encode_prompts(c, encoders, width, conditions, tau_cs=tau_cs)
        else:
            table = ClassConditions(self.num_classes, conditions)
        plan = dataclasses.replace(
            self.plan, seed=int(c.seed), num_samples=len(conditions), sampler=sampler,
            methods=guiders, conditions=table, config_dict=c.to_dict(),
        )  # fmt: skip
        indices = np.arange(len(conditions))
        images = {
            m: output.to_uint8(job.generate(plan, m, indices, program=program)) for m in guiders
        }
        return Samples(images, {m: self._settings(c, m, settings) for m in guiders}, conditions)

    def _settings(self, c, method: str, guidance: dict) -> dict:
        d = c.to_dict()
        cond = {"text": {"prompts": d["text"]["prompts"]}} if self.text else {
            "conditioning": {"classes": d["conditioning"]["classes"]}
        }  # fmt: skip
        return {
            "seed": d["seed"],
            "output": {"num_samples": d["output"]["num_samples"]},
            "model": {k: d["model"][k] for k in MODEL_FIELDS},
            "sampler": d["sampler"],
            "guidance": dict(d["guidance"], **guidance, methods=method),
            **cond,
        }

    def job_flags(self, settings: dict) -> list[str]:
        """The launch.sample flags (less --workdir) that draw a method's images: the
        config file, then every field of the load and the call that differs from it."""
        module, _, variant = self.config_file.partition(":")
        base = _config_module(os.path.basename(module)[:-3]).get_config(variant)
        c = self.config.copy_and_resolve_references()
        for key, value in _flatten(settings):
            _set(c, key, value, "settings")
        flags = [f"--config={self.config_file}"]
        new, old = dict(_flatten(c.to_dict())), dict(_flatten(base.to_dict()))
        flags += [f"--config.{k}={v}" for k, v in new.items() if old.get(k) != v]
        return flags


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
