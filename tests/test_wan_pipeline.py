"""Wan pipeline folders end to end: a WanPipeline folder in, diffusers' own frames out.

A tiny WanPipeline folder (tests/wan_pipelines.py: WanTransformer3DModel, AutoencoderKLWan,
UMT5EncoderModel with a tokenizer made here, UniPCMultistepScheduler with flow sigmas) is
sampled by diffusers and by our job through ``model.pretrained`` with configs/wan.py, from
the same starting latents (ours, moved to channels-first) and prompts, 3 UniPC steps. The
comparison covers the prompt cleaning, umT5 at 512 tokens with its padded rows zeroed,
the scheduler's flow sigmas and shift, the integer timesteps the transformer sees, CFG
against negative prompts, the transformer and the VAE's normalisation and causal decode.
The frames are compared as floats, before either side rounds them to 8 bits.
"""

import numpy as np
import pytest
import wan_pipelines

from configs import wan as wan_config
from erg_jax import samplers as S
from erg_jax.jobs.job import generate
from erg_jax.jobs.job_setup import build_plan

torch = pytest.importorskip("torch", reason="the reference pipeline needs torch")
pytest.importorskip("diffusers", reason="the reference pipeline needs diffusers")

pytestmark = pytest.mark.parity
N = 2
LATENTS = (3, 4, 6, 4)  # 9 frames of 32 x 48 pixels, 4 latent channels
PROMPTS = ["a red car  on the road", "the dog &amp; the cat"]  # cleaned as Wan cleans
NEGATIVES = ["blue", ""]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _noise(seed: int = 0) -> np.ndarray:
    """Our job's starting latents of samples 0..N-1, (b, f, h, w, c)."""
    return np.asarray(S.initial_noise(S.sample_keys(seed, np.arange(N)), LATENTS))


def _wan(folder, **fields):
    c = wan_config.get_config("t2v_1_3b")
    c.model.pretrained = str(folder)
    c.model.dtype = c.model.param_dtype = c.text.dtype = ""
    c.model.scan_blocks = False
    c.mesh.fsdp, c.mesh.data = 1, -1
    c.guidance.methods = "none"
    c.guidance.erg.layers = "blocks.1-2"
    c.sampler.steps, c.sampler.batch_size = 3, 8  # one batch over the 8 fake devices
    c.sampler.solver, c.sampler.shift = "", 1.0  # the folder's own UniPC and flow_shift
    c.output.num_samples = N
    c.video.num_frames, c.video.height, c.video.width = 9, 32, 48
    c.text.prompts = "|".join(PROMPTS)
    c.text.negative_prompts = ""
    for key, value in fields.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def _ours(config, workdir, *methods):
    plan = build_plan(config, str(workdir))
    return plan, [generate(plan, m, np.arange(N)) * 0.5 + 0.5 for m in methods or ("none",)]


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan") / "pipeline"
    pipe = wan_pipelines.make_wan_pipeline(str(folder))
    latents = _noise()
    out = {"folder": folder, "pipe": pipe}
    out["ref"] = wan_pipelines.run_wan(pipe, PROMPTS, latents)
    out["timesteps"] = pipe.scheduler.timesteps.numpy()
    out["ref_cfg"] = wan_pipelines.run_wan(
        pipe, PROMPTS, latents, guidance_scale=5.0, negative_prompts=NEGATIVES
    )
    return out


def test_folder_gives_diffusers_frames_and_erg_changes_them(wan, tmp_path):
    plan, (none, erg) = _ours(
        _wan(wan["folder"], guidance__methods="none,erg"), tmp_path, "none", "erg"
    )
    assert none.shape == (N, 9, 32, 48, 3)
    assert rel_err(none, wan["ref"]) < 1e-4
    assert plan.conversions == {"transformer": "converted", "vae": "converted"}
    assert plan.pipeline.sampler.solver == "unipc"
    assert np.mean(np.abs(erg - none)) > 1e-3  # I-ERG in blocks 1-2 and C-ERG at 0.5


def test_cfg_with_negative_prompts_per_sample(wan, tmp_path):
    c = _wan(wan["folder"], text__negative_prompts="|".join(NEGATIVES))
    c.guidance.methods, c.guidance.scale = "cfg", 5.0
    _, (ours,) = _ours(c, tmp_path, "cfg")
    assert rel_err(ours, wan["ref_cfg"]) < 1e-4
    assert rel_err(wan["ref_cfg"], wan["ref"]) > 1e-3  # CFG matters


