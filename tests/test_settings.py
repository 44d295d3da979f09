"""erg_jax.settings: the sections a Pipeline and a job are made from, each model kind's
recipes laid over them, and the one checked way of setting a field by its dotted name."""

import importlib

import pytest

from erg_jax import guidance as G
from erg_jax import settings
from erg_jax.models import registry


def test_every_section_and_the_guidance_factories_defaults():
    c = settings.sections()
    assert set(c.keys()) == {"seed", "model", "vae", "conditioning", "text", "video",
                             "sampler", "guidance", "mesh", "logical_axis_rules"}  # fmt: skip
    for name, section in G.defaults().items():
        assert c.guidance[name].to_dict() == section, name
    assert set(G.SECTION_FIELDS) <= set(c.guidance.keys())


@pytest.mark.parametrize("kind", registry.names())
def test_a_kinds_recipes_are_its_config_files_variants(kind):
    entry = registry.get(kind)
    module = importlib.import_module(f"configs.{entry.config_file}")
    assert tuple(module.VARIANTS) == entry.recipe_names()
    for recipe in entry.recipe_names():
        c = settings.sections(kind, recipe)
        assert c.model.kind == kind
        job = module.get_config(recipe).to_dict()
        # the job config is the recipe's sections plus the job's own
        assert {k: job[k] for k in c.keys()} == c.to_dict(), recipe
        for field, value in entry.recipe(recipe).items():
            node = c
            for part in field.split("."):
                node = node[part]
            node = node.to_dict() if hasattr(node, "to_dict") else node  # guidance.terms
            assert node == value, (recipe, field)
    assert (
        settings.sections(kind).to_dict()
        == settings.sections(kind, entry.recipe_names()[0]).to_dict()
    )


def test_recipes_differ_where_the_published_sizes_differ():
    medium, large = settings.sections("mmdit", "medium"), settings.sections("mmdit", "large")
    assert (medium.model.preset, large.model.preset) == ("sd3.5-medium", "sd3.5-large")
    assert medium.guidance.erg.layers != large.guidance.erg.layers
    assert (settings.sections("flux", "dev").guidance.distilled,
            settings.sections("flux", "schnell").guidance.distilled) == (3.5, 0.0)  # fmt: skip
    with pytest.raises(ValueError, match=r"mmdit recipe must be one of \('medium', 'large', "):
        settings.sections("mmdit", "xl")
    with pytest.raises(ValueError, match="model.kind must be one of"):
        settings.sections("unet")


def test_apply_sets_typed_values_and_names_what_it_refuses():
    c = settings.sections()
    fields = {"guidance.erg.layers": [3, 4], "guidance.scale": 2, "sampler.steps": 7,
              "guidance.cfg.interval": (0.1, 0.9)}  # fmt: skip
    settings.apply(c, fields, "here")
    assert c.guidance.erg.layers == "3,4"
    assert c.guidance.scale == 2.0 and isinstance(c.guidance.scale, float)
    assert c.sampler.steps == 7
    assert c.guidance.cfg.interval == (0.1, 0.9)  # a method's own window
    with pytest.raises(ValueError, match="here: 'sampler.stepz' is not a settings field"):
        settings.apply(c, {"sampler.stepz": 3}, "here")
    with pytest.raises(ValueError, match="'sampler' is not a settings field"):
        settings.apply(c, {"sampler": 3}, "here")
    with pytest.raises(ValueError, match="'seed.x' is not a settings field"):
        settings.apply(c, {"seed.x": 3}, "here")
    with pytest.raises(ValueError, match="here: sampler.steps takes a int, got 'many'"):
        settings.apply(c, {"sampler.steps": "many"}, "here")
    with pytest.raises(ValueError, match="'sampler.interval' is not a settings field"):
        settings.apply(c, {"sampler.interval": (0.0, 1.0)}, "here")  # not a guidance section
    with pytest.raises(ValueError, match="'guidance.erg.window' is not a settings field"):
        settings.apply(c, {"guidance.erg.window": (0.0, 1.0)}, "here")
    assert c.sampler.steps == 7  # a refused value changes nothing


