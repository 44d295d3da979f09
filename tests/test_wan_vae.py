"""Tests of the Wan 2.1 video VAE port (erg_jax.models.wan_vae) and its diffusers conversion.

Parity: a tiny random diffusers AutoencoderKLWan with the published layout (8x in space,
4x in time), saved with save_pretrained and converted, decodes model-space latents of 1
and 3 latent frames (non-square) to the video diffusers' chunked, cached decode gives
after the Wan pipeline's de-normalisation, and encodes a 9-frame video to diffusers'
moments. Properties without torch: decoding and encoding are causal in time, and the
compiled program does not grow with the frame count (the chunks run in one scan). A
mangled checkpoint fails loudly, and the full-size preset has exactly diffusers'
parameter count. Tests that need torch / diffusers skip without them (the `parity` extra).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest

from erg_jax.models.wan_vae import (
    WanAutoencoder,
    count_params,
    decode_raw,
    encode_raw,
    init_params,
    make_wan_vae,
    wan_vae_config,
)

# Latents (b, f, 4, 6, z): non-square, video frames 32 x 48.
LATENT_SIDES = (4, 6)


def _diffusers():
    torch = pytest.importorskip("torch", reason="parity needs torch (the `parity` extra)")
    diffusers = pytest.importorskip("diffusers", reason="parity needs diffusers")
    return torch, diffusers


def _close(ours, theirs, rtol=1e-4):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


def _tiny():
    return wan_vae_config("tiny", precision="highest")


@functools.cache
def _saved(root: str):
    """A tiny random diffusers AutoencoderKLWan saved under root: (folder, torch model)."""
    torch, diffusers = _diffusers()
    config = _tiny()
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(
        base_dim=config["base_dim"],
        z_dim=config["z_dim"],
        dim_mult=list(config["dim_mult"]),
        num_res_blocks=config["num_res_blocks"],
        temperal_downsample=list(config["temperal_downsample"]),
        latents_mean=list(config["latents_mean"]),
        latents_std=list(config["latents_std"]),
    ).eval()
    with torch.no_grad():  # RMS norm gammas start at one: move them, so a lost one shows
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.3 * torch.randn_like(p))
    folder = os.path.join(root, "wan_vae")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("wan_vae"))


@pytest.fixture(scope="module")
def converted(root):
    from erg_jax.convert.wan_vae import convert_diffusers_wan_vae

    folder, model = _saved(root)
    params, config = convert_diffusers_wan_vae(folder)
    return model, make_wan_vae(dict(config, precision="highest"), params), config


def _torch_video(torch, x):  # (b, F, H, W, c) -> (b, c, F, H, W)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def _channels_last(t):
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


@pytest.mark.parity
def test_converted_config_is_the_tiny_preset(converted):
    _, _, config = converted
    assert config == wan_vae_config("tiny")


@pytest.mark.parity
@pytest.mark.parametrize("frames", [1, 3])
def test_decode_matches_diffusers_chunked_decode(converted, frames):
    torch, _ = _diffusers()
    model, vae, config = converted
    latents = np.random.default_rng(frames).standard_normal((2, frames, *LATENT_SIDES, 4))
    latents = latents.astype(np.float32)
    shape = (1, config["z_dim"], 1, 1, 1)
    mean = torch.tensor(config["latents_mean"]).view(shape)
    inv_std = 1.0 / torch.tensor(config["latents_std"]).view(shape)
    with torch.no_grad():  # as WanPipeline decodes: latents / (1 / std) + mean
        ref = model.decode(_torch_video(torch, latents) / inv_std + mean).sample
    ref = _channels_last(ref)
    assert ref.shape == (2, 1 + 4 * (frames - 1), 32, 48, 3)
    assert 0.1 < np.std(ref) and np.mean(np.abs(ref) == 1.0) < 0.01  # not saturated
    _close(vae.decode(latents), ref)


@pytest.mark.parity
def test_encode_matches_diffusers_chunked_encode(converted):
    torch, _ = _diffusers()
    model, vae, config = converted
    video = np.random.default_rng(0).uniform(-1, 1, (1, 9, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(_torch_video(torch, video)).latent_dist
    mean, logvar = vae.moments(video)
    assert mean.shape == (1, 3, *LATENT_SIDES, 4)
    _close(mean, _channels_last(dist.mean))
    _close(logvar, _channels_last(dist.logvar))
    # As WanImageToVideoPipeline normalises: (mean - latents_mean) * (1 / latents_std).
    stats = (np.array(config["latents_mean"]), 1.0 / np.array(config["latents_std"]))
    _close(vae.encode(video), (_channels_last(dist.mean) - stats[0]) * stats[1])


@functools.cache
def _random_vae():
    """The tiny preset with random params drawn in numpy (XLA compiles a hundred
    jax.random draws slowly on CPU), norms away from one as in a trained model."""
    config = _tiny()
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return x / np.sqrt(np.prod(leaf.shape[:-1]))
        return 1.0 + 0.3 * x if name == "scale" else 0.1 * x

    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    return make_wan_vae(config, jax.tree_util.tree_map_with_path(draw, shapes))


def test_decoding_is_causal_in_time():
    vae = _random_vae()
    latents = np.random.default_rng(0).standard_normal((2, 3, *LATENT_SIDES, 4))
    latents = latents.astype(np.float32)
    changed = latents.copy()
    changed[:, 2] += 1.0
    a, b = np.asarray(vae.decode(latents)), np.asarray(vae.decode(changed))
    # Latent frame 2 decodes to video frames 5..8; the frames before cannot see it.
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.all(np.max(np.abs(a[:, 5:] - b[:, 5:]), axis=(0, 2, 3, 4)) > 1e-3)


def test_encoding_is_causal_in_time():
    vae = _random_vae()
    video = np.random.default_rng(0).uniform(-1, 1, (1, 9, 32, 48, 3)).astype(np.float32)
    changed = video.copy()
    changed[:, 8] = -changed[:, 8]
    a, b = np.asarray(vae.encode(video)), np.asarray(vae.encode(changed))
    # Frames 5..8 are the third chunk: only the third latent frame reads them.
    np.testing.assert_array_equal(a[:, :2], b[:, :2])
    assert np.max(np.abs(a[:, 2] - b[:, 2])) > 1e-3


def test_program_does_not_grow_with_the_frame_count():
    config = _tiny()
    module = WanAutoencoder(config)
    params = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    decode = jax.jit(functools.partial(decode_raw, module))
    encode = jax.jit(functools.partial(encode_raw, module))

    def convolutions(fn, *shape):
        x = jax.ShapeDtypeStruct(shape, np.float32)
        return fn.lower(params, x).as_text().count("stablehlo.convolution")

    assert convolutions(decode, 1, 2, 2, 2, 4) == convolutions(decode, 1, 9, 2, 2, 4)
    assert convolutions(encode, 1, 5, 16, 16, 3) == convolutions(encode, 1, 21, 16, 16, 3)


def test_encode_refuses_a_partial_chunk():
    vae = _random_vae()
    with pytest.raises(ValueError, match="1 \\+ 4 k frames, got 7"):
        vae.encode(np.zeros((1, 7, 16, 16, 3), np.float32))


def test_config_checks_the_latent_statistics():
    with pytest.raises(ValueError, match="latents_std has 3 entries, z_dim is 4"):
        wan_vae_config("tiny", latents_std=(1.0, 1.0, 1.0))


def _mangle(root, tmp_path, edit):
    from safetensors.numpy import load_file, save_file

    from erg_jax.convert.wan_vae import convert_diffusers_wan_vae

    folder, _ = _saved(root)
    os.symlink(os.path.join(folder, "config.json"), tmp_path / "config.json")
    name = "diffusion_pytorch_model.safetensors"
    tensors = load_file(os.path.join(folder, name))
    edit(tensors)
    save_file(tensors, os.path.join(tmp_path, name))
    convert_diffusers_wan_vae(str(tmp_path))


@pytest.mark.parity
def test_missing_tensor_is_named(root, tmp_path):
    key = "decoder.up_blocks.0.upsamplers.0.time_conv.bias"
    with pytest.raises(ValueError, match=f"missing tensor '{key}'"):
        _mangle(root, tmp_path, lambda t: t.pop(key))


@pytest.mark.parity
def test_wrong_shape_is_named(root, tmp_path):
    key = "encoder.down_blocks.2.conv_shortcut.weight"

    def edit(t):
        t[key] = np.zeros((16, 8, 3, 3, 3), np.float32)

    with pytest.raises(ValueError, match=f"'{key}' has shape"):
        _mangle(root, tmp_path, edit)


@pytest.mark.parity
def test_unknown_tensor_is_named(root, tmp_path):
    def edit(t):
        t["decoder.extra.weight"] = np.zeros((3,), np.float32)

    with pytest.raises(ValueError, match="unknown tensor.*decoder.extra.weight"):
        _mangle(root, tmp_path, edit)


def test_wan22_config_is_refused():
    from erg_jax.convert.wan_vae import config_from_diffusers

    with pytest.raises(ValueError, match="is_residual"):
        config_from_diffusers({"is_residual": True, "z_dim": 48})


@pytest.mark.parity
def test_published_preset_matches_diffusers_defaults():
    torch, diffusers = _diffusers()
    config = wan_vae_config()
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()
    assert tuple(ref.config.latents_mean) == config["latents_mean"]
    assert tuple(ref.config.latents_std) == config["latents_std"]

    def torch_count(module):
        return sum(p.numel() for p in module.parameters())

    assert count_params(shapes["encoder"]) == torch_count(ref.encoder)
    assert count_params(shapes["decoder"]) == torch_count(ref.decoder)
    assert count_params(shapes) == torch_count(ref) == 126_892_531
