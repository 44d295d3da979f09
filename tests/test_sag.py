"""Self-attention guidance: the captured map against attention recomputed from each
layer's own q and k, the mask, blur and re-noising against diffusers' SAG pipeline, the
sampler's wiring, sweeps compiled once, and the refusals."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import make_toy_transformer

from configs.common import base_config
from erg_jax import guidance as G
from erg_jax import predictions as P
from erg_jax import sag as SAG
from erg_jax import samplers as S
from erg_jax.control import AttentionControl, received_attention
from erg_jax.models import dit, mmdit

B, SIZE, C, W, L = 2, 8, 2, 16, 3


def _toy(seed=0):
    den, inputs = make_toy_transformer(L, SIZE, C, W, seed=seed)
    keys = S.sample_keys(seed, jnp.arange(B))
    noise = S.initial_noise(keys, (SIZE, SIZE, C))
    conds = {"cond": jax.random.normal(jax.random.key(seed + 1), (B, W))}
    return den, inputs, keys, noise, conds


def _received_np(q, k, image=slice(None)):
    """numpy: softmax over every key, the image block, mean over heads, sum over queries."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return p[:, :, image, image].mean(1).sum(1)


def _capture(layer, num_layers):
    return AttentionControl(capture=jax.nn.one_hot(layer, num_layers))


def test_toy_mask_equals_the_one_computed_by_hand_from_the_layer_weights():
    den, inputs, _, noise, conds = _toy()
    t = jnp.full((B,), 0.6)
    layer, heads = 1, 2
    _, received = den.with_attention_map(noise, t, conds["cond"], _capture(layer, L))
    h = np.asarray(inputs(noise, t, conds["cond"])[layer], np.float64)
    wq, wk = (np.asarray(w, np.float64) for w in den.layers[layer][:2])
    q = (h @ wq).reshape(B, -1, heads, W // heads)
    k = (h @ wk).reshape(B, -1, heads, W // heads)
    ref = _received_np(q, k)
    np.testing.assert_allclose(np.asarray(received).reshape(B, -1), ref, rtol=1e-5, atol=1e-5)
    mask = np.asarray(SAG.token_mask(received)).reshape(B, -1)
    np.testing.assert_array_equal(mask, ref > 1.0)  # rows sum to 1: the mean is 1
    assert 0 < mask.sum() < mask.size
    # a one-token patch (the toy) grows to itself; a 2x2 patch to its four pixels
    tokens = np.asarray(SAG.token_mask(received))
    np.testing.assert_array_equal(np.asarray(SAG.pixel_mask(tokens, (8, 8)))[..., 0], tokens)
    grown = np.asarray(SAG.pixel_mask(tokens[:, :4, :3], (8, 6)))[..., 0]
    np.testing.assert_array_equal(grown, np.kron(tokens[:, :4, :3], np.ones((1, 2, 2), bool)))


@pytest.mark.parametrize("solver", ["euler", "ddim"])
def test_an_empty_mask_is_no_guidance_exactly(solver):
    den, _, keys, noise, conds = _toy()
    smp = S.make_sampler(solver, 2)
    plain = S.sample(den, noise, conds, G.none(), smp, keys=keys, num_layers=L)
    # weights of no layer: the map is 0 everywhere, no token is above it, x_t' = x_t
    empty = G.sag(3.0, layer=jnp.zeros((L,)))
    out = S.sample(den, noise, conds, empty, smp, keys=keys, num_layers=L)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    guided = S.sample(den, noise, conds, G.sag(3.0, layer=1), smp, keys=keys, num_layers=L)
    assert float(jnp.max(jnp.abs(guided - plain))) > 1e-3
    # a uniform map marks nothing either
    assert not bool(jnp.any(SAG.token_mask(jnp.ones((2, 4, 4)))))


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.pipelines.deprecated.stable_diffusion_sag import (
        pipeline_stable_diffusion_sag as ref,
    )

    return ref


@pytest.mark.parity
@pytest.mark.parametrize("sigma, shape", [(1.0, (2, 9, 12, 3)), (2.5, (1, 16, 8, 4))])
def test_blur_equals_diffusers_gaussian_blur_2d(reference, sigma, shape):
    import torch

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    theirs = reference.gaussian_blur_2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), 9, sigma)
    ours = SAG.gaussian_blur(jnp.asarray(x), sigma)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1), atol=1e-5)