def test_flatten_names_every_leaf_by_its_dotted_path():
    tree = {"a": 1, "b": {"c": 2, "d": {"e": (3, 4)}}}
    assert dict(settings.flatten(tree)) == {"a": 1, "b.c": 2, "b.d.e": (3, 4)}


def test_describe_path_reads_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        settings.describe_path(str(tmp_path / "nothing"), "")
    folder = tmp_path / "m"
    (folder / "params").mkdir(parents=True)
    (folder / "config.json").write_text('{"kind": "dit", "in_channels": 4}')
    with pytest.raises(ValueError, match="latent dit model .* give vae="):
        settings.describe_path(str(folder), "")
    kind, recipe, fields = settings.describe_path(str(folder), "vae-folder")
    assert (kind, recipe, fields["model.checkpoint"]) == ("dit", "", str(folder))
    (folder / "config.json").write_text('{"kind": "dit", "in_channels": 3}')
    kind, recipe, fields = settings.describe_path(str(folder), "")
    assert (recipe, fields["vae.enabled"], fields["sampler.steps"]) == ("tiny", False, 20)
    (folder / "config.json").write_text('{"kind": "unet", "in_channels": 3}')
    with pytest.raises(ValueError, match="holds a 'unet' model"):
        settings.describe_path(str(folder), "")


def test_describe_path_gives_each_source_its_exact_fields(tmp_path):
    folder = tmp_path / "m"
    (folder / "params").mkdir(parents=True)
    (folder / "config.json").write_text('{"kind": "mmdit", "in_channels": 3, "text_encoder": "E"}')
    kind, recipe, fields = settings.describe_path(str(folder), "")
    assert (kind, recipe) == ("mmdit", "tiny")
    assert fields == {
        "model.checkpoint": str(folder), "model.random_init": False, "model.preset": "",
        "model.overrides": "", "model.sample_size": 0, "vae.enabled": False,
        "sampler.solver": "", "sampler.shift": 1.0, "sampler.steps": 20,
        "text.layout": "single", "text.encoders": "E", "text.max_length": 0,
        "text.hidden_layers": "-1",
    }  # fmt: skip
    # an original .pt file: read when it loads, named the pipeline's way
    pt = tmp_path / "DiT-XL-2-256x256.pt"
    pt.write_bytes(b"not read yet")
    assert settings.describe_path(str(pt), "") == (
        "dit", "", {"model.pretrained": str(pt), "model.sample_size": 0}
    )  # fmt: skip
    # config.json without params/ is not a model folder
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text('{"kind": "dit", "in_channels": 3}')
    with pytest.raises(ValueError, match="neither an erg_jax model folder"):
        settings.describe_path(str(tmp_path / "half"), "")


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert settings.default_cache_dir() == str(tmp_path / "erg_jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings.default_cache_dir() == str(tmp_path / "home" / ".cache" / "erg_jax")


def test_checked_layout_names_the_attention_implementation_and_the_batch():
    c = settings.sections()
    c.mesh.data, c.mesh.tensor = 1, -1  # no data parallelism: any batch divides
    c.sampler.batch_size = 1
    rules, mesh, data = settings.checked_layout(c)
    assert data == 1 and mesh.shape["tensor"] == mesh.size
    c.sampler.batch_size = 0
    with pytest.raises(ValueError, match="sampler.batch_size must be >= 1, got 0"):
        settings.checked_layout(c)
    c.sampler.batch_size = 1
    c.model.attention_implementation = "flash"
    with pytest.raises(ValueError, match="model.attention_implementation must be ''"):
        settings.checked_layout(c)
    c.model.attention_implementation = "einsum"
    settings.checked_layout(c)
