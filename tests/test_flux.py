"""Tests of the FLUX.1 transformer (erg_jax.models.flux) and its diffusers conversion.

Parity: tiny random diffusers FluxTransformer2DModel folders (with and without the
guidance embedding), converted by ``launch.convert`` and opened by ``load_denoiser``, give
diffusers' velocity on non-square latents, packed and unpacked by FluxPipeline's own
functions. Controls: neutral controls are bit-exact no-ops; a control acts only from its
layer on, and SEG never touches the text queries; the scanned layout and the shared-prefix
branches equal the plain loop and the separate branches. Conversion errors name the key,
an odd latent side names model.sample_size; parameter counts of dev and schnell match
diffusers'.

The tiny models are compiled once and shared (``model``): every control below has the
same structure (every perturbation compiled in, K <= 2), so one program serves them all.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from erg_jax import checkpoint
from erg_jax.control import AttentionControl
from erg_jax.convert import flux as convert_flux
from erg_jax.energy import Energy
from erg_jax.models import flux, load_denoiser
from erg_jax.models.shared_prefix import first_perturbed_layer

L = 4  # tiny: 2 double blocks (layers 0, 1), 2 single blocks (layers 2, 3)


def diffusers_kwargs(config: dict) -> dict:
    """FluxTransformer2DModel's constructor arguments for one of our configs."""
    return dict(
        patch_size=1,
        in_channels=4 * config["in_channels"],
        out_channels=4 * config["out_channels"],
        num_layers=config["num_double_layers"],
        num_single_layers=config["num_single_layers"],
        attention_head_dim=config["attention_head_dim"],
        num_attention_heads=config["num_attention_heads"],
        joint_attention_dim=config["joint_attention_dim"],
        pooled_projection_dim=config["pooled_projection_dim"],
        guidance_embeds=config["guidance_embeds"],
        axes_dims_rope=tuple(config["axes_dims_rope"]),
    )


def random_params(config: dict, seed: int = 0) -> dict:
    """Random params from the shapes alone (no init to compile), with non-zero biases
    and norm scales away from 1, so a swapped or dropped one shows."""
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = path[-1].key
        if name == "kernel":
            w = rng.normal(size=a.shape) / np.sqrt(a.shape[-2])
        elif name == "scale":
            w = 1.0 + 0.2 * rng.normal(size=a.shape)
        else:
            w = 0.1 * rng.normal(size=a.shape)
        return jnp.asarray(w, jnp.float32)  # a device array: an argument, not a constant

    return jax.tree_util.tree_map_with_path(fill, flux.abstract_params(config))


@functools.cache
def model(scan: bool = False):
    """(config, params, jitted denoiser, jitted branched) of the tiny dev-style model;
    scan: the same weights stacked, scanned and rematerialised."""
    config = flux.flux_config("tiny")
    params = random_params(config)
    if scan:
        config = dict(config, scan_blocks=True, remat=True)
        params = flux.stack_blocks(params, config)
    den = flux.make_denoiser(config, params)
    return config, params, jax.jit(den), jax.jit(den.branched)


def inputs(config, b=3, hgt=8, wid=12, tokens=5, seed=1):
    """Latents (b, hgt, wid, C) (a 4x6 token grid by default), t and cond."""
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (b, hgt, wid, config["in_channels"]))
    cond = dict(
        context=jax.random.normal(k[1], (b, tokens, config["joint_attention_dim"])),
        pooled=jax.random.normal(k[2], (b, config["pooled_projection_dim"])),
    )
    if config["guidance_embeds"]:
        cond["guidance"] = jnp.array([3.5, 1.0, 6.0][:b])
    return x, jnp.array([0.97, 0.5, 0.03][:b]), cond


