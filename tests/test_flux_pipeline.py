"""FLUX.1 pipeline folders end to end: a FluxPipeline folder in, diffusers' own images out.

Tiny FluxPipeline folders, dev-like (a guidance embedding, the dynamic shift) and
schnell-like (neither), are made by diffusers' own classes with random weights and saved
as published folders (tests/flux_pipelines.py); diffusers samples them, and so does our
job through ``model.pretrained`` with configs/flux.py, from the same starting latents
(ours, packed as FluxPipeline packs them) and prompts, 3 steps. The comparison covers
tokenization and truncation, CLIP-L's pooled output and T5's states without masks, the
pipeline's own sigmas and shift, the distilled guidance value, true CFG against negative
prompts, the transformer and the VAE's scale and shift. In bfloat16, the inputs of the
time and guidance embeddings are compared with the pipeline's own bfloat16 transformer on
FLUX.1 [dev]'s 28-step grid, where its roundings of 1000 t and 1000 g show.
"""

import os

import flax.linen as nn
import flux_pipelines
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import flux as flux_config
from configs import sd3 as sd3_config
from erg_jax import samplers as S
from erg_jax.jobs.job import generate
from erg_jax.jobs.job_setup import build_plan
from erg_jax.models import load_denoiser
from launch.convert import convert

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


def _flux(folder, variant="dev", **fields):
    c = flux_config.get_config(variant)
    c.model.pretrained = str(folder)
    c.model.sample_size = 8  # the tiny latents; the conversion stores FLUX.1's 128
    c.model.dtype = c.model.param_dtype = c.text.dtype = ""
    c.mesh.fsdp, c.mesh.data = 1, -1
    c.guidance.methods = "none"
    c.guidance.erg.layers = "2,3"  # the tiny model's single blocks
    c.sampler.steps, c.sampler.batch_size = 3, N
    c.output.num_samples = N
    c.text.prompts = "|".join(PROMPTS)
    c.text.max_sequence_length = 16
    for key, value in fields.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def _ours(config, workdir, *methods):
    plan = build_plan(config, str(workdir))
    images = [generate(plan, m, np.arange(N)) * 0.5 + 0.5 for m in methods or ("none",)]
    return plan, images


def _reference(guidance_embeds: bool, root):
    folder = root / "pipeline"
    pipe = flux_pipelines.make_flux_pipeline(str(folder), guidance_embeds=guidance_embeds)
    latents = _nchw(_noise(0, (8, 8, 16)))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(N)]
    out = {"folder": folder, "ref": flux_pipelines.run_flux(pipe, prompts, latents)}
    out["sigmas"] = pipe.scheduler.sigmas.numpy()  # the grid FluxPipeline just stepped on
    if guidance_embeds:
        out["ref_g1"] = flux_pipelines.run_flux(pipe, prompts, latents, guidance_scale=1.0)
        negatives = [NEGATIVES[i % len(NEGATIVES)] for i in range(N)]
        out["ref_cfg"] = flux_pipelines.run_flux(
            pipe, prompts, latents, true_cfg_scale=4.0, negative_prompts=negatives
        )
    return out


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return _reference(True, tmp_path_factory.mktemp("flux-dev"))


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return _reference(False, tmp_path_factory.mktemp("flux-schnell"))


def test_dev_folder_gives_diffusers_images_and_erg_changes_them(dev, tmp_path):
    plan, (none, erg) = _ours(
        _flux(dev["folder"], guidance__methods="none,erg"), tmp_path, "none", "erg"
    )
    assert rel_err(none, dev["ref"]) < 1e-3
    # The distilled guidance value matters, so the parity above checks it is 3.5.
    assert rel_err(dev["ref_g1"], dev["ref"]) > 1e-2
    # FluxPipeline's own sigmas linspace(1, 1/3, 3), dynamically shifted for 16 tokens.
    np.testing.assert_array_equal(np.asarray(plan.pipeline.sampler.grid), dev["sigmas"])
    assert plan.conversions == {"transformer": "converted", "vae": "converted"}
    assert np.mean(np.abs(erg - none)) > 1e-3  # I-ERG in blocks 2, 3 and C-ERG at 0.5


def test_schnell_folder_gives_diffusers_images(schnell, tmp_path):
    plan, (ours,) = _ours(_flux(schnell["folder"], "schnell"), tmp_path)
    assert rel_err(ours, schnell["ref"]) < 1e-3
    np.testing.assert_array_equal(np.asarray(plan.pipeline.sampler.grid), schnell["sigmas"])
    np.testing.assert_allclose(schnell["sigmas"], [1, 2 / 3, 1 / 3, 0], rtol=1e-6)


def test_true_cfg_with_negative_prompts_per_sample(dev, tmp_path):
    c = _flux(dev["folder"], text__negative_prompts="|".join(NEGATIVES))
    c.guidance.methods, c.guidance.scale = "cfg", 4.0
    _, (ours,) = _ours(c, tmp_path, "cfg")
    assert rel_err(ours, dev["ref_cfg"]) < 1e-3
    assert rel_err(dev["ref_cfg"], dev["ref"]) > 1e-2  # true CFG matters


