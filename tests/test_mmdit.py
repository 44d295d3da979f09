"""Tests of the SD3 / SD3.5 MMDiT (erg_jax.models.mmdit) and its diffusers conversion.

Parity: tiny random diffusers SD3Transformer2DModel folders (SD3, QK norms, SD3.5 dual
attention) converted by convert_diffusers_sd3 give the same velocity. Controls: neutral
controls are bit-exact no-ops and an energy acts only from its first layer on. Conversion
errors name the key. Parameter counts of the published sizes match diffusers'.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from erg_jax.control import AttentionControl
from erg_jax.convert import sd3
from erg_jax.energy import Energy
from erg_jax.models import mmdit

_DIFFUSERS_FIELDS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
)


def diffusers_kwargs(config: dict) -> dict:
    kw = {k: config[k] for k in _DIFFUSERS_FIELDS}
    kw["dual_attention_layers"] = tuple(kw["dual_attention_layers"])
    return kw


def make_test_model(**overrides):
    config = mmdit.mmdit_config("tiny", **overrides)
    return config, mmdit.init_params(config, jax.random.key(0))


def inputs(config, b=3, hgt=8, wid=12, tokens=5, seed=1):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (b, hgt, wid, config["in_channels"]))
    cond = dict(
        context=jax.random.normal(k[1], (b, tokens, config["joint_attention_dim"])),
        pooled=jax.random.normal(k[2], (b, config["pooled_projection_dim"])),
    )
    return x, jnp.array([900.0, 500.0, 30.0][:b]), cond


def write_checkpoint(folder, params, config, edit=None):
    """Our params as a diffusers folder (inverse of the key mapping), optionally edited."""
    from safetensors.numpy import save_file

    tensors = {}
    for path, w in traverse_util.flatten_dict(params).items():
        w = np.asarray(w, np.float32)
        if path[-1] == "kernel":
            w = np.transpose(w, (3, 2, 0, 1)) if w.ndim == 4 else w.T
        tensors[sd3.diffusers_key(path)] = np.ascontiguousarray(
            w[None] if w.ndim == 2 and path == ("pos_embed",) else w
        )
    if edit is not None:
        edit(tensors)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(diffusers_kwargs(config), _class_name="SD3Transformer2DModel"), f)
    return folder


# -- controls -----------------------------------------------------------------------------


def test_neutral_controls_are_exact_noops():
    config, params = make_test_model()
    f = jax.jit(mmdit.make_denoiser(config, params))
    x, t, cond = inputs(config)
    plain = f(x, t, cond)
    n = config["num_layers"]
    for control in (
        AttentionControl.neutral(n, energy=True),
        AttentionControl.neutral(n, energy=True, max_steps=2, identity=True, blur=True, skip=True),
    ):
        assert np.array_equal(np.asarray(plain), np.asarray(f(x, t, cond, control)))


def test_energy_acts_from_its_first_layer_on():
    config, params = make_test_model(num_layers=4, dual_attention_layers=(1,))
    module = mmdit.mmdit_module(config)
    x, t, cond = inputs(config)
    ones = jnp.ones((4,))

    def run(control):
        out, state = module.apply(
            {"params": params},
            x,
            t,
            cond["context"],
            cond["pooled"],
            control,
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        blocks = [state["intermediates"][f"blocks_{i}"]["__call__"][0][0] for i in range(4)]
        return out, blocks

    base_out, base = run(None)
    control = AttentionControl(energy=Energy(ones.at[2].set(0.3), ones, ones))
    out, blocks = run(control)
    for i in range(2):  # before the first perturbed layer: untouched, both streams
        for a, b in zip(base[i], blocks[i], strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(base[2][0], blocks[2][0], atol=1e-4)
    assert not np.allclose(base_out, out, atol=1e-4)


def test_segments_of_the_published_sizes():
    seg = mmdit.segments(mmdit.Spec.from_config(mmdit.mmdit_config("sd3.5-medium")))
    assert [tuple(x) for x in seg] == [
        (0, 13, True, False),
        (13, 23, False, False),
        (23, 24, False, True),
    ]
    seg = mmdit.segments(mmdit.Spec.from_config(mmdit.mmdit_config("sd3.5-large")))
    assert [tuple(x) for x in seg] == [(0, 37, False, False), (37, 38, False, True)]


def test_scanned_and_unscanned_blocks_agree(tmp_path):
    from erg_jax import checkpoint
    from erg_jax.models import load_denoiser

    config, params = make_test_model(num_layers=6, dual_attention_layers=(0, 1, 2))
    x, t, cond = inputs(config)
    plain = jax.jit(mmdit.make_denoiser(config, params))
    scan_cfg = dict(config, scan_blocks=True, remat=True)
    stacked = mmdit.stack_blocks(params, scan_cfg)
    assert sorted(k for k in stacked if k.startswith("blocks")) == [
        "blocks_0_to_2",
        "blocks_3_to_4",
        "blocks_5",
    ]
    abstract = mmdit.abstract_params(scan_cfg)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(stacked)
    scanned = jax.jit(mmdit.make_denoiser(scan_cfg, stacked))
    np.testing.assert_allclose(scanned(x, t, cond), plain(x, t, cond), rtol=1e-5, atol=1e-5)
    # the control is sliced per run and scanned with it: layers 1, 3 and 4 perturbed
    ctl = AttentionControl.neutral(6, energy=True, blur=True, skip=True)
    ctl = ctl.replace(
        energy=ctl.energy.replace(tau=jnp.ones(6).at[1].set(0.3)),
        blur=jnp.zeros(6).at[4].set(1.0),
        skip=jnp.zeros(6).at[3].set(1.0),
    )
    want = plain(x, t, cond, ctl)
    np.testing.assert_allclose(scanned(x, t, cond, ctl), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, plain(x, t, cond), atol=1e-3)
    back = mmdit.unstack_blocks(stacked, config)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, back, params))
    # a stored unscanned checkpoint loads scanned, and the other way round
    checkpoint.save(str(tmp_path / "flat"), params, config)
    den = load_denoiser(str(tmp_path / "flat"), scan_blocks=True)
    assert "blocks_0_to_2" in den.params
    run = jax.jit(lambda *a: den(*a))  # one program, not an op-by-op run of every block
    np.testing.assert_allclose(run(x, t, cond, ctl), want, rtol=1e-5, atol=1e-5)
    checkpoint.save(str(tmp_path / "stacked"), stacked, scan_cfg)
    den = load_denoiser(str(tmp_path / "stacked"), scan_blocks=False)
    assert "blocks_0" in den.params
    run = jax.jit(lambda *a: den(*a))
    np.testing.assert_allclose(run(x, t, cond), plain(x, t, cond), rtol=1e-5, atol=1e-5)


# -- conversion ---------------------------------------------------------------------------


def test_conversion_round_trip_and_errors(tmp_path):
    config, params = make_test_model()
    folder = write_checkpoint(str(tmp_path / "ok"), params, config)
    got, got_config = sd3.convert_diffusers_sd3(folder, precision="highest")
    assert diffusers_kwargs(got_config) == diffusers_kwargs(config)
    for path, w in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(traverse_util.flatten_dict(got)[path], w, err_msg=str(path))

    key = "transformer_blocks.1.attn.norm_added_k.weight"
    bad = write_checkpoint(str(tmp_path / "missing"), params, config, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=key):
        sd3.convert_diffusers_sd3(bad)

    def transpose(sd):
        sd["proj_out.weight"] = np.ascontiguousarray(sd["proj_out.weight"].T)

    bad = write_checkpoint(str(tmp_path / "shape"), params, config, transpose)
    with pytest.raises(ValueError, match="proj_out.weight"):
        sd3.convert_diffusers_sd3(bad)
    bad = write_checkpoint(
        str(tmp_path / "extra"),
        params,
        config,
        lambda sd: sd.update({"transformer_blocks.9.ff.net.2.bias": np.ones(3)}),
    )
    with pytest.raises(ValueError, match=r"transformer_blocks\.9\.ff\.net\.2\.bias"):
        sd3.convert_diffusers_sd3(bad)


# -- parity with diffusers ----------------------------------------------------------------

VARIANTS = {
    "sd3": dict(
        in_channels=4, out_channels=4, num_layers=2, qk_norm=None, dual_attention_layers=()
    ),
    "sd3_rms_norm": dict(
        in_channels=16, out_channels=16, num_layers=2, qk_norm="rms_norm", dual_attention_layers=()
    ),
    "sd3_layer_norm": dict(
        in_channels=4, out_channels=4, num_layers=2, qk_norm="layer_norm", dual_attention_layers=()
    ),
    "sd35_dual": dict(
        in_channels=16,
        out_channels=16,
        num_layers=5,  # runs of like blocks: 0-1 dual, 2-3 plain, 4 the last
        qk_norm="rms_norm",
        dual_attention_layers=(0, 1),
    ),
}


@pytest.mark.parity
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_diffusers(variant, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = mmdit.mmdit_config("tiny", **VARIANTS[variant])
    ref = diffusers.SD3Transformer2DModel(**diffusers_kwargs(config)).eval()
    with torch.no_grad():  # non-trivial QK-norm affines, so a swapped weight shows
        for name, p in ref.named_parameters():
            if ".norm_" in name:
                p.add_(0.2 * torch.randn_like(p))
    ref.save_pretrained(str(tmp_path))
    params, got_config = sd3.convert_diffusers_sd3(str(tmp_path), precision="highest")
    f = jax.jit(mmdit.make_denoiser(got_config, params))
    for seed, (hgt, wid) in ((1, (8, 12)), (2, (16, 8))):
        x, t, cond = inputs(config, hgt=hgt, wid=wid, seed=seed)
        ours = np.asarray(f(x, t, cond))
        with torch.no_grad():
            theirs = ref(
                hidden_states=torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)),
                encoder_hidden_states=torch.from_numpy(np.array(cond["context"])),
                pooled_projections=torch.from_numpy(np.array(cond["pooled"])),
                timestep=torch.from_numpy(np.array(t)),
            ).sample
        theirs = theirs.numpy().transpose(0, 2, 3, 1)
        assert ours.shape == theirs.shape
        err = np.abs(ours - theirs).max() / np.abs(theirs).max()
        assert err < 1e-4, f"{variant} {(hgt, wid)}: relative error {err:.2e}"
    # the scanned layout converts from the same folder to the same function
    stacked, scan_cfg = sd3.convert_diffusers_sd3(
        str(tmp_path), precision="highest", scan_blocks=True
    )
    assert scan_cfg["scan_blocks"]
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(
        mmdit.abstract_params(scan_cfg)
    )
    np.testing.assert_allclose(
        jax.jit(mmdit.make_denoiser(scan_cfg, stacked))(x, t, cond), ours, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parity
@pytest.mark.parametrize("name", ["sd3.5-medium", "sd3.5-large"])
def test_param_counts_match_diffusers(name):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = mmdit.mmdit_config(name)
    raw = diffusers_kwargs(config)
    assert diffusers_kwargs(sd3.config_from_diffusers(raw)) == raw
    with torch.device("meta"):  # shapes only, nothing allocated
        ref = diffusers.SD3Transformer2DModel(**raw)
    n_params = sum(p.numel() for p in ref.parameters())
    n_all = sum(v.numel() for v in ref.state_dict().values())  # + the position buffer
    assert mmdit.count_params(config) == n_params
    assert mmdit.count_params(config, buffers=True) == n_all
