"""Tests of the AutoencoderKL port (erg_jax.models.vae) and its diffusers conversion.

Parity: a tiny random diffusers AutoencoderKL (4 latent channels with quant convs, and
16 with a shift and no quant convs, as SD3) saved with save_pretrained, converted, gives
the same encoder moments, decoded images and model-space latents as diffusers with the
latent scaling its pipelines use. A mangled checkpoint fails loudly, and the full-size
presets have exactly diffusers' parameter counts. Tests that need torch / diffusers skip
without them (the `parity` extra).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import numpy as np
import pytest

from erg_jax.models.vae import init_params, make_vae, vae_config

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
VARIANTS = {
    "sd4": dict(latent_channels=4, scaling_factor=0.18215),
    "sd3_16": dict(
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


def _diffusers():
    torch = pytest.importorskip("torch", reason="parity needs torch (the `parity` extra)")
    diffusers = pytest.importorskip("diffusers", reason="parity needs diffusers")
    return torch, diffusers


def _close(ours, theirs, rtol=1e-4):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


@functools.cache
def _saved(variant: str, root: str):
    """A tiny random diffusers VAE saved under root; returns (folder, torch model)."""
    torch, diffusers = _diffusers()
    torch.manual_seed(0)
    n = len(TINY["block_out_channels"])
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=16,
        **TINY,
        **VARIANTS[variant],
    ).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped scale / bias would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    folder = os.path.join(root, variant)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vae"))


def _weights(folder):
    return os.path.join(folder, "diffusion_pytorch_model.safetensors")


@pytest.mark.parity
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encode_decode_match_diffusers(variant, root):
    from erg_jax.convert.vae import convert_diffusers_vae

    torch, _ = _diffusers()
    folder, model = _saved(variant, root)
    params, config = convert_diffusers_vae(folder)
    assert config["kind"] == "vae" and config["latent_channels"] == model.config.latent_channels
    assert ("quant_conv" in params) == (variant == "sd4")
    vae = make_vae(dict(config, precision="highest"), params)
    sf, shift = model.config.scaling_factor, model.config.shift_factor or 0.0
    assert (config["scaling_factor"], config["shift_factor"]) == (sf, shift)

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z_model = rng.standard_normal((2, 8, 8, config["latent_channels"])).astype(np.float32)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
    with torch.no_grad():
        dist = model.encode(nchw(images)).latent_dist
        # As the SD3 / DiT pipelines decode: latents / scaling_factor + shift_factor.
        decoded = model.decode(nchw(z_model) / sf + shift).sample
    mean, logvar = vae.encode(images)
    _close(mean, nhwc(dist.mean))
    _close(logvar, nhwc(dist.logvar))
    _close(vae.decode(z_model), nhwc(decoded))
    # As SD3 img2img encodes: (mean - shift_factor) * scaling_factor.
    _close(vae.encode_latents(images), (nhwc(dist.mean) - shift) * sf)


@pytest.mark.parity
def test_old_attention_key_layout_converts_the_same(root, tmp_path):
    from safetensors.numpy import load_file, save_file

    from erg_jax.convert.vae import convert_diffusers_vae

    folder, _ = _saved("sd4", root)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in load_file(_weights(folder)).items():
        for new, was in renames.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{was}.")
        old[key] = value
    assert any(".proj_attn." in k for k in old)
    os.symlink(os.path.join(folder, "config.json"), tmp_path / "config.json")
    save_file(old, _weights(tmp_path))
    a, _ = convert_diffusers_vae(folder)
    b, _ = convert_diffusers_vae(str(tmp_path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parity
def test_bf16_weights_convert_leaf_by_leaf_to_bf16_params(root, tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    from erg_jax.convert.vae import convert_diffusers_vae
    from erg_jax.weights import read_state_dict

    folder, _ = _saved("sd4", root)
    os.symlink(os.path.join(folder, "config.json"), tmp_path / "config.json")
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(_weights(folder)).items()}
    save_file(bf16, _weights(tmp_path))
    assert all(isinstance(v, np.memmap) for v in read_state_dict(_weights(tmp_path)).values())
    f32, config32 = convert_diffusers_vae(folder)
    got, config = convert_diffusers_vae(str(tmp_path), param_dtype="bfloat16")
    assert (config32["param_dtype"], config["param_dtype"]) == ("float32", "bfloat16")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(f32), strict=True):
        assert a.dtype == ml_dtypes.bfloat16 and not isinstance(a, np.memmap)
        np.testing.assert_array_equal(a, b.astype(ml_dtypes.bfloat16))
    z = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    _close(make_vae(config, got).decode(z), make_vae(config32, f32).decode(z), rtol=5e-2)


def _mangle(root, tmp_path, edit):
    from safetensors.numpy import load_file, save_file

    from erg_jax.convert.vae import convert_diffusers_vae

    folder, _ = _saved("sd4", root)
    os.symlink(os.path.join(folder, "config.json"), tmp_path / "config.json")
    tensors = load_file(_weights(folder))
    edit(tensors)
    save_file(tensors, _weights(tmp_path))
    convert_diffusers_vae(str(tmp_path))


def test_missing_tensor_is_named(root, tmp_path):
    key = "decoder.mid_block.attentions.0.to_k.bias"
    with pytest.raises(ValueError, match=f"missing tensor '{key}'"):
        _mangle(root, tmp_path, lambda t: t.pop(key))


def test_wrong_shape_is_named(root, tmp_path):
    key = "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"

    def edit(t):
        t[key] = np.zeros((64, 32, 3, 3), np.float32)

    with pytest.raises(ValueError, match=f"'{key}' has shape"):
        _mangle(root, tmp_path, edit)


def test_unknown_tensor_is_named(root, tmp_path):
    def edit(t):
        t["decoder.extra.weight"] = np.zeros((3,), np.float32)

    with pytest.raises(ValueError, match="unknown tensor.*decoder.extra.weight"):
        _mangle(root, tmp_path, edit)


def test_truncated_file_fails(root, tmp_path):
    from erg_jax.convert.vae import convert_diffusers_vae

    folder, _ = _saved("sd4", root)
    os.symlink(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with open(_weights(folder), "rb") as f:
        data = f.read()
    with open(_weights(tmp_path), "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read safetensors"):
        convert_diffusers_vae(str(tmp_path))


def test_unsupported_config_fails(tmp_path):
    from erg_jax.convert.vae import config_from_diffusers

    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        config_from_diffusers(
            {"block_out_channels": [32], "down_block_types": ["AttnDownEncoderBlock2D"]}
        )


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parity
@pytest.mark.parametrize("preset", ["sd", "sd3"])
def test_full_size_param_count_matches_diffusers(preset):
    torch, diffusers = _diffusers()
    config = vae_config(preset)
    shapes = jax.eval_shape(
        functools.partial(init_params, config, image_size=16), jax.random.key(0)
    )
    n = len(config["block_out_channels"])
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            block_out_channels=config["block_out_channels"],
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            layers_per_block=config["layers_per_block"],
            latent_channels=config["latent_channels"],
            use_quant_conv=config["use_quant_conv"],
            use_post_quant_conv=config["use_post_quant_conv"],
        )

    def torch_count(module):
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    enc = _count(shapes["encoder"]) + _count(shapes.get("quant_conv", {}))
    dec = _count(shapes["decoder"]) + _count(shapes.get("post_quant_conv", {}))
    assert enc == torch_count(ref.encoder) + torch_count(ref.quant_conv)
    assert dec == torch_count(ref.decoder) + torch_count(ref.post_quant_conv)
    assert _count(shapes) == torch_count(ref)
    print(f"{preset}: encoder {enc:,} decoder {dec:,} params")


def test_bfloat16_activations_and_sampled_latents():
    config = vae_config("tiny16")
    params = init_params(config, jax.random.key(0))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    f32, bf16 = make_vae(config, params), make_vae(dict(config, dtype="bfloat16"), params)
    z = f32.encode_latents(images)
    assert z.shape == (2, 8, 8, 16)
    _close(bf16.decode(z), f32.decode(z), rtol=5e-2)
    # A drawn latent is mean + std * noise, mapped to model space like the mean.
    key = jax.random.key(1)
    _, logvar = f32.encode(images)
    noise = (f32.encode_latents(images, key) - z) / (
        config["scaling_factor"] * np.exp(0.5 * logvar)
    )
    np.testing.assert_allclose(noise, jax.random.normal(key, z.shape), atol=1e-3)
