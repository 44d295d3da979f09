"""NAG's guider side: a strong-branch control, not a weak branch. One forward per step
alone, the negative text in every branch's condition, its layers and window, its alpha
from the model kind, and its refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.models import registry


class Recorder:
    """A denoiser that records what every traced call receives (cond keys, NAG control)."""

    num_layers = 4

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond, attention=None):
        self.calls.append((sorted(cond), attention))
        negative = cond["negative"]["context"].mean() if "negative" in cond else 0.0
        return x * 0.5 + cond["context"].mean() + negative


def _conds(b=2):
    ks = jax.random.split(jax.random.key(0), 4)
    text = lambda k: {"context": jax.random.normal(k, (b, 3, 8)), "pooled": jnp.ones((b, 8))}  # noqa: E731
    return {"cond": text(ks[0]), "null": text(ks[1])}


def _layout():
    return G.Layout((("joint_blocks", 4),), 2, nag_alpha=0.125)


def _run(guider, steps=3):
    den = Recorder()
    guider = G.resolve_targets(guider, _layout())
    noise = jnp.ones((2, 4, 4, 2))
    S.sample(
        den,
        noise,
        _conds(),
        guider,
        S.make_sampler("euler", steps),
        keys=S.sample_keys(0, jnp.arange(2)),
        num_layers=4,
    )
    return den.calls


def test_nag_alone_is_one_forward_per_step_with_the_negative_text():
    calls = _run(G.make_guider("nag"))
    assert len(calls) == 1  # the scan body: one forward per step
    keys, ctl = calls[0]
    assert keys == ["context", "negative", "pooled"]
    assert ctl.nag is not None and ctl.nag.norm == "l1"
    assert ctl.energy is None and ctl.identity is None


def test_nag_beside_cfg_guides_the_strong_branch_only():
    guider = G.resolve_targets(G.make_guider("cfg+nag", scale=4.0), _layout())
    assert float(guider.nag.scale) == 5.0  # the common scale is CFG's, not NAG's
    assert float(guider.nag.alpha) == 0.125  # SD3's default from the layout
    strong_cond, weak_cond = guider.conditions(_conds(), jnp.float32(0.5))
    null = _conds()["null"]
    np.testing.assert_array_equal(strong_cond["negative"]["context"], null["context"])
    assert "negative" not in weak_cond  # CFG's null branch: the plain model
    strong, weak = guider.controls(jnp.float32(0.5), 4)
    np.testing.assert_array_equal(strong.nag.scale, [5, 5, 5, 5])
    assert weak is None
    np.testing.assert_array_equal(strong.nag.alpha, [0.125] * 4)
    np.testing.assert_array_equal(strong.nag.tau, [2.5] * 4)


def test_beside_cfg_the_strong_forward_runs_apart_with_nag_and_the_null_one_plain():
    calls = _run(G.make_guider("cfg+nag", scale=4.0))
    assert len(calls) == 2
    (strong_keys, strong_ctl), (weak_keys, weak_ctl) = calls
    assert strong_keys == ["context", "negative", "pooled"] and strong_ctl.nag is not None
    assert weak_keys == ["context", "pooled"] and weak_ctl is None


def test_nag_layers_heads_and_window():
    g = G.make_guider(
        "nag",
        nag={"layers": "joint_blocks.1-2", "interval": (0.3, 1.0), "alpha": 0.2, "norm": "l2"},
    )
    g = G.resolve_targets(g, _layout())
    (on,) = g.controls(jnp.float32(0.5), 4)
    np.testing.assert_array_equal(on.nag.scale, [1, 5, 5, 1])
    assert on.nag.norm == "l2" and float(on.nag.alpha[0]) == pytest.approx(0.2)
    (off,) = g.controls(jnp.float32(0.2), 4)  # below the window: the authors' nag_end
    np.testing.assert_array_equal(off.nag.scale, [1, 1, 1, 1])
    heads = G.resolve_targets(G.make_guider("nag", nag={"layers": "joint_blocks.3@1"}), _layout())
    (ctl,) = heads.controls(jnp.float32(0.5), 4)
    np.testing.assert_array_equal(ctl.nag.scale, [[1, 1], [1, 1], [1, 1], [1, 5]])


def test_nag_alpha_follows_the_model_kind():
    for kind, alpha in [("mmdit", 0.125), ("flux", 0.25)]:
        entry = registry.get(kind)
        layout = entry.make_layout(entry.make_config("tiny"))
        assert float(G.resolve_targets(G.nag(), layout).nag.alpha) == alpha
        assert float(G.resolve_targets(G.nag(alpha=0.5), layout).nag.alpha) == 0.5
    dit = registry.get("dit")
    with pytest.raises(ValueError, match="this model has none"):
        G.resolve_targets(G.nag(), dit.make_layout(dit.make_config("XL/2")))
    with pytest.raises(ValueError, match="nag alpha is left to the model kind"):
        G.nag().controls(jnp.float32(0.5), 4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(scale=0.5), "nag scale"),
        (dict(tau=0.0), "nag tau"),
        (dict(alpha=1.5), "nag alpha"),
        (dict(norm="linf"), "nag norm must be one of"),
        (dict(interval=(0.0, 2.0)), "nag interval"),
    ],
)
def test_bad_nag_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        G.nag(**kwargs)


def test_nag_refusals():
    with pytest.raises(ValueError, match="nag and sag"):
        G.make_guider("sag+nag")
    with pytest.raises(ValueError, match="class-conditional"):
        G.check_text_guiders({"nag": G.make_guider("nag")}, text=False, kind="dit")
    with pytest.raises(ValueError, match="'null' condition"):
        G.make_guider("nag").replace(nag=G.nag(alpha=0.1).nag).conditions(
            {"cond": _conds()["cond"]}, jnp.float32(0.5)
        )
