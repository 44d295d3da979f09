"""Layer targets by block name and head (erg_jax.targets): each name resolves to
the global layers it stands for on every model kind, a wrong name is refused with the
valid ones, and a head subset perturbs exactly those heads."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.control import AttentionControl, attend, blur_queries, maybe_blur
from erg_jax.energy import Energy
from erg_jax.models import registry
from tests.toys import make_toy_transformer


def _layout(kind, preset):
    entry = registry.get(kind)
    return entry.make_layout(entry.make_config(preset))


CASES = [
    # kind, preset, named spec, the global ids it stands for
    ("dit", "XL/2", "blocks.12", [12]),
    ("dit", "XL/2", "transformer_blocks.0-2,blocks.27", [0, 1, 2, 27]),
    ("mmdit", "sd3-medium", "joint_blocks.7-9", [7, 8, 9]),  # SD3's SLG recipe
    ("mmdit", "sd3.5-medium", "joint_blocks.0-5", [0, 1, 2, 3, 4, 5]),  # dual attention
    ("mmdit", "sd3.5-large", "transformer_blocks.37,joint_blocks.0", [0, 37]),
    ("flux", "dev", "double_blocks.3", [3]),
    ("flux", "dev", "single_blocks.10-18", list(range(29, 38))),
    ("flux", "schnell", "single_transformer_blocks.0,transformer_blocks.18,56", [18, 19, 56]),
]


@pytest.mark.parametrize("kind,preset,spec,ids", CASES)
def test_names_resolve_to_the_global_layers_they_stand_for(kind, preset, spec, ids):
    layout = _layout(kind, preset)
    got = G.resolve(spec, layout)
    assert got.dtype == np.int32 and got.tolist() == ids
    # the same guider as the ids, field by field
    named = G.resolve_targets(G.make_guider("pag", pag={"layers": spec}), layout)
    by_id = G.make_guider("pag", pag={"layers": ",".join(map(str, ids))})
    assert np.array_equal(named.terms[0].identity_layers, by_id.terms[0].identity_layers)


def test_layouts_count_every_attention_layer():
    for kind, preset in [("dit", "XL/2"), ("mmdit", "sd3.5-large"), ("flux", "dev")]:
        entry = registry.get(kind)
        config = entry.make_config(preset)
        assert entry.make_layout(config).num_layers == config["num_layers"]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("joint_blocks.3", "no blocks named 'joint_blocks'; it has ['double_blocks.0-18'"),
        ("double_blocks.19", "double_blocks has 19 (0..18)"),
        ("single_blocks.5-2", "must run upward"),
        ("double_blocks.0@24", "each layer has 24 (0..23)"),
        ("double-blocks.3", "is not a layer target"),
        ("60", "the model has 57"),
    ],
)
def test_a_wrong_target_is_refused_with_the_valid_names(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        G.resolve(spec, _layout("flux", "dev"), "erg layers")


def test_heads_give_a_layer_by_head_mask():
    layout = _layout("mmdit", "sd3-medium")  # 24 heads
    mask = G.resolve("joint_blocks.2@0-3+7,5@1", layout)
    assert mask.shape == (24, 24) and mask.dtype == np.bool_
    assert set(zip(*np.nonzero(mask), strict=True)) == {
        (2, 0),
        (2, 1),
        (2, 2),
        (2, 3),
        (2, 7),
        (5, 1),
    }


def test_a_named_target_waits_for_the_model_and_says_so():
    guider = G.make_guider("erg", erg={"layers": "joint_blocks.1"})
    assert isinstance(guider.terms[0].energy_layers, G.Target)
    with pytest.raises(ValueError, match="needs the model's layout"):
        G.guider.check_layers(guider, 4)
    den, _ = make_toy_transformer(num_layers=2)  # no .layout: refused before tracing
    noise = jnp.zeros((1, 4, 4, 2))
    conds = {"cond": jnp.zeros((1, 16)), "null": jnp.zeros((1, 16))}
    sampler = S.make_sampler("euler", 2)
    with pytest.raises(ValueError, match="needs the model's layout"):
        S.sample(
            den, noise, conds, guider, sampler, keys=S.sample_keys(0, jnp.arange(1)), num_layers=2
        )


def _toy_layout(num_layers=3, heads=2):
    return G.Layout((("blocks", num_layers),), heads)


def _sample(den, guider, steps=3):
    keys = S.sample_keys(0, jnp.arange(2))
    noise = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
    cond = jax.random.normal(jax.random.key(2), (2, 16))
    conds = {"cond": cond, "null": jnp.zeros_like(cond)}
    sampler = S.make_sampler("euler", steps)
    return S.sample(den, noise, conds, guider, sampler, keys=keys, num_layers=den.num_layers)


@pytest.mark.parametrize("method", ["erg", "pag", "seg", "slg"])
def test_a_denoiser_with_a_layout_samples_names_as_their_ids(method):
    den, _ = make_toy_transformer(num_layers=3)
    den.layout = _toy_layout()
    named = _sample(den, G.make_guider(method, **{method: {"layers": "blocks.1-2"}}))
    by_id = _sample(den, G.make_guider(method, **{method: {"layers": "1,2"}}))
    np.testing.assert_array_equal(np.asarray(named), np.asarray(by_id))


def _qkv(b=2, n=16, h=3, d=4):
    ks = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (b, n, h, d)) for k in ks]


def _softmax_attention(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


def test_identity_attention_on_a_head_subset():
    q, k, v = _qkv()
    ctl = AttentionControl(identity=jnp.array([0.0, 1.0, 0.0]))
    out = attend(q, k, v, ctl)
    ref = _softmax_attention(q, k, v)
    np.testing.assert_allclose(out[:, :, 1], v[:, :, 1], atol=0)
    np.testing.assert_allclose(out[:, :, [0, 2]], ref[:, :, [0, 2]], atol=1e-5)


def test_query_blur_on_a_head_subset():
    q, _, _ = _qkv()
    ctl = AttentionControl(blur=jnp.array([2.0, 0.0, 2.0]))
    out = maybe_blur(q, (4, 4), ctl)
    blurred = blur_queries(q, (4, 4), jnp.float32(2.0))
    np.testing.assert_array_equal(out[:, :, 1], q[:, :, 1])
    np.testing.assert_allclose(out[:, :, [0, 2]], blurred[:, :, [0, 2]], atol=1e-6)


def test_per_head_controls_from_head_targets():
    """PAG / SEG / ERG on "blocks.1@1": only head 1 of layer 1 perturbed; ERG's head
    target equals the per-head Energy it stands for."""
    layout = _toy_layout(3, 2)
    resolve = lambda g: G.resolve_targets(g, layout)  # noqa: E731
    t = jnp.float32(0.5)
    pag = resolve(G.make_guider("pag", pag={"layers": "blocks.1@1"}))
    ctl = pag.controls(t, 3)[1]
    np.testing.assert_array_equal(ctl.identity, [[0, 0], [0, 1], [0, 0]])
    seg = resolve(G.make_guider("seg", seg={"layers": "blocks.1@1", "sigma": 3.0}))
    np.testing.assert_array_equal(seg.controls(t, 3)[1].blur, [[0, 0], [0, 3], [0, 0]])
    erg = resolve(G.make_guider("erg", erg={"layers": "blocks.1@1", "tau": 0.4}))
    tau = np.ones((3, 2), np.float32)
    tau[1, 1] = 0.4
    per_head = G.make_guider("erg", erg={"layers": ""})
    per_head = per_head.replace(
        terms=(per_head.terms[0].replace(energy=Energy(tau=jnp.asarray(tau))),)
    )
    a, b = erg.controls(t, 3)[1].energy, per_head.controls(t, 3)[1].energy
    for field in ("tau", "alpha", "gamma"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    den, _ = make_toy_transformer(num_layers=3, heads=2)
    np.testing.assert_allclose(_sample(den, erg), _sample(den, per_head), atol=1e-6)


def test_mixed_per_head_and_per_layer_terms_share_one_layout():
    layout = _toy_layout(3, 2)
    g = G.make_guider("pag+seg", pag={"layers": "blocks.0@0"}, seg={"layers": "2"})
    g = G.resolve_targets(g, layout)
    controls = g.controls(jnp.float32(0.5), 3)
    assert {c.identity.shape for c in controls} == {(3, 2)}
    np.testing.assert_array_equal(controls[2].identity, np.zeros((3, 2)))
    den, _ = make_toy_transformer(num_layers=3, heads=2)
    assert np.all(np.isfinite(np.asarray(_sample(den, g, steps=2))))


def test_heads_are_refused_where_they_mean_nothing():
    layout = _toy_layout(3, 2)
    slg = G.resolve_targets(G.make_guider("slg", slg={"layers": "blocks.1@0"}), layout)
    with pytest.raises(ValueError, match="slg skips whole blocks"):
        G.guider.check_layers(slg, 3)
    erg = G.make_guider("erg", erg={"layers": "blocks.1@0", "steps": 2})
    with pytest.raises(ValueError, match="steps > 1"):
        G.guider.check_layers(G.resolve_targets(erg, layout), 3)
