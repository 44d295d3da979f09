"""Published checkpoints end to end: a diffusers pipeline folder in, diffusers' own images out.

Tiny SD3 and DiT pipelines are made by diffusers' own classes with random weights and
saved as published folders (tests/pipelines.py); diffusers samples them, and so does our
job through ``model.pretrained``, from the same starting latents, prompts or classes,
with CFG and 3 steps. The comparison covers tokenization, the text encoders, padding and
pooling, the scheduler's grid and shift, the transformer, the guidance rule and the VAE.
"""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pipelines
import pytest

from configs import dit as dit_config
from configs import sd3 as sd3_config
from erg_jax import checkpoint
from erg_jax import samplers as S
from erg_jax.jobs.job import generate
from erg_jax.jobs.job_setup import build_plan

torch = pytest.importorskip("torch", reason="the reference pipelines need torch")
pytest.importorskip("diffusers", reason="the reference pipelines need diffusers")

pytestmark = pytest.mark.parity
N = 8  # one batch over the 8 fake devices
LONG = " ".join(["a big red dog sitting on the mat"] * 12)  # > 77 CLIP and > 16 T5 tokens
PROMPTS = ["a photo of a cat", "a red car", LONG, "the dog"]
NEGATIVES = ["blue", ""]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _noise(seed: int, shape: tuple) -> np.ndarray:
    """Our job's starting latents of samples 0..N-1, NHWC."""
    return np.asarray(S.initial_noise(S.sample_keys(seed, np.arange(N)), shape))


def _nchw(x):
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def _ours(config, workdir, method="cfg"):
    plan = build_plan(config, str(workdir))
    return plan, generate(plan, method, np.arange(N)) * 0.5 + 0.5


def _sd3(folder, **fields):
    c = sd3_config.get_config("medium")
    c.model.pretrained = str(folder)
    c.model.dtype = c.model.param_dtype = c.text.dtype = ""
    c.guidance.methods, c.guidance.scale = "cfg", 4.0
    c.sampler.steps, c.sampler.batch_size = 3, N
    c.output.num_samples = N
    c.text.prompts = "|".join(PROMPTS)
    c.text.max_sequence_length = 16
    for key, value in fields.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def _dit(source, **fields):
    c = dit_config.get_config("xl2_256")
    c.model.sample_size = 0  # the tiny model's own
    c.model.pretrained = str(source)
    c.guidance.methods, c.guidance.scale = "cfg", 4.0
    c.sampler.steps, c.sampler.batch_size = 3, N
    c.output.num_samples = N
    for key, value in fields.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "pipeline"
    pipe = pipelines.make_sd3_pipeline(str(folder))
    latents = _noise(0, (8, 8, 16))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(N)]
    negatives = [NEGATIVES[i % len(NEGATIVES)] for i in range(N)]
    ref = pipelines.run_sd3(pipe, prompts, _nchw(latents), max_sequence_length=16)
    ref_neg = pipelines.run_sd3(
        pipe, prompts, _nchw(latents), negative_prompts=negatives, max_sequence_length=16
    )
    return folder, ref, ref_neg


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    folder = root / "pipeline"
    pipe = pipelines.make_dit_pipeline(str(folder))
    latents = _noise(0, (8, 8, 4))
    ref = pipelines.run_dit(pipe, list(range(N)), _nchw(latents))
    pt = root / "DiT-tiny-2-64x64.pt"
    pipelines.write_dit_pt(str(pt), pipe.transformer)
    return folder, ref, pt


def test_sd3_pipeline_folder_gives_diffusers_images(sd3, tmp_path, caplog):
    folder, ref, _ = sd3
    with caplog.at_level(logging.WARNING):
        plan, ours = _ours(_sd3(folder), tmp_path)
    assert rel_err(ours, ref) < 1e-3
    assert plan.conversions == {"transformer": "converted", "vae": "converted"}
    # The long prompt is cut as the reference cuts it, with a warning for each encoder.
    assert sum("truncated" in r.getMessage() for r in caplog.records) >= 3
    # A second run in the same workdir reuses the conversion.
    plan2, again = _ours(_sd3(folder), tmp_path)
    assert plan2.conversions == {"transformer": "reused", "vae": "reused"}
    np.testing.assert_array_equal(again, ours)