class _FlowNoise:
    """add_noise of a flow process at noise level t, x_t = (1 - t) x0 + t eps."""

    def __init__(self, t):
        self.t = t

    def add_noise(self, x0, noise, timesteps):
        return (1.0 - self.t) * x0 + self.t * noise


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_weak_input_equals_diffusers_sag_masking(reference, kind):
    import torch
    from diffusers import DDIMScheduler

    b, heads, (gh, gw), patch, c = 2, 3, (4, 5), 2, 4
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, gh * patch, gw * patch, c)).astype(np.float32)
    out = rng.standard_normal(x.shape).astype(np.float32)
    q, k = (rng.standard_normal((b, gh * gw, heads, 8)).astype(np.float32) for _ in "qk")
    logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(8)
    probs = torch.softmax(torch.from_numpy(logits), -1).reshape(b * heads, gh * gw, gh * gw)
    torch_x, torch_out = (torch.from_numpy(a.transpose(0, 3, 1, 2)) for a in (x, out))
    if kind == "flow":
        t = 0.7
        x0, eps = x - t * out, x + (1.0 - t) * out  # velocity u = eps - x0
        scheduler, a, prediction, step = _FlowNoise(t), 1.0 - t, "velocity", torch.tensor(700)
        pred_x0 = torch.from_numpy(x0.transpose(0, 3, 1, 2))
        pred_eps = torch.from_numpy(eps.transpose(0, 3, 1, 2))
    else:
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=kind)
        step = torch.tensor(601)
        abar = float(scheduler.alphas_cumprod[601])
        a, prediction = abar**0.5, {"epsilon": "eps", "v_prediction": "v"}[kind]
    pipe = types.SimpleNamespace(
        scheduler=scheduler,
        unet=types.SimpleNamespace(config=types.SimpleNamespace(attention_head_dim=heads)),
    )
    cls = reference.StableDiffusionSAGPipeline
    if kind != "flow":
        pred_x0 = cls.pred_x0(pipe, torch_x, torch_out, step)
        pred_eps = cls.pred_epsilon(pipe, torch_x, torch_out, step)
    theirs = cls.sag_masking(pipe, pred_x0, probs, (gh, gw), step, pred_eps)
    theirs = theirs.numpy().transpose(0, 2, 3, 1)

    s = 1.0 - a if kind == "flow" else (1.0 - a * a) ** 0.5
    x0 = P.to_x0(jnp.asarray(out), jnp.asarray(x), a, s, prediction)
    received = received_attention(jnp.asarray(q), jnp.asarray(k)).reshape(b, gh, gw)
    ours = SAG.weak_input(jnp.asarray(x), x0, received, a)
    assert 0.1 < float(jnp.mean(SAG.token_mask(received))) < 0.9
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("solver", ["euler", "ddim"])
def test_the_sampler_feeds_the_weak_branch_x_t_prime_and_reads_it_at_x_t(solver):
    den, _, keys, noise, conds = _toy()
    calls = []

    def recorded(x, t, c, a=None):
        calls.append(x)
        return den(x, t, c, a)

    recorded.with_attention_map = den.with_attention_map
    smp = S.make_sampler(solver, 4)
    if solver == "euler":
        point = S._flow_point(smp, jnp.float32(0.7))
    else:
        a = jnp.sqrt(jnp.float32(0.4))
        point = S._Point(jnp.float32(0.5), a, jnp.sqrt(1.0 - a * a), jnp.int32(500))
    g = G.sag(2.5, layer=2)
    x0s, _ = S.evaluate((recorded,), noise, point, g, conds, smp, keys, 0, L)
    t = jnp.broadcast_to(point.native, (B,))
    raw, received = den.with_attention_map(noise, t, conds["cond"], _capture(2, L))
    to_x0 = lambda r: P.to_x0(r, noise, point.a, point.s, smp.prediction)  # noqa: E731
    np.testing.assert_allclose(x0s[0], to_x0(raw), atol=1e-6)
    # x_t' = a x0' + s eps_s, eps_s the strong branch's own noise estimate
    x0 = to_x0(raw)
    eps = (noise - point.a * x0) / point.s
    mask = SAG.pixel_mask(SAG.token_mask(received), (SIZE, SIZE))
    degraded = jnp.where(mask, SAG.gaussian_blur(x0), x0)
    expect = point.a * degraded + point.s * eps
    assert len(calls) == 1 and bool(jnp.any(mask))
    np.testing.assert_allclose(calls[0], expect, atol=1e-5)
    np.testing.assert_allclose(x0s[1], to_x0(den(calls[0], t, conds["cond"])), atol=1e-6)


@functools.cache
def _params(kind):
    """The tiny models' random params, made once (an init costs seconds on 2 cores)."""
    if kind == "dit":
        return dit.init_params(dit.dit_config("tiny/2", num_layers=4), jax.random.key(0))
    return mmdit.init_params(mmdit.mmdit_config("tiny", num_layers=4), jax.random.key(0))


