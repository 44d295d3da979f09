"""Published checkpoints as they are downloaded: diffusers pipeline folders and DiT .pt files.

``open_pretrained(path)`` says what a path holds and where each part sits:

- a diffusers pipeline folder (``model_index.json`` beside ``transformer/``, ``vae/``,
  ``scheduler/`` and, for Stable Diffusion 3 / 3.5, FLUX.1 and Wan, ``text_encoder*/``
  with their ``tokenizer*/``; Wan 2.2's ``transformer_2/``), as ``save_pretrained``
  writes it and the Hugging Face hub serves it;
- an original DiT / SiT ``.pt`` file (facebookresearch/DiT, willisma/SiT), whose size is
  read from its tensors.

``converted(...)`` turns the denoiser or the VAE into an erg_jax checkpoint once, in a
cache folder keyed by the source files and the conversion settings, and reuses it on
every later run. A conversion is written under a temporary name and renamed when
complete, so a job killed while converting converts again rather than reading half a
checkpoint. Text encoders need no conversion: their safetensors are read memory-mapped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil

from erg_jax.models import registry

logger = logging.getLogger(__name__)

PIPELINES = registry.pipeline_classes()  # diffusers _class_name -> Pretrained.kind
PT_SUFFIXES = (".pt", ".pth")
# Bumped when a converter's output changes, so old cache entries are not reused.
CONVERTER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """What a published checkpoint path holds.

    Attributes:
      kind: "sd3" (StableDiffusion3Pipeline folder), "flux" (FluxPipeline folder), "wan"
        (WanPipeline folder), "dit" (DiTPipeline folder) or "dit-pt" (an original DiT /
        SiT .pt file).
      path: the folder or file.
      transformer: the denoiser's folder (or the .pt file).
      vae: the VAE folder, or None (.pt files carry none).
      scheduler: the parsed scheduler_config.json, or None.
      text: (encoder folder, tokenizer folder) per text encoder, in the pipeline's order;
        None where the pipeline leaves one out (SD3 without T5).
      transformer_2: Wan 2.2's second expert (the low-noise transformer), or None.
      boundary_ratio: where the experts switch: the first runs while the model's timestep
        is >= boundary_ratio * num_train_timesteps (model_index.json), or None.
    """

    kind: str
    path: str
    transformer: str
    vae: str | None = None
    scheduler: dict | None = None
    text: tuple = ()
    transformer_2: str | None = None
    boundary_ratio: float | None = None


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the {what} {path}: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return out


def _component(root: str, index: dict, name: str, field: str) -> str | None:
    """The folder of one pipeline component; None where model_index.json sets it null."""
    entry = index.get(name)
    if entry is None or entry == [None, None]:
        return None
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        raise ValueError(f"{field}: {root} names '{name}' in model_index.json but has no {name}/")
    return folder


def open_pretrained(path: str, field: str = "model.pretrained") -> Pretrained:
    """Inspects a published checkpoint; every problem is a ValueError naming ``field``.

    Raises:
      ValueError: the path is missing, is not a pipeline folder or .pt file, is a
        pipeline of a kind we cannot run, or lacks a component or tokenizer it needs.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise ValueError(f"{field}: {path} does not exist")
    if os.path.isfile(path):
        if not path.endswith(PT_SUFFIXES):
            raise ValueError(
                f"{field}: {path} is a file but not a DiT / SiT .pt checkpoint "
                f"({', '.join(PT_SUFFIXES)}); give a .pt file or a diffusers pipeline folder"
            )
        return Pretrained("dit-pt", path, path)
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        hint = ""
        if os.path.isfile(os.path.join(path, "config.json")):
            hint = (
                " (it looks like a single model folder: convert it with python -m "
                "launch.convert and set model.checkpoint, or give the whole pipeline folder)"
            )
        raise ValueError(
            f"{field}: {path} is not a diffusers pipeline folder: no model_index.json{hint}"
        )
    index = read_json(index_path, "pipeline index")
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(
            f"{field}: {path} holds a {name!r}; supported pipelines: {sorted(PIPELINES)}"
        )
    kind = PIPELINES[name]
    parts = {}
    for comp in ("transformer", "vae", "scheduler"):
        parts[comp] = _component(path, index, comp, field)
        if parts[comp] is None:
            raise ValueError(f"{field}: the {name} in {path} has no {comp}")
    scheduler = read_json(
        os.path.join(parts["scheduler"], "scheduler_config.json"), "scheduler config"
    )
    text = ()
    if registry.for_pipeline(kind).text:  # its text encoders, in the layout's order
        pairs, conv = [], registry.converter(kind)
        for enc, tok in conv.text:
            e, t = _component(path, index, enc, field), _component(path, index, tok, field)
            if e is None and enc in conv.optional_text:
                pairs.append(None)
                continue
            if e is None:
                raise ValueError(f"{field}: the {name} in {path} has no {enc}")
            if t is None:
                raise ValueError(f"{field}: {path} has {enc}/ but no {tok}/ (its tokenizer)")
            pairs.append((e, t))
        text = tuple(pairs)
    second = _component(path, index, "transformer_2", field)
    ratio = index.get("boundary_ratio")
    if (second is None) != (ratio is None):
        raise ValueError(
            f"{field}: {path} has transformer_2 but no boundary_ratio in model_index.json "
            "(or the reverse); the two experts need both"
        )
    return Pretrained(
        kind, path, parts["transformer"], parts["vae"], scheduler, text, second,
        None if ratio is None else float(ratio),
    )  # fmt: skip