def test_the_mp4s_hold_the_frames_and_a_killed_job_resumes(wan, tmp_path):
    """The job's MP4s decode to the frames it sampled, within H.264's error; a job whose
    second video is lost (as a kill before its rename leaves it) writes only that one."""
    import os

    from erg_jax.jobs import job as job_lib
    from erg_jax.jobs import output, video

    config = _wan(wan["folder"], video__crf=0)  # lossless luma; yuv420p halves the colour
    job_lib.run_sampling(config, str(tmp_path))
    first = output.sample_path(str(tmp_path), "none", 0, ".mp4")
    frames = video.read_mp4(first)
    assert frames.shape == (9, 32, 48, 3)
    luma = lambda x: np.asarray(x, np.float64) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    exact = np.clip(np.rint(wan["ref"][0] * 255.0), 0, 255)
    assert np.mean(np.abs(luma(frames) - luma(exact))) < 2.5  # 8-bit levels
    assert np.mean(np.abs(luma(frames) - luma(exact[::-1]))) > 10  # the order is kept
    stamp = os.stat(first).st_mtime_ns
    os.remove(output.sample_path(str(tmp_path), "none", 1, ".mp4"))
    summary = job_lib.run_sampling(config, str(tmp_path))
    assert summary["methods"]["none"]["written_now"] == 1
    assert os.stat(first).st_mtime_ns == stamp
    assert output.done_indices(str(tmp_path), "none") == {0, 1}


def test_bad_video_sizes_are_named_before_anything_loads(wan, tmp_path):
    cases = {
        "frames": ({"video__num_frames": 10}, r"video.num_frames=10 must be 4k \+ 1"),
        "height": ({"video__height": 40}, r"video.height=40 must be a multiple of 16"),
        "experts": ({"guidance__low_noise_scale": 3.0}, r"low_noise_scale=3.0: the model has one"),
    }
    for name, (fields, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            build_plan(_wan(wan["folder"], **fields), str(tmp_path / name))
        assert not (tmp_path / name / "converted").exists(), name


def test_two_experts_switch_at_the_folders_boundary(tmp_path):
    """A Wan 2.2-style folder (transformer_2, boundary_ratio 0.875): the high-noise expert
    runs while the timestep is >= 875, the low-noise one after, as in WanPipeline; with
    flow shift 3 the first of 3 UniPC steps (timestep 999) is the first expert's, the
    others (t 857, 600) the second's, so a swapped or single expert would differ."""
    folder = tmp_path / "pipeline"
    pipe = wan_pipelines.make_wan_pipeline(str(folder), seed=1, two_experts=True)
    latents = _noise()
    ref = wan_pipelines.run_wan(pipe, PROMPTS, latents, guidance_scale=4.0)
    assert pipe.scheduler.timesteps.numpy().tolist() == [999, 857, 600]
    c = _wan(folder, guidance__methods="cfg", guidance__scale=4.0)
    plan, (ours,) = _ours(c, tmp_path / "job", "cfg")
    assert plan.conversions == {
        "transformer": "converted",
        "transformer_2": "converted",
        "vae": "converted",
    }
    assert rel_err(ours, ref) < 1e-4
    # each expert with its own weight: WanPipeline's guidance_scale_2
    ref_2 = wan_pipelines.run_wan(pipe, PROMPTS, latents, guidance_scale=4.0, guidance_scale_2=2.0)
    c.guidance.low_noise_scale = 2.0
    _, (ours_2,) = _ours(c, tmp_path / "job2", "cfg")
    assert rel_err(ours_2, ref_2) < 1e-4
    assert rel_err(ref_2, ref) > 1e-3
    pipe.transformer_2 = pipe.transformer  # one expert throughout: a visibly other video
    assert rel_err(wan_pipelines.run_wan(pipe, PROMPTS, latents, guidance_scale=4.0), ref) > 1e-3


def test_the_pipeline_object_returns_the_same_videos(wan):
    """erg_jax.Pipeline.load(folder)(prompts, num_frames=...) gives (n, frames, H, W, 3)
    uint8, sample i from fold_in(seed, i): the reference's frames rounded."""
    from erg_jax import Pipeline

    fields = {"model.dtype": "", "model.param_dtype": "", "text.dtype": "", "video.height": 32,
              "video.width": 48, "video.num_frames": 5, "text.negative_prompts": "",
              "model.scan_blocks": False, "mesh.fsdp": 1, "mesh.data": -1}  # fmt: skip
    pipe = Pipeline.load(str(wan["folder"]), fields=fields, cache_dir=str(wan["folder"].parent))
    out = pipe(PROMPTS, methods="none", seed=0, steps=3, num_frames=9)
    video = out.images["none"]
    assert video.shape == (N, 9, 32, 48, 3) and video.dtype == np.uint8
    exact = np.clip(np.rint(wan["ref"] * 255.0), 0, 255)
    assert np.max(np.abs(video.astype(np.float64) - exact)) <= 1
    assert pipe.settings.video.num_frames == 5  # the call's frames were the call's alone