def _dit(scan=False):
    cfg, params = dit.dit_config("tiny/2", num_layers=4), _params("dit")
    if scan:
        cfg = dict(cfg, scan_blocks=True)
        return dit.make_denoiser(cfg, dit.stack_blocks(params, 4)), params
    return dit.make_denoiser(cfg, params), params


@pytest.mark.parametrize("scan", [False, True])
def test_dit_map_equals_attention_of_the_layer_own_q_and_k(scan):
    den, params = _dit(scan)
    plain = dit.make_denoiser(dit.dit_config("tiny/2", num_layers=4), params)
    x = jax.random.normal(jax.random.key(1), (B, 8, 8, 4))
    t, labels = jnp.array([500.0, 80.0]), jnp.array([3, 7])
    run = jax.jit(
        lambda x: plain.module.apply(
            {"params": params},
            x,
            t,
            labels,
            capture_intermediates=lambda m, _: isinstance(m, dit.QKV),
            mutable=["intermediates"],
        )
    )
    expect, state = run(x)
    with_map = jax.jit(den.with_attention_map)
    for layer in (1, 3):
        out, received = with_map(x, t, labels, _capture(layer, 4))
        qkv = state["intermediates"][f"blocks_{layer}"]["qkv"]["__call__"][0]
        q, k = (np.asarray(qkv[:, :, i]).reshape(B, 16, 2, 16) for i in range(2))
        np.testing.assert_allclose(received.reshape(B, -1), _received_np(q, k), rtol=1e-4)
        np.testing.assert_allclose(out, expect, atol=1e-5)


def _mmdit(scan=False):
    cfg, params = mmdit.mmdit_config("tiny", num_layers=4), _params("mmdit")
    if scan:
        cfg = dict(cfg, scan_blocks=True)
        return mmdit.make_denoiser(cfg, mmdit.stack_blocks(params, cfg)), params, cfg
    return mmdit.make_denoiser(cfg, params), params, cfg


def _mmdit_inputs(cfg):
    ks = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(ks[0], (B, 8, 12, 4))
    cond = dict(
        context=jax.random.normal(ks[1], (B, 5, cfg["joint_attention_dim"])),
        pooled=jax.random.normal(ks[2], (B, cfg["pooled_projection_dim"])),
    )
    return x, jnp.array([900.0, 300.0]), cond


@pytest.mark.parametrize("scan", [False, True])
def test_mmdit_map_is_the_image_block_of_the_joint_attention(scan):
    den, params, cfg = _mmdit(scan)
    x, t, cond = _mmdit_inputs(cfg)
    module = mmdit.mmdit_module(dict(cfg, scan_blocks=False))
    norms = ("norm_q", "norm_k", "norm_added_k")
    run = jax.jit(
        lambda x: module.apply(
            {"params": params},
            x,
            t,
            cond["context"],
            cond["pooled"],
            capture_intermediates=lambda m, _: isinstance(m, mmdit.QKNorm) and m.name in norms,
            mutable=["intermediates"],
        )
    )
    expect, state = run(x)
    with_map = jax.jit(den.with_attention_map)
    for layer in (0, 2, 3):  # a dual-attention block, a scanned one, the text-free last
        out, received = with_map(x, t, cond, _capture(layer, 4))
        attn = state["intermediates"][f"blocks_{layer}"]["attn"]
        q, k, ck = (np.asarray(attn[n]["__call__"][0]) for n in norms)
        ref = _received_np(q, np.concatenate([k, ck], axis=1), slice(0, 24))
        assert received.shape == (B, 4, 6)
        np.testing.assert_allclose(received.reshape(B, -1), ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out, expect, atol=1e-5)


def test_sweeps_of_weight_and_layer_compile_once():
    den, _ = _dit()
    x = jax.random.normal(jax.random.key(1), (B, 8, 8, 4))
    keys, conds = S.sample_keys(0, jnp.arange(B)), {"cond": jnp.array([3, 7])}
    smp = S.make_sampler("ddim", 2, learned_sigma=True)
    traces = []

    @jax.jit
    def run(g):
        traces.append(1)
        return S.sample(den, x, conds, g, smp, keys=keys, num_layers=4)

    outs = [run(G.sag(w, layer=i)) for w, i in ((1.5, 0), (1.5, 3), (3.0, 3))]
    assert len(traces) == 1
    assert len({float(jnp.sum(o)) for o in outs}) == 3

    mden, _, cfg = _mmdit()
    mx, _, cond = _mmdit_inputs(cfg)
    flow = S.make_sampler("euler", 2, time="sd3")
    mrun = jax.jit(lambda g: S.sample(mden, mx, {"cond": cond}, g, flow, keys=keys, num_layers=4))
    mouts = [mrun(G.sag(w, layer=i)) for w, i in ((2.0, 1), (2.0, 2), (4.0, 2))]
    assert mrun._cache_size() == 1
    assert len({float(jnp.sum(o)) for o in mouts}) == 3


