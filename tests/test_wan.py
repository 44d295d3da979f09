"""Tests of the Wan 2.1 / 2.2 transformer (erg_jax.models.wan) and its diffusers conversion.

Parity: a tiny random diffusers WanTransformer3DModel (every parameter perturbed, so a
dropped norm, bias or table shows), saved and converted by convert_diffusers_wan, gives
diffusers' velocity on one and three latent frames of non-square latents, per block and
scanned. Controls against torch references that do not share our code: SLG's skip is
diffusers' model with the block removed; PAG's identity, ERG's temperature and SEG's
infinite blur are a small torch attention processor of our own in that block. Neutral
controls are no-ops, the shared-prefix branches equal the separate calls, the 3-D blur
matches a dense Gaussian. Parameter counts of the published sizes match diffusers' own
model class built on the meta device: 1,418,996,800 (Wan2.1-T2V-1.3B) and 14,288,491,584
(Wan2.1-T2V-14B and each Wan2.2-T2V-A14B expert).

The torch model is built and converted once (``ref``); the jitted programs take the
params as an argument (``programs``), so diffusers' converted weights and our random ones
(``model``, for the tests that need no torch) share them, and every control below has
the same structure (energy, identity, blur and skip compiled in): one program each.
"""

import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import settings, targets
from erg_jax.control import AttentionControl, EntropyProbe, blur_queries
from erg_jax.convert import wan as convert_wan
from erg_jax.energy import Energy
from erg_jax.models import wan
from erg_jax.models.shared_prefix import first_perturbed_layer

L = 3  # the tiny preset's blocks
T = np.array([999.0, 500.0], np.float32)  # integer-valued, as WanPipeline passes them


def diffusers_kwargs(config: dict) -> dict:
    """WanTransformer3DModel's constructor arguments for one of our configs."""
    keys = ("in_channels", "out_channels", "num_layers", "num_attention_heads")
    keys += ("attention_head_dim", "ffn_dim", "text_dim", "freq_dim", "cross_attn_norm")
    keys += ("qk_norm", "eps", "rope_max_seq_len")
    return dict({k: config[k] for k in keys}, patch_size=tuple(config["patch_size"]))


def inputs(frames: int, hgt: int, wid: int, tokens: int = 20, seed: int = 1):
    """Channel-last latents (2, frames, hgt, wid, 4) and a 20-token text."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, frames, hgt, wid, 4)).astype(np.float32)
    return x, {"context": rng.normal(size=(2, tokens, 32)).astype(np.float32)}


def control(erg=None, pag=None, seg=None, slg=None, tau=0.3) -> AttentionControl:
    """One control (leaves (L,)) with every perturbation compiled in, each switched on in
    one block or nowhere (None): a temperature tau, identity attention, an infinite
    query blur and a skip."""
    ones, zeros = jnp.ones((L,)), jnp.zeros((L,))
    at = lambda a, i, v: a if i is None else a.at[i].set(v)  # noqa: E731
    return AttentionControl(
        energy=Energy(at(ones, erg, tau), ones, ones),
        identity=at(zeros, pag, 1.0),
        blur=at(zeros, seg, math.inf),
        skip=at(zeros, slg, 1.0),
    )


@functools.cache
def programs(scan: bool = False):
    """(config, forward, branched) of the tiny preset, per block or scanned (and
    rematerialised), jitted with the params as an argument: the converted diffusers
    weights and our random ones run the same compiled programs.
    forward(params, x, cond, control=None); branched(params, x, cond, controls)."""
    config = wan.wan_config("tiny", scan_blocks=scan, remat=scan)
    den = lambda p: wan.make_denoiser(config, p)  # noqa: E731
    forward = jax.jit(lambda p, x, cond, ctl=None: den(p)(x, T, cond, ctl))
    branched = jax.jit(lambda p, x, cond, ctls: den(p).branched(x, T, cond, ctls))
    return config, forward, branched


@functools.cache
def model(scan: bool = False):
    """(config, params, f(x, cond, control=None), branched(x, cond, controls)) of random
    params from the shapes alone: non-zero biases and tables, norm scales away from 1."""
    config, forward, branched = programs(scan)
    rng = np.random.default_rng(0)

    def fill(path, a):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
        return (1.0 if name == "scale" else 0.0) + 0.2 * rng.normal(size=a.shape)

    flat = wan.abstract_params(dict(config, scan_blocks=False))
    params = jax.tree_util.tree_map_with_path(lambda p, a: fill(p, a).astype(np.float32), flat)
    if scan:
        params = wan.stack_blocks(params, config)
    return (
        config,
        params,
        functools.partial(forward, params),
        functools.partial(branched, params),
    )


@functools.cache
def reference(folder: str):
    """(torch model, {scan: converted params}) of one tiny random diffusers model saved
    to ``folder``, converted per block and scanned."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = wan.wan_config("tiny")
    ref = diffusers.WanTransformer3DModel(**diffusers_kwargs(config)).eval()
    with torch.no_grad():  # norms away from 1 and 0, tables and biases moved
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ref.save_pretrained(folder)
    converted = {}
    for scan in (False, True):
        params, cfg = convert_wan.convert_diffusers_wan(
            folder, precision="highest", scan_blocks=scan
        )
        assert cfg == wan.wan_config("tiny", scan_blocks=scan)
        converted[scan] = params
    return ref, converted


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference(str(tmp_path_factory.mktemp("wan_tiny")))