def test_bad_inputs_are_named_before_anything_loads(dev, schnell, tmp_path):
    cases = {
        "layout": (_flux(dev["folder"], text__layout="single"), "text.layout must be 'flux'"),
        "no-scale": (_flux(dev["folder"], guidance__distilled=0.0), "guidance.distilled: this"),
        "schnell-scale": (
            _flux(schnell["folder"], "schnell", guidance__distilled=3.5),
            r"guidance.distilled=3.5: this FLUX.1 has no guidance embedding",
        ),
        "sweep": (
            _flux(dev["folder"], guidance__sweep="distilled=2,3.5"),
            "guidance.sweep cannot vary guidance.distilled",
        ),
    }
    sd3 = sd3_config.get_config("medium")
    sd3.model.pretrained = str(dev["folder"])
    cases["kind"] = (sd3, r"model.kind is 'mmdit'.*configs/flux.py")
    not_flux = sd3_config.get_config("tiny")
    not_flux.guidance.distilled = 3.5
    cases["other-kind"] = (not_flux, "model.kind 'mmdit' has none")
    for name, (config, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            build_plan(config, str(tmp_path / name))
        assert not os.path.exists(tmp_path / name / "converted"), name


def test_an_odd_latent_side_is_named_before_anything_compiles(dev, tmp_path):
    config = _flux(dev["folder"], model__sample_size=9)
    with pytest.raises(ValueError, match=r"model\.sample_size=9: .* must be even"):
        build_plan(config, str(tmp_path))


def _dev_grid(folder, steps: int = 28, tokens: int = 4096):
    """FluxPipeline's (timesteps, sigmas) of FLUX.1 [dev]'s default run, 28 steps at
    1024px (4096 tokens), from the folder's scheduler as FluxPipeline.__call__ makes them."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    c = sch.config
    mu = calculate_shift(
        tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
    )
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sch.timesteps, sch.sigmas[:steps].numpy()


def test_bfloat16_time_and_guidance_embeddings_match_the_pipelines(dev, tmp_path):
    """In bfloat16 FluxPipeline rounds t on the way to the time embedding (its timestep
    cast to the latents' dtype, / 1000, then * 1000 in the activations' dtype) and embeds
    the guidance 3.5 as 3504: the sinusoidal features (b, 256) that enter both embedding
    MLPs are compared on the dev grid, the model and the pipeline's transformer in bf16."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    folder = dev["folder"]
    timesteps, sigmas = _dev_grid(folder)
    b, bf16 = len(sigmas), torch.bfloat16
    ref = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=bf16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, 2, 2, 16)).astype(np.float32)  # one token
    context = rng.standard_normal((b, 4, ref.config.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((b, ref.config.pooled_projection_dim)).astype(np.float32)
    theirs = {}

    def keep(name):  # a pre-hook recording the first input of its module's first call
        def hook(module, args):
            theirs.setdefault(name, args[0].float().numpy())

        return hook

    embed = ref.time_text_embed
    for name in ("timestep_embedder", "guidance_embedder"):
        getattr(embed, name).register_forward_pre_hook(keep(name))
    embed.time_proj.register_forward_pre_hook(keep("t"))  # called with 1000 t, then 1000 g
    as_bf16 = lambda a: torch.from_numpy(a).to(bf16)  # noqa: E731
    with torch.no_grad():
        ref(
            hidden_states=FluxPipeline._pack_latents(as_bf16(x).permute(0, 3, 1, 2), b, 16, 2, 2),
            timestep=timesteps.expand(b).to(bf16) / 1000,  # FluxPipeline's call
            guidance=torch.full([b], 3.5, dtype=torch.float32),
            pooled_projections=as_bf16(pooled),
            encoder_hidden_states=as_bf16(context),
            txt_ids=torch.zeros(4, 3, dtype=bf16),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, 1, 1, "cpu", bf16),
        )
    # The grid is one where bfloat16's rounding moves 1000 t, by up to 2.
    moved = np.abs(theirs["t"] - 1000 * sigmas)
    assert moved.max() > 1

    convert("diffusers-flux", str(folder / "transformer"), str(tmp_path / "ckpt"))
    den = load_denoiser(str(tmp_path / "ckpt"), dtype="bfloat16", param_dtype="bfloat16")
    names = {"time_embed": "timestep_embedder", "guidance_embed": "guidance_embedder"}

    def features(x, t, cond):
        got = {}

        def grab(call, args, kwargs, context):
            if context.method_name == "__call__" and context.module.name in names:
                got[names[context.module.name]] = args[0]
            return call(*args, **kwargs)

        with nn.intercept_methods(grab):
            den(x, t, cond)
        return got

    as_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    cond = dict(context=as_bf16(context), pooled=as_bf16(pooled), guidance=jnp.full((b,), 3.5))
    ours = jax.jit(features)(as_bf16(x), jnp.asarray(sigmas), cond)
    for name in names.values():
        assert ours[name].dtype == jnp.bfloat16, name
        # sin and cos of equal arguments may round to neighbouring bfloat16 values
        np.testing.assert_allclose(
            np.asarray(ours[name], np.float32), theirs[name], atol=1e-2, err_msg=name
        )