def test_sd3_negative_prompt_per_sample(sd3, tmp_path):
    folder, ref, ref_neg = sd3
    _, ours = _ours(_sd3(folder, text__negative_prompts="|".join(NEGATIVES)), tmp_path)
    assert rel_err(ours, ref_neg) < 1e-3
    assert rel_err(ref_neg, ref) > 1e-2  # the negative prompt matters


def test_sd3_scanned_blocks_and_shared_cache_dir(sd3, tmp_path):
    folder, ref, _ = sd3
    cache = tmp_path / "cache"
    c = _sd3(folder, model__scan_blocks=True, model__cache_dir=str(cache))
    plan, ours = _ours(c, tmp_path / "a")
    assert rel_err(ours, ref) < 1e-3
    assert len(os.listdir(cache)) == 2  # transformer and VAE, nothing half-written
    plan_b, _ = _ours(c, tmp_path / "b")  # another workdir, the same cache
    assert plan_b.conversions == {"transformer": "reused", "vae": "reused"}


def test_sd3_explicit_convert_equals_pretrained(sd3, tmp_path):
    from launch.convert import convert

    folder, ref, _ = sd3
    convert("diffusers-sd3", str(folder / "transformer"), str(tmp_path / "t"))
    convert("diffusers-vae", str(folder / "vae"), str(tmp_path / "v"))
    c = _sd3(folder, model__pretrained="", model__checkpoint=str(tmp_path / "t"))
    c.model.scan_blocks = False
    c.vae.checkpoint = str(tmp_path / "v")
    c.text.encoders = ",".join(str(folder / f"text_encoder{s}") for s in ("", "_2", "_3"))
    c.text.tokenizers = ",".join(str(folder / f"tokenizer{s}") for s in ("", "_2", "_3"))
    c.sampler.scheduler = str(folder / "scheduler")
    _, ours = _ours(c, tmp_path / "w")
    assert rel_err(ours, ref) < 1e-3


def test_dit_pipeline_folder_gives_diffusers_images(dit, tmp_path):
    folder, ref, _ = dit
    plan, ours = _ours(_dit(folder), tmp_path)
    assert plan.pipeline.sampler.solver == "ddim"  # the folder's DDIMScheduler, "leading" spacing
    np.testing.assert_array_equal(np.asarray(plan.pipeline.sampler.grid)[0], [666, 333, 0])
    assert rel_err(ours, ref) < 1e-3


def test_dit_pt_file_without_size_flags_equals_explicit_convert(dit, tmp_path):
    from launch.convert import convert

    folder, _, pt = dit
    vae = str(folder / "vae")
    with pytest.raises(ValueError, match="vae.pretrained: a .pt file carries no VAE"):
        build_plan(_dit(pt), str(tmp_path / "no-vae"))
    with pytest.raises(ValueError, match="model.sample_size is 32.*latent side 8"):
        build_plan(_dit(pt, vae__pretrained=vae, model__sample_size=32), str(tmp_path / "s"))
    _, from_pt = _ours(_dit(pt, vae__pretrained=vae), tmp_path / "a")
    convert("dit-pt", str(pt), str(tmp_path / "ckpt"))
    stored = checkpoint.read_config(str(tmp_path / "ckpt"))
    assert stored["sample_size"] == 8 and stored["num_classes"] == 1000
    c = _dit("", model__checkpoint=str(tmp_path / "ckpt"), vae__pretrained=vae)
    c.model.scan_blocks = False
    _, explicit = _ours(c, tmp_path / "b")
    np.testing.assert_allclose(explicit, from_pt, atol=1e-5)


