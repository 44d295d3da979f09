"""DiT / SiT: parameter counts, layouts, conditioning, and how attention controls act."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import AttentionControl, Energy
from erg_jax.models import dit


def make_test_model(seed: int = 0, **overrides):
    """A tiny DiT (4 blocks, width 32, 2 heads, 8x8x4 latents) and its random params."""
    config = dit.dit_config("tiny/2", **dict(dict(num_layers=4), **overrides))
    params = dit.init_params(config, jax.random.key(seed))
    # adaLN-Zero would start at zero; random values make every layer matter.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return config, jax.tree_util.tree_unflatten(tree, leaves)


def _inputs(b: int = 3, size: int = 8):
    x = jax.random.normal(jax.random.key(7), (b, size, size, 4))
    return x, jnp.array([10.0, 400.0, 999.0])[:b], jnp.array([1, 5, 10])[:b]


def test_dit_xl2_parameter_count():
    # DiT's published 675M: 674,834,720 weights plus the 256 x 1152 fixed pos_embed
    # that the DiT repo keeps as a (frozen) nn.Parameter and counts.
    assert dit.count_params(dit.dit_config("XL/2")) == 675_129_632
    assert dit.count_params(dit.dit_config("SiT-XL/2")) == 675_129_632


def test_config_presets_and_errors():
    sit = dit.dit_config("SiT-B/4")
    assert (sit["prediction"], sit["time"], sit["learned_sigma"]) == ("velocity", "sit", False)
    assert (sit["num_layers"], sit["hidden_size"], sit["patch_size"]) == (12, 768, 4)
    with pytest.raises(ValueError, match="unknown DiT model"):
        dit.dit_config("XXL/2")
    with pytest.raises(ValueError, match="unknown DiT config field"):
        dit.dit_config("S/2", depth=3)
    with pytest.raises(ValueError, match="heads"):
        dit.dit_config("S/2", num_heads=5)


def test_pos_table_matches_the_dit_construction():
    # DiT: meshgrid(w, h) puts the column first; each half is [sin, cos] of 1-D positions.
    dim, grid = 16, 3
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    t = dit.sincos_table(dim, grid).reshape(grid, grid, dim)
    r, c = 2, 1
    want = np.concatenate(
        [np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]
    )
    np.testing.assert_allclose(t[r, c], want, rtol=1e-6)


def test_scanned_and_unscanned_blocks_agree():
    config, params = make_test_model()
    x, t, y = _inputs()
    plain = dit.make_denoiser(config, params)
    scan_cfg = dict(config, scan_blocks=True, remat=True)
    scanned = dit.make_denoiser(scan_cfg, dit.stack_blocks(params, 4))
    np.testing.assert_allclose(scanned(x, t, y), plain(x, t, y), rtol=1e-5, atol=1e-5)
    # The control is scanned over with the blocks: layer 2 perturbed in both layouts.
    ctl = AttentionControl.neutral(4, energy=True, skip=True)
    ctl = ctl.replace(
        energy=Energy(
            tau=jnp.array([1.0, 1.0, 0.3, 1.0]), alpha=ctl.energy.alpha, gamma=ctl.energy.gamma
        ),
        skip=jnp.array([0.0, 0.0, 0.0, 1.0]),
    )
    np.testing.assert_allclose(scanned(x, t, y, ctl), plain(x, t, y, ctl), rtol=1e-5, atol=1e-5)
    assert not np.allclose(plain(x, t, y, ctl), plain(x, t, y), atol=1e-3)
    back = dit.unstack_blocks(dit.stack_blocks(params, 4), 4)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, back, params))


def _block_outputs(config, params, x, t, y, control):
    module = dit.dit_module(config)
    out, state = module.apply({"params": params}, x, t, y, control, capture_intermediates=True)
    inter = state["intermediates"]
    return out, [inter[f"blocks_{i}"]["__call__"][0][0] for i in range(config["num_layers"])]


def test_ierg_changes_only_the_selected_layers():
    config, params = make_test_model()
    x, t, y = _inputs()
    run = jax.jit(lambda ctl: _block_outputs(config, params, x, t, y, ctl))
    plain_out, plain = run(None)
    neutral = AttentionControl.neutral(4, energy=True)
    out, acts = run(neutral)
    assert np.array_equal(out, plain_out)
    for a, b in zip(acts, plain, strict=True):
        assert np.array_equal(a, b)
    # I-ERG on layer set S = {2}: blocks before 2 are untouched, from 2 on they change.
    tau = jnp.array([1.0, 1.0, 0.5, 1.0])
    out, acts = run(neutral.replace(energy=Energy(tau=tau, alpha=jnp.ones(4), gamma=jnp.ones(4))))
    assert np.array_equal(acts[0], plain[0]) and np.array_equal(acts[1], plain[1])
    assert not np.allclose(acts[2], plain[2], atol=1e-4)
    assert not np.allclose(out, plain_out, atol=1e-4)


def test_skip_layer_passes_its_input_through():
    config, params = make_test_model()
    x, t, y = _inputs()
    ctl = AttentionControl.neutral(4, skip=True).replace(skip=jnp.array([0.0, 1.0, 0.0, 0.0]))
    _, acts = _block_outputs(config, params, x, t, y, ctl)
    assert np.array_equal(acts[1], acts[0])


def test_float_class_embedding_equals_label_lookup():
    config, params = make_test_model()
    x, t, y = _inputs()
    den = dit.make_denoiser(config, params)
    emb = den.embed_classes(y)
    assert emb.shape == (3, 32)
    np.testing.assert_allclose(den(x, t, emb), den(x, t, y), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="class embeddings"):
        den(x, t, jnp.zeros((3, 7)))


def test_sit_and_unconditional_variants():
    config, params = make_test_model(**dit.dit_config("SiT-tiny/2", num_layers=4))
    x, t, y = _inputs()
    sit = dit.make_denoiser(config, params)
    full = dit.make_denoiser(dict(config, learned_sigma=True), params)
    out = sit(x, t / 1000.0, y)
    assert out.shape == (3, 8, 8, 4)  # SiT drops the unused sigma channels
    np.testing.assert_array_equal(out, full(x, t / 1000.0, y)[..., :4])

    config, params = make_test_model(num_classes=0)
    assert "class_embed" not in params
    out = dit.make_denoiser(config, params)(x, t, None)
    assert out.shape == (3, 8, 8, 8)


def test_input_checks():
    config, params = make_test_model()
    den = dit.make_denoiser(config, params)
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="latents must be 8x8"):
        den(jnp.zeros((1, 16, 16, 4)), t[:1], y[:1])
    with pytest.raises(ValueError, match="3 layers"):
        den(x, t, y, AttentionControl.neutral(3, energy=True))


def test_checkpoint_restores_into_shardings_and_relayouts(tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from erg_jax import checkpoint
    from erg_jax.models import load_denoiser

    config, params = make_test_model()
    checkpoint.save(str(tmp_path), params, config)
    x, t, y = _inputs()
    want = dit.make_denoiser(config, params)(x, t, y)
    scanned = load_denoiser(str(tmp_path), scan_blocks=True)
    assert scanned.params["blocks"]["qkv"]["kernel"].shape == (4, 32, 3, 32)
    np.testing.assert_allclose(scanned(x, t, y), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="can override only"):
        load_denoiser(str(tmp_path), num_layers=3)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree_util.tree_map(lambda _: shard, params)
    shardings["time_embed_1"]["kernel"] = NamedSharding(mesh, PartitionSpec("data"))
    restored, stored = checkpoint.restore(str(tmp_path), shardings)
    assert stored == config
    kernel = restored["time_embed_1"]["kernel"]
    assert kernel.sharding == shardings["time_embed_1"]["kernel"]
    assert len(kernel.addressable_shards) == len(jax.devices())
    np.testing.assert_array_equal(kernel, params["time_embed_1"]["kernel"])