def control(erg=None, pag=None, seg=None, slg=None) -> AttentionControl:
    """One control (leaves (L,)) with every perturbation compiled in, each switched on in
    one layer or nowhere (None): an energy (tau 0.3, alpha 0.9, gamma 0.7, K = 2),
    identity attention, a query blur (sigma 1.5 tokens) and a skip."""
    ones, zeros = jnp.ones((L,)), jnp.zeros((L,))
    at = lambda a, i, v: a if i is None else a.at[i].set(v)  # noqa: E731
    return AttentionControl(
        energy=Energy(at(ones, erg, 0.3), at(ones, erg, 0.9), at(ones, erg, 0.7)),
        steps=at(jnp.ones((L,), jnp.int32), erg, 2),
        identity=at(zeros, pag, 1.0),
        blur=at(zeros, seg, 1.5),
        skip=at(zeros, slg, 1.0),
        max_steps=2,
    )


def every_kind(erg, pag, seg, slg) -> AttentionControl:
    """Five branches stacked (leaves (5, L)): neutral, then one per perturbation."""
    ctl = [control(), control(erg=erg), control(pag=pag), control(seg=seg), control(slg=slg)]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ctl)


def write_checkpoint(folder, params, config, edit=None):
    """Our params as a diffusers folder (the inverse of the key mapping), optionally edited."""
    from safetensors.numpy import save_file

    tensors = {}
    for path, w in traverse_util.flatten_dict(params).items():
        w = np.asarray(w, np.float32)
        tensors[convert_flux.diffusers_key(path)] = np.ascontiguousarray(
            w.T if path[-1] == "kernel" else w
        )
    if edit is not None:
        edit(tensors)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(diffusers_kwargs(config), _class_name="FluxTransformer2DModel"), f)
    return folder


# -- controls -----------------------------------------------------------------------------


def test_neutral_controls_are_exact_noops():
    config, _, f, _ = model()
    x, t, cond = inputs(config)
    neutral = AttentionControl.neutral(
        L, energy=True, max_steps=2, identity=True, blur=True, skip=True
    )
    assert np.array_equal(np.asarray(f(x, t, cond)), np.asarray(f(x, t, cond, neutral)))


def test_controls_act_from_their_layer_on_and_never_blur_text():
    config, params, _, _ = model()
    module = flux.flux_module(config)
    x, t, cond = inputs(config)
    names = ["double_blocks_0", "double_blocks_1", "single_blocks_0", "single_blocks_1"]

    @jax.jit
    def run(ctl):
        out, state = module.apply(
            {"params": params},
            x,
            t,
            cond["context"],
            cond["pooled"],
            cond["guidance"],
            ctl,
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        return out, [state["intermediates"][n]["__call__"][0][0] for n in names]  # (x, c)

    base_out, base = run(control())
    for layer in (1, 3):  # the last double block, the last single block
        out, blocks = run(control(erg=layer))
        for i in range(layer):  # before the perturbed layer: untouched, both streams
            for a, b in zip(base[i], blocks[i], strict=True):
                assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.allclose(base[layer][0], blocks[layer][0], atol=1e-4)
        assert not np.allclose(base_out, out, atol=1e-4)
    # SEG in a double and in a single block: image tokens move, text tokens do not (the
    # text queries are not blurred, and keys and values never are).
    for layer in (0, 2):
        _, blocks = run(control(seg=layer))
        assert not np.allclose(base[layer][0], blocks[layer][0], atol=1e-3)
        np.testing.assert_allclose(blocks[layer][1], base[layer][1], rtol=0, atol=1e-6)


def test_scanned_and_unscanned_blocks_agree(tmp_path):
    config, params, plain, _ = model()
    scan_cfg, stacked, scanned, _ = model(scan=True)
    assert sorted(k for k in stacked if "blocks" in k) == [
        "double_blocks_0_to_1",
        "single_blocks_0_to_1",
    ]
    abstract = flux.abstract_params(scan_cfg)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(stacked)
    axes = flux.param_axes(scan_cfg)
    assert tuple(axes["single_blocks_0_to_1"]["proj_out"]["kernel"]) == ("layers", "mlp", "embed")
    x, t, cond = inputs(config)
    # the control is sliced per run and scanned with it: layers in both runs perturbed
    for ctl in (control(), control(erg=1, pag=2, seg=3), control(seg=0, slg=3)):
        want = plain(x, t, cond, ctl)
        np.testing.assert_allclose(scanned(x, t, cond, ctl), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, plain(x, t, cond, control()), atol=1e-3)
    back = flux.unstack_blocks(stacked, config)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, back, params))
    # a stored scanned checkpoint loads per block, the same weights
    checkpoint.save(str(tmp_path / "stacked"), stacked, scan_cfg)
    den = load_denoiser(str(tmp_path / "stacked"), scan_blocks=False)
    assert den.num_layers == L and not den.config["scan_blocks"]
    same = jax.tree_util.tree_map(np.array_equal, den.params, params)
    assert jax.tree_util.tree_all(same)