def test_bad_settings_are_refused_by_name():
    den, _, keys, noise, conds = _toy()
    smp = S.make_sampler("euler", 2)

    def sample(g, d=den):
        return S.sample(d, noise, conds, g, smp, keys=keys, num_layers=L)

    for layer in (-1, 1.5, True):
        with pytest.raises(ValueError, match="sag layer must be a layer index"):
            G.sag(2.0, layer=layer)
    with pytest.raises(ValueError, match="sag layer 5 is past the model's depth"):
        sample(G.sag(2.0, layer=5))
    with pytest.raises(ValueError, match=r"sag layer weights must have shape \(3,\)"):
        sample(G.sag(2.0, layer=jnp.ones((4,))))
    with pytest.raises(ValueError, match="sag cannot use the weak-branch cache"):
        G.cache(G.sag(2.0), every=2)
    cached = G.sag(2.0).replace(cache=G.Cache(2))  # built by hand, past the constructor
    with pytest.raises(ValueError, match="sag cannot use the weak-branch cache"):
        sample(cached)
    with pytest.raises(ValueError, match="at most one sag term"):
        sample(G.compose(G.sag(2.0), G.sag(3.0)))
    with pytest.raises(ValueError, match="with_attention_map"):
        sample(G.sag(2.0), lambda x, t, c, a=None: den(x, t, c, a))
    with pytest.raises(ValueError, match="sag sigma"):
        G.sag(2.0, sigma=0.0)


def test_job_method_and_the_middle_block_default():
    from erg_jax.jobs.job_setup import make_methods

    c = base_config()
    c.guidance.methods = "sag"
    term = make_methods(c, text=False)["sag"].terms[0]
    assert term.uses_sag and term.sag_layer is None and term.condition == "cond"
    np.testing.assert_array_equal(SAG.capture_weights(None, 28), np.eye(28)[14])
    c.guidance.sag.layer = "5"
    assert int(make_methods(c, text=False)["sag"].terms[0].sag_layer) == 5
    c.guidance.sag.layer = "mid"
    with pytest.raises(ValueError, match="sag layer"):
        make_methods(c, text=False)
    c.guidance.sag.layer, c.guidance.methods = "", "sag+cache"
    with pytest.raises(ValueError, match="sag cannot use the weak-branch cache"):
        make_methods(c, text=False)
    assert G.make_guider("sag", sag={"scale": 2.0, "layer": 1}).terms[0].uses_sag


@pytest.mark.parametrize("scan", [False, True])
def test_flux_map_is_the_image_block_after_rope(scan):
    """FLUX.1: text tokens come first; the map is the image-query / image-key block of
    the rotated q, k, in a double-stream (1) and a single-stream (3) layer."""
    from test_flux import inputs, model

    from erg_jax.models import flux

    config, params, plain, _ = model(False)
    den = flux.make_denoiser(*(model(True)[:2] if scan else (config, params)))
    x, t, cond = inputs(config, b=B)
    module = flux.flux_module(config)
    norms = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    _, state = module.apply(
        {"params": params},
        x,
        *flux._conditions(module.s, x, t, cond),
        None,
        capture_intermediates=lambda m, _: isinstance(m, flux.QKNorm) and m.name in norms,
        mutable=["intermediates"],
    )
    grid, text = (4, 6), cond["context"].shape[1]
    rope = flux.rope_tables(flux.position_ids(grid, text), config["axes_dims_rope"])
    with_map = jax.jit(den.with_attention_map)
    for layer, name in ((1, "double_blocks_1"), (3, "single_blocks_1")):
        out, received = with_map(x, t, cond, _capture(layer, 4))
        attn = state["intermediates"][name]["attn"]
        q, k = (attn[n]["__call__"][0] for n in ("norm_q", "norm_k"))
        if name.startswith("double"):
            q, k = (
                jnp.concatenate([attn[f"norm_added_{n}"]["__call__"][0], a], axis=1)
                for n, a in (("q", q), ("k", k))
            )
        q, k = flux.apply_rope(q, rope), flux.apply_rope(k, rope)
        ref = _received_np(q, k, slice(text, None))
        assert received.shape == (B,) + grid
        np.testing.assert_allclose(received.reshape(B, -1), ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out, plain(x, t, cond), atol=1e-5)