def test_bfloat16_parts_restore_as_bfloat16_and_stay_close(sd3, tmp_path):
    folder, ref, _ = sd3
    c = _sd3(folder)
    c.model.dtype = c.model.param_dtype = c.text.dtype = c.vae.dtype = "bfloat16"
    plan, ours = _ours(c, tmp_path)
    for part in (plan.pipeline.params, plan.pipeline.vae_params):
        assert {str(a.dtype) for a in jax.tree_util.tree_leaves(part)} == {"bfloat16"}
    # Stored in bfloat16 by the conversion: nothing in float32 on the way in.
    (entry,) = [e for e in os.listdir(tmp_path / "converted") if e.startswith("diffusers-sd3")]
    stored, _ = checkpoint.restore(str(tmp_path / "converted" / entry))
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(stored)} == {"bfloat16"}
    assert rel_err(ours, ref) < 5e-2  # measured 2.7e-2: bfloat16 transformer, encoders and VAE


def test_bad_inputs_are_named_before_anything_loads(sd3, tmp_path):
    folder, _, _ = sd3
    not_pipeline = tmp_path / "transformer-only"
    shutil.copytree(folder / "transformer", not_pipeline)
    with pytest.raises(ValueError, match="model.pretrained.*not a diffusers pipeline folder"):
        build_plan(_sd3(not_pipeline), str(tmp_path / "w1"))

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ValueError, match="model.pretrained.*has no tokenizer_2/"):
        build_plan(_sd3(broken), str(tmp_path / "w2"))

    karras = tmp_path / "karras"
    shutil.copytree(folder, karras)
    path = karras / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(dict(cfg, use_karras_sigmas=True)))
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        build_plan(_sd3(karras), str(tmp_path / "w3"))

    with pytest.raises(ValueError, match="sampler.shift=5.0.*scheduler_overrides"):
        build_plan(_sd3(folder, sampler__shift=5.0), str(tmp_path / "w4"))
    with pytest.raises(ValueError, match="model.kind is 'dit'"):
        build_plan(_dit(folder), str(tmp_path / "w5"))
    for w in ("w1", "w2", "w3", "w4", "w5"):  # refused before any conversion
        assert not os.path.exists(tmp_path / w / "converted")


def test_sd3_without_t5_feeds_zeros_as_the_pipeline_does(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    folder = tmp_path / "no-t5"
    pipelines.make_sd3_pipeline(str(folder), with_t5=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(folder), text_encoder_3=None, tokenizer_3=None
    )
    pipe.set_progress_bar_config(disable=True)
    latents = _noise(0, (8, 8, 16))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(N)]
    ref = pipelines.run_sd3(pipe, prompts, _nchw(latents), max_sequence_length=16)
    _, ours = _ours(_sd3(folder), tmp_path / "w")
    assert rel_err(ours, ref) < 1e-3


def test_text_encoders_are_freed_once_the_prompts_are_encoded(sd3, tmp_path, monkeypatch):
    from erg_jax.models import text

    folder, _, _ = sd3
    loaded = []

    def spy(*args, **kw):
        loaded.append(load(*args, **kw))
        return loaded[-1]

    load = text.load_text_encoder
    monkeypatch.setattr(text, "load_text_encoder", spy)
    build_plan(_sd3(folder), str(tmp_path))
    assert len(loaded) == 3
    for enc in loaded:
        assert all(a.is_deleted() for a in jax.tree_util.tree_leaves(enc.params))


def test_scheduler_overrides_reach_the_grid(sd3, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder, _, _ = sd3
    c = _sd3(folder, sampler__scheduler_overrides="shift=5.0")
    plan = build_plan(c, str(tmp_path))
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(3)
    np.testing.assert_array_equal(np.asarray(plan.pipeline.sampler.grid), ref.sigmas.numpy())
    even = build_plan(_sd3(folder, sampler__scheduler="even", sampler__shift=3.0), str(tmp_path))
    assert even.pipeline.sampler.grid is None  # our evenly spaced grid, shifted by sampler.shift