# (erg, pag, seg, slg layers) and the first perturbed layer
BRANCH_CASES = {
    "seg_first_double_block": ((1, 2, 0, 3), 0),
    "erg_first_double_block": ((1, 3, 2, 3), 1),
    "first_single_block": ((2, 3, 3, 2), 2),
    "all_in_the_last_block": ((3, 3, 3, 3), 3),
}


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("case", sorted(BRANCH_CASES))
def test_branched_equals_the_separate_branches(case, scan):
    layers, first = BRANCH_CASES[case]
    ctl = every_kind(*layers)
    assert int(first_perturbed_layer(ctl, L)) == first
    config, _, f, branched = model(scan)
    x, t, cond = inputs(config)
    got = np.asarray(branched(x, t, cond, ctl))
    branches = [jax.tree_util.tree_map(lambda a, i=i: a[i], ctl) for i in range(5)]
    want = np.stack([f(x, t, cond, c) for c in branches])
    assert got.dtype == np.float32 and got.shape == want.shape == (5, 3, 8, 12, 4)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # every weak branch is perturbed: the match is not vacuous
    assert np.all(np.max(np.abs(want[1:] - want[:1]), axis=(1, 2, 3, 4)) > 1e-4)


def test_branched_without_controls_is_the_plain_forward():
    config, _, f, _ = model()
    den = flux.make_denoiser(config, model()[1])
    x, t, cond = inputs(config)
    got = np.asarray(jax.jit(lambda x: den.branched(x, t, cond, None))(x))
    assert got.shape == (1, 3, 8, 12, 4)
    np.testing.assert_allclose(got[0], np.asarray(f(x, t, cond)), atol=1e-5, rtol=1e-5)


def test_the_guidance_field_is_required_exactly_with_guidance_embeds():
    config, _, f, _ = model()
    x, t, cond = inputs(config)
    with pytest.raises(ValueError, match="needs 'guidance'"):
        f(x, t, {k: v for k, v in cond.items() if k != "guidance"})
    # the guidance scale is a per-sample input: another scale, another velocity
    base = np.asarray(f(x, t, cond))
    other = np.asarray(f(x, t, dict(cond, guidance=jnp.array([1.0, 3.5, 6.0]))))
    assert not np.allclose(base[:2], other[:2], atol=1e-4)
    np.testing.assert_array_equal(base[2], other[2])
    schnell = flux.flux_config("tiny", guidance_embeds=False)
    params = random_params(schnell)
    assert "guidance_embed" not in params
    with pytest.raises(ValueError, match="must not hold 'guidance'"):
        flux.make_denoiser(schnell, params)(x, t, cond)


def test_an_odd_latent_side_is_named_where_the_model_is_built():
    config, params, _, _ = model()
    odd = r"model\.sample_size=9: a FLUX\.1 latent side must be even"
    with pytest.raises(ValueError, match=odd):
        flux.flux_config("tiny", sample_size=9)
    for build in (flux.flux_module, lambda c: flux.make_denoiser(c, params)):
        with pytest.raises(ValueError, match=odd):
            build(dict(config, sample_size=9))
    assert flux.flux_config("tiny", sample_size=10)["sample_size"] == 10  # even: any side


# -- conversion ---------------------------------------------------------------------------