def torch_forward(ref, x, cond):
    """diffusers' velocity, channel-last."""
    import torch

    with torch.no_grad():
        out = ref(
            hidden_states=torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()),
            timestep=torch.from_numpy(T),
            encoder_hidden_states=torch.from_numpy(cond["context"]),
        ).sample
    return out.numpy().transpose(0, 2, 3, 4, 1)


def relative_error(ours, theirs) -> float:
    assert ours.shape == theirs.shape
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


class Perturbed:
    """A self-attention processor for diffusers' WanAttention with one perturbation,
    written from the processor's definition: 'tau' multiplies the queries by tau before
    the softmax (ERG's temperature; tau = 1 is the plain layer), 'identity' returns the
    values (PAG, STG-A), 'mean' gives every query the mean of the layer's queries after
    the QK norm and before the rotation (SEG at infinite sigma)."""

    def __init__(self, mode: str, tau: float = 1.0):
        self.mode, self.tau = mode, tau

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, mask=None, rope=None):
        import torch.nn.functional as F

        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if self.mode == "mean":
            q = q.mean(dim=1, keepdim=True).expand_as(q)
        cos, sin = rope[0][..., 0::2], rope[1][..., 1::2]  # (1, n, 1, d/2) per pair

        def rotate(a):
            a0, a1 = a[..., 0::2], a[..., 1::2]
            return torch_stack_pairs(a0 * cos - a1 * sin, a0 * sin + a1 * cos)

        q, k = rotate(q), rotate(k)
        if self.mode == "identity":
            out = v
        else:
            out = F.scaled_dot_product_attention(
                (self.tau * q).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
        return attn.to_out[0](out.flatten(2, 3))


def torch_stack_pairs(even, odd):
    import torch

    return torch.stack([even, odd], dim=-1).flatten(-2)


def with_processor(ref, block: int, processor, x, cond):
    """torch's velocity with block's self-attention run by ``processor``."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    attn = ref.blocks[block].attn1
    attn.set_processor(processor)
    try:
        return torch_forward(ref, x, cond)
    finally:
        attn.set_processor(WanAttnProcessor())


# -- parity with diffusers ----------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("frames, hgt, wid", [(1, 6, 4), (3, 4, 6)])
def test_parity_with_diffusers(ref, frames, hgt, wid):
    torch_ref, params = ref
    x, cond = inputs(frames, hgt, wid)
    theirs = torch_forward(torch_ref, x, cond)
    ours = np.asarray(programs()[1](params[False], x, cond))
    assert ours.dtype == np.float32
    err = relative_error(ours, theirs)
    assert err < 1e-4, f"{(frames, hgt, wid)}: relative error {err:.2e}"
    # the scanned (and rematerialised) layout of the same folder: the same function
    scanned = programs(True)[1](params[True], x, cond)
    np.testing.assert_allclose(scanned, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parity
def test_skip_equals_diffusers_without_the_block(ref):
    import torch

    torch_ref, params = ref
    x, cond = inputs(3, 4, 6)
    blocks = torch_ref.blocks
    for i in (0, 2):
        torch_ref.blocks = torch.nn.ModuleList([b for j, b in enumerate(blocks) if j != i])
        try:
            theirs = torch_forward(torch_ref, x, cond)
        finally:
            torch_ref.blocks = blocks
        ours = programs()[1](params[False], x, cond, control(slg=i))
        assert relative_error(ours, theirs) < 1e-4


@pytest.mark.parity
def test_identity_temperature_and_blur_equal_a_torch_processor(ref):
    torch_ref, params = ref
    x, cond = inputs(3, 4, 6)
    base = torch_forward(torch_ref, x, cond)
    # the processor reproduces diffusers' own at tau = 1: the reference is the layer
    assert relative_error(with_processor(torch_ref, 1, Perturbed("tau"), x, cond), base) < 1e-5
    cases = [  # (name, block, torch processor, our control)
        ("identity", 1, Perturbed("identity"), control(pag=1)),
        ("tau", 1, Perturbed("tau", 0.3), control(erg=1, tau=0.3)),
        ("tau_sharp", 2, Perturbed("tau", 2.5), control(erg=2, tau=2.5)),
        ("mean", 1, Perturbed("mean"), control(seg=1)),
    ]
    for name, block, processor, ctl in cases:
        theirs = with_processor(torch_ref, block, processor, x, cond)
        assert relative_error(theirs, base) > 1e-3, name  # the perturbation shows
        err = relative_error(programs()[1](params[False], x, cond, ctl), theirs)
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


# -- controls -----------------------------------------------------------------------------


def test_neutral_controls_are_noops():
    x, cond = inputs(3, 4, 6)
    for scan in (False, True):  # every perturbation compiled in, each switched off
        f = model(scan)[2]
        np.testing.assert_allclose(f(x, cond, control()), f(x, cond), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="control has 2 layers, the model 3"):
        model()[2](x, cond, AttentionControl.neutral(2, skip=True))


def test_scanned_blocks_take_the_same_controls():
    config, params, plain, _ = model()
    scan_cfg, stacked, scanned, _ = model(True)
    assert set(stacked) - set(params) == {"blocks"}
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(
        wan.abstract_params(scan_cfg)
    )
    back = wan.unstack_blocks(stacked, config)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, back, params))
    axes = wan.param_axes(scan_cfg)
    assert tuple(axes["blocks"]["ffn"]["linear_1"]["kernel"]) == ("layers", "embed", "mlp")
    assert tuple(axes["blocks"]["attn1"]["to_out"]["kernel"]) == ("layers", "heads", "embed")
    x, cond = inputs(3, 4, 6)
    for ctl in (control(erg=0, pag=2), control(seg=1, slg=2)):
        want = np.asarray(plain(x, cond, ctl))
        np.testing.assert_allclose(scanned(x, cond, ctl), want, rtol=1e-5, atol=1e-5)
        assert not np.allclose(want, plain(x, cond), atol=1e-3)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("layers, first", [((1, 2, 0, 1), 0), ((2, 1, 2, 2), 1)])
def test_branched_equals_the_separate_calls(scan, layers, first):
    _, _, f, branched = model(scan)
    erg, pag, seg, slg = layers
    each = [control(), control(erg=erg), control(pag=pag), control(seg=seg), control(slg=slg)]
    ctl = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *each)
    assert int(first_perturbed_layer(ctl, L)) == first
    x, cond = inputs(3, 4, 6)
    got = np.asarray(branched(x, cond, ctl))
    want = np.stack([f(x, cond, c) for c in each])
    assert got.shape == want.shape == (5, 2, 3, 4, 6, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.max(np.abs(want[1:] - want[:1]), axis=(1, 2, 3, 4, 5)) > 1e-4)


def test_entropy_and_attention_map():
    config, params, plain, _ = model()
    den = wan.make_denoiser(config, params)
    x, cond = inputs(3, 4, 6)  # 3 x 2 x 3 = 18 tokens
    # at a vanishing temperature every query attends uniformly: entropy log(18)
    probe = EntropyProbe.at([1e-6, 1.0], L)
    out, ent = jax.jit(den.with_entropy)(x, T, cond, AttentionControl(probe=probe))
    assert ent.shape == (L, 2, 2, 2)  # (layers, taus, b, heads)
    np.testing.assert_allclose(ent[:, 0], np.log(18.0), rtol=1e-5)
    assert np.all(ent[:, 1] < np.log(18.0) - 1e-3)
    np.testing.assert_allclose(out, plain(x, cond), rtol=1e-5, atol=1e-5)
    # what a token receives from every query sums, over the tokens, to the queries
    capture = AttentionControl(capture=jnp.zeros((L,)).at[1].set(1.0))
    _, received = jax.jit(den.with_attention_map)(x, T, cond, capture)
    assert received.shape == (2, 3, 2, 3)
    np.testing.assert_allclose(np.mean(received, axis=(1, 2, 3)), 1.0, rtol=1e-5)
    assert np.std(received) > 1e-3


def test_blur_3d():
    blur_3d = jax.jit(wan.blur_queries_3d, static_argnums=1)  # sigma traced: one program
    rng = np.random.default_rng(0)
    grid = (3, 4, 5)
    q = jnp.asarray(rng.normal(size=(2, 60, 2, 8)), jnp.float32)
    np.testing.assert_array_equal(blur_3d(q, grid, 0.0), q)
    mean = jnp.broadcast_to(jnp.mean(q, axis=1, keepdims=True), q.shape)
    np.testing.assert_allclose(blur_3d(q, grid, jnp.inf), mean, atol=1e-6)
    # a finite sigma: the dense Gaussian over all token pairs, each axis' weights
    # normalised over the grid
    sigma = 1.3
    pos = np.stack(np.meshgrid(*map(np.arange, grid), indexing="ij"), -1).reshape(-1, 3)
    dense = np.ones((60, 60))
    for a, n in enumerate(grid):
        g = np.exp(-((np.arange(n)[:, None] - np.arange(n)[None]) ** 2) / (2 * sigma**2))
        g /= g.sum(axis=1, keepdims=True)
        dense *= g[pos[:, a][:, None], pos[:, a][None]]
    want = np.einsum("ij,bjhd->bihd", dense, np.asarray(q))
    np.testing.assert_allclose(blur_3d(q, grid, sigma), want, atol=1e-5)
    # one frame: the image blur of SEG on the (rows, columns) grid
    q1 = q[:, :20]
    image = jax.jit(blur_queries, static_argnums=1)(q1, (4, 5), sigma)
    np.testing.assert_allclose(blur_3d(q1, (1, 4, 5), sigma), image, atol=1e-6)


# -- configs, layout, recipes -------------------------------------------------------------


def test_layout_and_recipes_name_blocks():
    lay = wan.layout(wan.wan_config("t2v_1_3b"))
    assert lay.names() == ["blocks.0-29", "transformer_blocks (= blocks)"]
    assert list(targets.resolve("transformer_blocks.3-4", lay)) == [3, 4]
    with pytest.raises(ValueError, match="blocks has 30"):
        targets.resolve("blocks.30", lay)
    assert wan.layout(wan.wan_config("t2v_14b")).names()[0] == "blocks.0-39"
    for name, recipe in wan.RECIPES.items():
        preset = recipe["model.preset"]
        config = wan.wan_config(preset) if preset != "tiny" else wan.wan_config("tiny")
        lay = wan.layout(config)
        specs = [v for k, v in recipe.items() if k.endswith(".layers") and v]
        specs.append(wan.STG_TERMS[name]["layers"])
        for spec in specs:
            assert len(targets.resolve(spec, lay)) >= 1, (name, spec)
        fields = dict(recipe, **{"guidance.terms": {"stg": wan.STG_TERMS[name]}})
        settings.apply(settings.sections(), fields, f"wan recipe {name}")  # real fields


def test_latent_shape_of_a_video():
    config = wan.wan_config("t2v_1_3b")
    # WanPipeline's 480 x 832, 81 frames: 21 latent frames of 60 x 104
    assert wan.latent_shape(config, 81, 480, 832) == (21, 60, 104, 16)
    assert wan.latent_shape(config, 1, 16, 32) == (1, 2, 4, 16)
    bad = {
        (80, 480, 832): r"video\.num_frames=80 must be 4k \+ 1 .*: 77 or 81",
        (81, 470, 832): r"video\.height=470 must be a multiple of 16 .*: 464 or 480",
        (81, 480, 8): r"video\.width=8 must be a multiple of 16 .*: 16$",
    }
    for size, message in bad.items():
        with pytest.raises(ValueError, match=message):
            wan.latent_shape(config, *size)


def test_config_checks_name_the_field():
    bad = {
        "attention_head_dim": (31, "attention_head_dim must be even"),
        "patch_size": ((1, 2), "patch_size must be three integers"),
        "qk_norm": ("rms_norm", "qk_norm must be one of"),
        "num_layers": (0, "num_layers must be an integer >= 1"),
        "eps": (0.0, "eps must be a number > 0"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            wan.wan_config("tiny", **{field: value})
    with pytest.raises(ValueError, match="unknown Wan config field"):
        wan.wan_config("tiny", image_dim=1280)
    with pytest.raises(ValueError, match="image_dim=1280: image-to-video"):
        wan.check_config(dict(wan.wan_config("tiny"), image_dim=1280))
    raw = diffusers_kwargs(wan.wan_config("t2v_14b"))
    for field, value in (("added_kv_proj_dim", 5120), ("image_dim", 1280)):
        with pytest.raises(ValueError, match=f"{field}={value}: an image-to-video Wan"):
            convert_wan.config_from_diffusers(dict(raw, **{field: value}))
    with pytest.raises(ValueError, match="not a WanTransformer3DModel"):
        convert_wan.config_from_diffusers(dict(raw, _class_name="WanVACETransformer3DModel"))
    x, cond = inputs(1, 5, 6)
    config = wan.wan_config("tiny")
    run = lambda p: wan.make_denoiser(config, p)(x, T, cond)  # noqa: E731
    with pytest.raises(ValueError, match=r"multiple of patch_size=\(1, 2, 2\)"):
        jax.eval_shape(run, wan.abstract_params(config))


@pytest.mark.parity
def test_conversion_errors_and_shards(ref, tmp_path):
    from safetensors.numpy import load_file, save_file

    torch_ref, converted = ref
    src = str(tmp_path / "sharded")
    torch_ref.save_pretrained(src, max_shard_size="100KB")
    assert os.path.exists(os.path.join(src, "diffusion_pytorch_model.safetensors.index.json"))
    got, _ = convert_wan.convert_diffusers_wan(src)
    same = jax.tree_util.tree_map(np.array_equal, got, converted[False])
    assert jax.tree_util.tree_all(same)

    torch_ref.save_pretrained(str(tmp_path / "one"))
    tensors = load_file(str(tmp_path / "one" / "diffusion_pytorch_model.safetensors"))

    def folder(name, edit):
        path = tmp_path / name
        os.makedirs(path)
        shutil.copy(tmp_path / "one" / "config.json", path / "config.json")
        edited = dict(tensors)
        edit(edited)
        save_file(edited, str(path / "diffusion_pytorch_model.safetensors"))
        return str(path)

    key = "blocks.1.attn2.norm_k.weight"
    with pytest.raises(ValueError, match=key):
        convert_wan.convert_diffusers_wan(folder("missing", lambda sd: sd.pop(key)))
    table = "blocks.2.scale_shift_table"
    with pytest.raises(ValueError, match=table):
        convert_wan.convert_diffusers_wan(
            folder("shape", lambda sd: sd.update({table: np.ones((1, 5, 64), np.float32)}))
        )
    extra = "blocks.0.attn2.add_k_proj.weight"  # an image-to-video tensor
    with pytest.raises(ValueError, match=extra.replace(".", r"\.")):
        convert_wan.convert_diffusers_wan(
            folder("extra", lambda sd: sd.update({extra: np.ones((64, 64), np.float32)}))
        )
    with open(tmp_path / "one" / "config.json") as f:
        assert json.load(f)["_class_name"] == "WanTransformer3DModel"


@pytest.mark.parity
def test_param_counts_match_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    published = {"t2v_1_3b": 1_418_996_800, "t2v_14b": 14_288_491_584}
    published["t2v_a14b"] = published["t2v_14b"]  # each expert
    for name, count in published.items():
        config = wan.wan_config(name)
        raw = diffusers_kwargs(config)
        stored = dict(dtype="bfloat16", param_dtype="bfloat16")
        assert convert_wan.config_from_diffusers(raw, **stored) == config
        with torch.device("meta"):  # shapes only, nothing allocated
            ref = diffusers.WanTransformer3DModel(**raw)
        assert wan.count_params(config) == sum(p.numel() for p in ref.parameters()) == count
