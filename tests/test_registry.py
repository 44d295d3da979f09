"""The model-kind registry (erg_jax.models.registry) against what it names: the model
modules, the configs/ files, the published checkpoints convert/pipeline.py opens and the
sources launch.convert takes. The expected tables here are written out, not read back
from the registry."""

import importlib
import json
import os

import pytest

from erg_jax.convert import pipeline as pipe
from erg_jax.models import registry

MODEL_API = ("make_denoiser", "init_params", "abstract_params", "param_axes")
# diffusers pipeline class -> the model.kind it converts into, as the README's models
PUBLISHED = {"StableDiffusion3Pipeline": "mmdit", "FluxPipeline": "flux", "DiTPipeline": "dit",
             "WanPipeline": "wan"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(registry.KINDS))
def test_every_kind_resolves_its_module_and_its_config_file_samples_it(name):
    entry = registry.get(name)
    module = entry.module()
    assert module.__name__ == f"erg_jax.models.{name}"
    missing = [f for f in (*MODEL_API, entry.preset, entry.network) if not hasattr(module, f)]
    assert not missing, missing
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
    assert os.path.isfile(os.path.join(path, f"{entry.config_file}.py"))
    config = importlib.import_module(f"configs.{entry.config_file}").get_config()
    assert config.model.kind == name
    # the config's preset is one of the kind's, and says so in its config dict
    preset = entry.make_config(config.model.preset)
    assert preset["kind"] == name
    assert ("guidance_embeds" in preset) == entry.distilled_guidance
    if entry.pipeline_layout:  # a published pipeline's text.layout is its config's own
        assert config.text.layout == entry.pipeline_layout


def _pipeline_folder(root, class_name: str) -> str:
    """A made-up diffusers pipeline folder: model_index.json and empty component folders."""
    parts = ["transformer", "vae", "scheduler"]
    parts += ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    parts += ["text_encoder_3", "tokenizer_3"] if class_name.startswith("StableDiffusion3") else []
    folder = root / class_name
    for p in parts:
        (folder / p).mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    index = {"_class_name": class_name, **{p: ["diffusers", "X"] for p in parts}}
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def test_for_pipeline_maps_every_published_checkpoint_convert_opens(tmp_path):
    assert set(pipe.PIPELINES) == set(PUBLISHED)
    for class_name, kind in PUBLISHED.items():
        src = pipe.open_pretrained(_pipeline_folder(tmp_path, class_name))
        assert registry.for_pipeline(src.kind).name == kind, class_name
        assert bool(src.text) == registry.get(kind).text, class_name
    pt = tmp_path / "DiT-XL-2-256x256.pt"
    pt.write_bytes(b"")
    assert registry.for_pipeline(pipe.open_pretrained(str(pt)).kind).name == "dit"


def test_converters_are_launch_converts_sources_and_resolve():
    from launch.convert import SOURCES, VAE_SOURCES

    found = registry.converters()
    assert sorted(c.source for c in found.values()) == sorted(set(SOURCES) - set(VAE_SOURCES))
    for c in found.values():
        assert callable(registry.resolve(c.convert)), c
        assert c.config is None or callable(registry.resolve(c.config)), c
    assert found["dit-pt"].config is None  # a .pt file holds no config: the preset stands in


def test_unknown_kinds_are_refused_by_name():
    with pytest.raises(
        ValueError,
        match=r"model.kind must be one of \('dit', 'mmdit', 'flux', 'wan'\), got 'ltx'",
    ):
        registry.get("ltx")
    with pytest.raises(ValueError, match=r"no model kind converts a 'ltx' checkpoint; known: \["):
        registry.for_pipeline("ltx")
    with pytest.raises(ValueError, match="unknown conversion source 'diffusers-ltx'"):
        pipe.convert_component("diffusers-ltx", "x", {})


def test_text_kinds_and_class_embedding():
    assert registry.names(text=True) == ("mmdit", "flux", "wan")
    for entry in registry.KINDS.values():  # CADS embeds class ids; text is embedded already
        assert (entry.embed_conditions is None) == entry.text

    class Den:
        def embed_classes(self, ids):
            return [i * 10 for i in ids]

    got = registry.get("dit").embed_conditions(Den(), {"cond": [1, 2], "null": [3]})
    assert got == {"cond": [10, 20], "null": [30]}