def test_conversion_round_trip_and_errors(tmp_path):
    config, params, _, _ = model()
    folder = write_checkpoint(str(tmp_path / "ok"), params, config)
    got, got_config = convert_flux.convert_diffusers_flux(
        folder, sample_size=8, precision="highest"
    )
    assert got_config == config
    flat = traverse_util.flatten_dict(got)
    for path, w in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(flat[path], w, err_msg=str(path))

    key = "single_transformer_blocks.1.attn.norm_k.weight"
    bad = write_checkpoint(str(tmp_path / "missing"), params, config, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=key):
        convert_flux.convert_diffusers_flux(bad)

    def transpose(sd):
        sd["proj_out.weight"] = np.ascontiguousarray(sd["proj_out.weight"].T)

    bad = write_checkpoint(str(tmp_path / "shape"), params, config, transpose)
    with pytest.raises(ValueError, match="proj_out.weight"):
        convert_flux.convert_diffusers_flux(bad)
    extra = "transformer_blocks.7.ff_context.net.2.bias"
    bad = write_checkpoint(
        str(tmp_path / "extra"), params, config, lambda sd: sd.update({extra: np.ones(3)})
    )
    with pytest.raises(ValueError, match=extra.replace(".", r"\.")):
        convert_flux.convert_diffusers_flux(bad)
    with pytest.raises(ValueError, match="not a FluxTransformer2DModel"):
        convert_flux.config_from_diffusers({"_class_name": "SD3Transformer2DModel"})


# -- parity with diffusers ----------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize(
    "guidance, size", [(True, (8, 12)), (False, (12, 8))], ids=["dev", "schnell"]
)
def test_parity_with_diffusers(guidance, size, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    from launch.convert import convert

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = flux.flux_config("tiny", guidance_embeds=guidance)
    ref = diffusers.FluxTransformer2DModel(**diffusers_kwargs(config)).eval()
    with torch.no_grad():  # non-trivial QK-norm affines, so a swapped weight shows
        for name, p in ref.named_parameters():
            if ".norm_" in name:
                p.add_(0.2 * torch.randn_like(p))
    ref.save_pretrained(str(tmp_path / "src"))
    written = convert("diffusers-flux", str(tmp_path / "src"), str(tmp_path / "ckpt"))
    assert written["kind"] == "flux" and written["num_layers"] == L
    den = load_denoiser(str(tmp_path / "ckpt"), precision="highest")
    hgt, wid = size  # a non-square token grid; three values of t (and guidance scales)
    x, t, cond = inputs(config, hgt=hgt, wid=wid)
    ours = np.asarray(jax.jit(den)(x, t, cond))
    nchw = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))
    with torch.no_grad():
        theirs = ref(
            hidden_states=FluxPipeline._pack_latents(nchw, 3, x.shape[-1], hgt, wid),
            encoder_hidden_states=torch.from_numpy(np.array(cond["context"])),
            pooled_projections=torch.from_numpy(np.array(cond["pooled"])),
            timestep=torch.from_numpy(np.array(t)),
            img_ids=FluxPipeline._prepare_latent_image_ids(
                3, hgt // 2, wid // 2, "cpu", torch.float32
            ),
            txt_ids=torch.zeros(cond["context"].shape[1], 3),
            guidance=torch.from_numpy(np.array(cond["guidance"])) if guidance else None,
        ).sample
        theirs = FluxPipeline._unpack_latents(theirs, 8 * hgt, 8 * wid, 8)
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    assert ours.shape == theirs.shape
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err < 1e-4, f"relative error {err:.2e}"
    # the same checkpoint restacked for nn.scan on load: the weights the scan test runs
    scanned = load_denoiser(str(tmp_path / "ckpt"), scan_blocks=True)
    want = jax.tree_util.tree_map(np.asarray, flux.stack_blocks(den.params, scanned.config))
    same = jax.tree_util.tree_map(np.array_equal, scanned.params, want)
    assert jax.tree_util.tree_all(same)


@pytest.mark.parity
def test_param_counts_match_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    for name in ("dev", "schnell"):
        config = flux.flux_config(name)
        raw = diffusers_kwargs(config)
        stored = dict(dtype="bfloat16", param_dtype="bfloat16")
        assert convert_flux.config_from_diffusers(raw, **stored) == config
        with torch.device("meta"):  # shapes only, nothing allocated
            ref = diffusers.FluxTransformer2DModel(**raw)
        assert flux.count_params(config) == sum(p.numel() for p in ref.parameters())
