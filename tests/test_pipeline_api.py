"""erg_jax.Pipeline: one call from a model folder to images, equal to the sampling job's.

On the shipped demo models: the text model's images are the PNGs ``python -m
launch.sample`` writes with the flags built from ``out.settings`` (the settings
round-trip through the job's own config); the class model's are the library sampler's
(load_denoiser, the guiders, samplers.sample), without the job's config or loading code.
A second call with another seed, scale, tau and kappa compiles nothing; bad inputs are
named before anything compiles. With torch and diffusers, a tiny DiT pipeline folder
gives diffusers' own images, and its converted checkpoint the same with vae=.
"""

import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import erg_jax
import erg_jax.models.dit
import erg_jax.settings
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax import sharding
from erg_jax.energy import Energy
from erg_jax.jobs import output
from erg_jax.pipeline import Pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not all(os.path.isdir(os.path.join(ROOT, "models", m)) for m in ("demo-dit", "demo-mmdit")),
    reason="the shipped demo models (models/) are missing",
)
PROMPTS = ["a small red circle in the upper left", "a large blue square in the center",
           "a medium green triangle on the right"]  # fmt: skip
COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compiles():
    """The names of the functions XLA compiles inside the block (JAX's monitoring events);
    the sampling job's program is "generate"."""
    seen = []

    def listen(event, duration, fun_name="", **kwargs):
        del duration, kwargs
        if event == COMPILE:
            seen.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="module")