def _fingerprint(source: str, settings: dict) -> str:
    """A key for a conversion: the source files (path, size, mtime) and the settings."""
    files = []
    if os.path.isfile(source):
        files = [source]
    else:
        for root, _, names in os.walk(source):
            files += [os.path.join(root, n) for n in names]
    h = hashlib.sha256()
    h.update(json.dumps(dict(settings, version=CONVERTER_VERSION), sort_keys=True).encode())
    for f in sorted(files):
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def convert_component(source_kind: str, source: str, settings: dict) -> tuple:
    """(params, config) of one component; source_kind is a ``launch.convert`` source: a
    model kind's converter (``registry.Converter.source``) or "diffusers-vae"."""
    if source_kind == "diffusers-vae":
        from erg_jax.convert.vae import convert_diffusers_vae

        return convert_diffusers_vae(source, **settings)
    if source_kind == "diffusers-wan-vae":
        from erg_jax.convert.wan_vae import convert_diffusers_wan_vae

        return convert_diffusers_wan_vae(source, **settings)
    by_source = {c.source: c for c in registry.converters().values()}
    if source_kind not in by_source:
        raise ValueError(f"unknown conversion source {source_kind!r}")
    return registry.resolve(by_source[source_kind].convert)(source, **settings)


def converted(source_kind: str, source: str, cache_dir: str, **settings) -> tuple[str, bool]:
    """The erg_jax checkpoint of ``source``, converted into ``cache_dir`` on first use.

    Args:
      source_kind: "dit-pt", "diffusers-dit", "diffusers-sd3", "diffusers-flux",
        "diffusers-wan", "diffusers-vae" or "diffusers-wan-vae".
      source: the .pt file or the component folder.
      cache_dir: where conversions are kept (one sub-folder per source and settings).
      **settings: passed to the converter (param_dtype, scan_blocks, family, ...); part
        of the cache key.

    Returns:
      (checkpoint directory, True if it was converted now, False if reused).
    """
    import jax

    from erg_jax import checkpoint

    key = _fingerprint(source, dict(settings, kind=source_kind))
    name = f"{source_kind}-{os.path.basename(os.path.normpath(source))}-{key}"
    target = os.path.join(os.path.abspath(cache_dir), name)
    if os.path.isfile(os.path.join(target, checkpoint.CONFIG)):
        logger.info("reusing the conversion of %s in %s", source, target)
        return target, False
    # Every process converts (Orbax saves collectively); process 0 renames.
    partial = os.path.join(os.path.dirname(target), f".partial-{name}")
    if jax.process_index() == 0 and os.path.exists(partial):
        shutil.rmtree(partial)  # left by a killed conversion
    _barrier("erg_jax.convert: cache cleared")
    logger.info("converting %s (%s) into %s", source, source_kind, target)
    params, config = convert_component(source_kind, source, settings)
    checkpoint.save(partial, checkpoint.to_host_device(params), config)
    del params
    if jax.process_index() == 0:
        os.replace(partial, target)
    _barrier("erg_jax.convert: cache written")
    return target, True


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
