"""The sequence across chips in the sampling job: a mesh axis "context" splits a video's
space-time tokens, the Wan denoiser's attention runs as Ulysses or ring attention over
it, and the job draws the same frames as with every sample on one device."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import wan as wan_configs
from erg_jax import checkpoint, settings, sharding
from erg_jax.jobs.job import generate
from erg_jax.jobs.job_setup import build_plan
from erg_jax.models import wan
from erg_jax.vae_loading import host_random_params

# 9 frames of 32 x 48: latents (3, 4, 6), a token grid (3, 2, 3) = 18 tokens, which 2
# context devices split evenly and 4 do not (ring attention pads them to 20 inside).
VIDEO = {"video.num_frames": 9, "video.height": 32, "video.width": 48}


def _tiny(**fields):
    """configs/wan.py:tiny (2 heads), two steps (I-ERG's kickoff 0.1 leaves the second
    on), the latents compared directly: the VAE holds no attention over the sequence."""
    c = wan_configs.get_config("tiny")
    own = {"sampler.steps": 2, "sampler.batch_size": 8, "guidance.methods": "cfg,erg"}
    settings.apply(c, {**own, **VIDEO, "vae.enabled": False, **fields}, "test")
    return c


def _checkpoint(path: str) -> str:
    """The tiny recipe's Wan with host-drawn weights, saved: each job restores it onto
    its own mesh instead of compiling a random init for it."""
    config = wan.wan_config("tiny", text_dim=384)  # the recipe's preset and overrides
    checkpoint.save(path, host_random_params(wan.abstract_params(config), 0), config)
    return path


def _collectives(plan, method: str) -> str:
    """The job program's lowered text, for the collectives of its attention."""
    pipe, guider = plan.pipeline, plan.methods[method]
    _, fn = pipe.program()
    args = pipe.batch_inputs(plan.seed, plan.conditions, np.arange(pipe.batch_size), guider)
    with sharding.mesh_context(pipe.mesh, pipe.rules):
        return fn.lower(pipe.params, pipe.vae_params, *args, guider).as_text()


def test_context_split_jobs_draw_the_frames_of_one_device_per_sample(tmp_path):
    # data=8: every sample computed whole on its own device, the reference
    meshes = {
        "whole": {"mesh.data": 8},
        # 2 heads over 2 context devices: "" picks Ulysses; 9 tokens a device
        "ulysses": {"mesh.data": 4, "mesh.context": 2},
        # 2 heads do not split over 4: "" picks ring attention
        "ring": {"mesh.data": 2, "mesh.context": 4},
    }
    weights = {"model.checkpoint": _checkpoint(str(tmp_path / "ckpt")), "model.random_init": False}
    frames = {}
    for name, mesh in meshes.items():
        plan = build_plan(_tiny(**mesh, **weights), str(tmp_path / name))
        assert plan.pipeline.mesh.axis_names == sharding.MESH_AXES
        for method in ("cfg", "erg"):
            frames[name, method] = generate(plan, method, np.arange(8))
        # Ulysses trades the split for heads (all-to-all); the ring passes key blocks on
        # (collective permutes), as the cross-attention does under either
        text = _collectives(plan, "erg")
        assert ("all_to_all" in text) == (name == "ulysses")
        assert ("collective_permute" in text) == (name != "whole")
    for method in ("cfg", "erg"):
        ref = frames["whole", method]
        assert ref.shape == (8, 3, 4, 6, 4)
        for name in ("ulysses", "ring"):
            err = np.max(np.abs(frames[name, method] - ref)) / np.max(np.abs(ref))
            assert err < 2e-5, (name, method, err)
    # the comparison sees guidance: ERG's frames are not CFG's
    assert np.max(np.abs(frames["whole", "erg"] - frames["whole", "cfg"])) > 1e-2


@pytest.mark.parametrize(
    "fields, match",
    [
        (
            {"mesh.data": 2, "mesh.context": 4, "model.attention_implementation": "einsum"},
            r"model.attention_implementation='einsum'.*mesh.context=4",
        ),
        ({"model.attention_implementation": "ring"}, r"'ring'.*mesh.context=1"),
        ({"model.attention_implementation": "ulysses"}, r"'ulysses'.*mesh.context=1"),
        # the batch splits over data x fsdp only: context devices share their samples
        ({"mesh.data": 2, "mesh.context": 4, "sampler.batch_size": 3}, r"data x fsdp = 2\)"),
        ({"logical_axis_rules": "length=pipe"}, r"length='pipe'.*'context'"),
    ],
)
def test_settings_that_cannot_split_the_sequence_name_their_fields(fields, match):
    c = settings.sections("wan", "tiny")
    settings.apply(c, fields, "test")
    with pytest.raises(ValueError, match=match):
        settings.checked_layout(c)


def test_the_context_axis_in_the_mesh_and_the_rules():
    c = settings.sections("wan", "tiny")
    settings.apply(c, {"mesh.data": 2, "mesh.context": 4, "sampler.batch_size": 2}, "test")
    rules, mesh, data = settings.checked_layout(c)
    # MESH_AXES' order, not the ConfigDict's sorted keys: context next to tensor
    assert mesh.axis_names == ("data", "fsdp", "context", "tensor") and data == 2
    assert sharding.logical_spec(("batch", "length", None), (2, 12, 8), mesh, rules) == P(
        "data", "context", None
    )
    # a length the context devices do not divide stays whole
    assert sharding.logical_spec(("batch", "length"), (2, 18), mesh, rules) == P("data", None)
    assert dict(sharding.parse_rules("length="))["length"] is None
    assert dict(sharding.parse_rules("batch=data+context"))["batch"] == ("data", "context")


@pytest.mark.parametrize(
    "mesh, heads, given, picked",
    [
        ({"context": 8}, 40, "", "ulysses"),  # Wan 14B on 8
        ({"data": 2, "context": 4}, 12, None, "ulysses"),  # Wan 1.3B on 4
        ({"context": 8}, 12, "", "ring"),  # ... on 8: 12 heads do not split 8 ways
        ({"context": 4, "tensor": 2}, 12, "", "ring"),  # 6 heads a device after tensor
        ({"context": 2, "tensor": 4}, 10, "", "ulysses"),  # tensor keeps 10 whole: 10 / 2
        ({"context": 8}, 12, "ulysses", "ulysses"),  # given: kept (context_parallel checks)
        ({"context": 8}, 40, "einsum", "einsum"),  # the dry run's FLOP count
        ({"data": 8}, 40, "ring", None),  # no sequence to split: the local pick
        ({"data": 8, "context": 1}, 40, "", None),
    ],
)
def test_the_attention_the_context_axis_picks(mesh, heads, given, picked):
    import jax

    # outside a mesh (a model initialised alone) nothing is split
    local = None if given in (None, "", "ring", "ulysses") else given
    assert sharding.sequence_attention(given, heads) == local
    with jax.set_mesh(sharding.make_mesh(mesh)):
        assert sharding.sequence_attention(given, heads) == picked


def test_an_image_model_refuses_a_context_axis(tmp_path):
    """Only a kind whose attention splits its sequence (the registry's context_parallel)
    takes mesh.context > 1: an image model would silently run each sample whole."""
    from configs import dit as dit_configs

    config = dit_configs.get_config("tiny")
    config.mesh.data, config.mesh.context = 4, 2
    config.model.attention_implementation = "ring"
    with pytest.raises(ValueError, match=r"mesh.context=2: dit does not split its sequence"):
        build_plan(config, str(tmp_path))