def mmdit(tmp_path_factory):
    return Pipeline.load("models/demo-mmdit", cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return Pipeline.load("models/demo-dit", cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_the_package_exports_pipeline_lazily():
    code = (
        "import sys, erg_jax\n"
        "assert not [m for m in sys.modules if m.startswith('erg_jax.jobs')]\n"
        "from erg_jax.pipeline import Pipeline\n"
        "assert erg_jax.Pipeline is Pipeline and 'Pipeline' in erg_jax.__all__\n"
        # a library object: neither the jobs nor the configs load with it
        "bad = [m for m in sys.modules if m.startswith(('erg_jax.jobs', 'configs', 'launch'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_text_model_images_are_the_sampling_jobs_pngs(mmdit, tmp_path):
    settings = dict(tau=0.4, layers=[1, 2])
    out = mmdit(PROMPTS, methods=("cfg", "erg"), seed=3, steps=3, scale=5.0, erg=settings)
    erg = out.settings["erg"]
    assert (erg["seed"], erg["sampler"]["steps"], erg["guidance"]["scale"]) == (3, 3, 5.0)
    assert (erg["guidance"]["erg"]["tau"], erg["guidance"]["erg"]["layers"]) == (0.4, [1, 2])
    assert out.settings["cfg"]["guidance"]["methods"] == "cfg"
    both = dict(erg, guidance=dict(erg["guidance"], methods="cfg,erg"))
    workdir = tmp_path / "job"
    cmd = [sys.executable, "-m", "launch.sample", f"--workdir={workdir}"] + mmdit.job_flags(both)
    # the job compiles as this process does (conftest.py gives started jobs an
    # unoptimised compile), so the bytes can be compared
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split() if "device_count" in f)
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
    for method in ("cfg", "erg"):
        assert out.images[method].shape == (3, 32, 32, 3)
        assert out.images[method].dtype == np.uint8
        pngs = [output.read_png(output.sample_path(str(workdir), method, i)) for i in range(3)]
        np.testing.assert_array_equal(out.images[method], np.stack(pngs), err_msg=method)
    assert not np.array_equal(out.images["cfg"], out.images["erg"])


def test_class_model_images_are_the_library_samplers(dit):
    classes = [3, 17, 30]
    out = dit(
        classes, methods=("cfg", "erg"), seed=2, steps=3, scale=3.0, erg=dict(kappa=0.2, tau=0.6)
    )
    den = erg_jax.load_denoiser("models/demo-dit")  # the library's loader, not the job's
    keys = S.sample_keys(2, jnp.arange(3))
    noise = S.initial_noise(keys, (32, 32, 3))
    conds = {"cond": jnp.asarray(classes), "null": jnp.full(3, 36)}
    sampler = S.make_sampler("euler", 3, time="sd3")
    guiders = {
        "cfg": G.cfg(3.0),
        "erg": G.erg(3.0, energy=Energy(tau=0.6), kappa=0.2, condition="cond"),
    }
    for method, guider in guiders.items():
        x = S.sample(den, noise, conds, guider, sampler, keys=keys, num_layers=5)
        ref = output.to_uint8(np.clip(np.asarray(x), -1, 1)).astype(int)
        assert np.max(np.abs(out.images[method].astype(int) - ref)) <= 1, method
    assert out.settings["erg"]["conditioning"]["classes"] == "3,17,30"


def test_a_pipeline_of_typed_parts_draws_what_the_loaded_one_draws(dit):
    """Parts made by hand (the library's loader, sampler and mesh; no folder reading, no
    job config) give the images ``Pipeline.load``'s parts give."""
    den = erg_jax.load_denoiser("models/demo-dit")
    settings = erg_jax.settings.sections("dit")
    settings.sampler.steps = 3
    pipe = Pipeline(
        model_config=den.config,
        params=den.params,
        make_denoiser=lambda p: erg_jax.models.dit.make_denoiser(den.config, p),
        sampler=S.make_sampler("euler", 3, time="sd3"),
        mesh=sharding.mesh_from_config({"data": -1}),
        settings=settings,
    )
    ours = pipe([5, 6, 7], methods=("cfg", "pag"), seed=4, scale=2.5, pag=dict(layers=[2]))
    loaded = dit(
        [5, 6, 7], methods=("cfg", "pag"), seed=4, steps=3, scale=2.5, pag=dict(layers=[2])
    )
    for method in ("cfg", "pag"):
        np.testing.assert_array_equal(ours.images[method], loaded.images[method], err_msg=method)
    with pytest.raises(ValueError, match="not loaded from a recipe"):
        pipe.job_flags(ours.settings["cfg"])


def test_a_second_call_with_other_values_compiles_nothing(mmdit):
    first = mmdit(PROMPTS[:2], methods=("erg",), seed=0, steps=3, scale=4.0)
    with compiles() as seen:
        second = mmdit(PROMPTS[:2], methods=("erg",), seed=1, steps=3, scale=2.0, erg={"tau": 0.3})
        third = mmdit(PROMPTS[:2], methods=("erg",), seed=0, steps=3, scale=2.0, erg={"kappa": 0.5})
    assert not seen, seen
    # the new values reached the program: each call draws other images
    assert not np.array_equal(first.images["erg"], second.images["erg"])
    assert not np.array_equal(first.images["erg"], third.images["erg"])
    again = mmdit(PROMPTS[:2], methods=("erg",), seed=0, steps=3, scale=4.0)
    np.testing.assert_array_equal(first.images["erg"], again.images["erg"])


@pytest.mark.parametrize(
    "model, args, kwargs, match",
    [
        ("mmdit", ([3, 7],), {}, "prompts_or_classes: mmdit is a text-to-image model"),
        ("mmdit", ("a red circle",), {}, "prompts_or_classes must be a non-empty list"),
        ("mmdit", (["a red circle", " "],), {}, "an empty prompt among others"),
        ("dit", (["a red circle"],), {}, r"dit is class-conditional: give class ids"),
        ("dit", ([36],), {}, r"ints in \[0, 36\)"),
        ("dit", ([],), {}, "prompts_or_classes must be a non-empty list"),
        ("mmdit", (PROMPTS,), {"methods": ("cfg", "erg+foo")}, "guidance.methods"),
        ("mmdit", (PROMPTS,), {"foo": 1.0}, "'foo' is not a guidance setting"),
        ("mmdit", (PROMPTS,), {"tau": 0.5}, "'tau' is not a guidance setting"),
        ("mmdit", (PROMPTS,), {"erg": 0.5}, "erg= takes erg's settings as a dict"),
        ("mmdit", (PROMPTS,), {"erg": {"kappa": "late"}}, "erg kappa must be a number"),
        ("mmdit", (PROMPTS,), {"erg": {"tau": -1.0}}, "tau must be"),
        ("mmdit", (PROMPTS,), {"erg": {"taux": 1.0}}, "erg.taux is not a setting of erg"),
        ("mmdit", (PROMPTS,), {"erg": {"layers": [9]}}, "layer 9 in .* is past the model's depth"),
        ("dit", ([1],), {"steps": 0}, "sampler.steps must be >= 1"),
        ("dit", ([1],), {"sweep": "scale=2,3"}, "'sweep' is not a guidance setting"),
        ("dit", ([1],), {"erg": {"tau_c": 0.5}}, "guidance.erg.tau_c: erg tempers a text encoder"),
        ("dit", ([1],), {"erg": {"image_energy": False}}, "erg perturbs nothing"),
    ],
)
def test_bad_inputs_are_named_before_anything_compiles(request, model, args, kwargs, match):
    pipe = request.getfixturevalue(model)
    with compiles() as seen, pytest.raises(ValueError, match=match):
        pipe(*args, **kwargs)
    assert "generate" not in seen  # (a guider's layer mask may compile a small op)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Pipeline.load(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="neither an erg_jax model folder"):
        Pipeline.load(str(tmp_path))
    with pytest.raises(ValueError, match="'vae.nope' is not a settings field"):
        Pipeline.load("models/demo-dit", fields={"vae.nope": 1})


@pytest.mark.parity
def test_a_diffusers_folder_gives_diffusers_images_and_its_checkpoint_needs_vae(tmp_path):
    pytest.importorskip("torch", reason="the reference pipeline needs torch")
    pytest.importorskip("diffusers", reason="the reference pipeline needs diffusers")
    sys.path.insert(0, os.path.dirname(__file__))
    import pipelines

    folder = str(tmp_path / "dit")
    reference = pipelines.make_dit_pipeline(folder)
    classes = [0, 5, 999, 42]
    keys = S.sample_keys(0, jnp.arange(len(classes)))
    noise = np.asarray(S.initial_noise(keys, (8, 8, 4)))
    ref = pipelines.run_dit(reference, classes, np.transpose(noise, (0, 3, 1, 2)), steps=3)
    cache = str(tmp_path / "cache")
    pipe = Pipeline.load(folder, cache_dir=cache)
    out = pipe(classes, methods="cfg", steps=3, scale=4.0)
    assert pipe.config_file == "configs/dit.py:xl2_512"
    assert np.max(np.abs(out.images["cfg"] / 255.0 - ref)) < 1.5 / 255
    (ckpt,) = [os.path.join(cache, d) for d in os.listdir(cache) if d.startswith("diffusers-dit")]
    with pytest.raises(ValueError, match="latent dit model .* give vae="):
        Pipeline.load(ckpt)
    scheduler = {"sampler.scheduler": os.path.join(folder, "scheduler")}  # else the even grid
    vae = os.path.join(folder, "vae")
    again = Pipeline.load(ckpt, vae=vae, fields=scheduler, cache_dir=cache)
    assert again.config_file == pipe.config_file
    again = again(classes, "cfg", steps=3, scale=4.0)
    assert np.max(np.abs(again.images["cfg"].astype(int) - out.images["cfg"])) <= 1
