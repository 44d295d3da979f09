"""Many terms, each its own: a labelled term carries its own method, weight, schedule,
window, layers and CFG rescale; the method is the sum of its terms computed one by one;
single-term names are unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax import settings
from erg_jax.jobs.job_setup import make_methods
from tests.toys import make_toy_transformer

TERMS = {
    "mid_pag": {"method": "pag", "layers": "1", "scale": 2.0, "interval": (0.3, 0.8)},
    "late_slg": {
        "method": "slg",
        "layers": "0,2",
        "scale": 3.0,
        "shape": "linear",
        "interval": (0.0, 0.5),
        "rescale": 0.7,
    },
    "erg_a": {"method": "erg", "tau": 0.3, "layers": "2", "scale": 1.5},
}


def _preds(n, seed=0):
    ks = jax.random.split(jax.random.key(seed), n)
    return [jax.random.normal(k, (2, 4, 4, 3)) for k in ks]


def _alone(label, **extra):
    """The labelled term as a guider of its own (the same settings)."""
    return G.make_guider(label, terms={label: {**TERMS[label], **extra}})


@pytest.mark.parametrize("t", [0.9, 0.6, 0.4, 0.1])
def test_a_multi_term_method_is_the_sum_of_its_terms(t):
    """cfg + three labelled terms, each with its own weight, schedule and window: the
    combined x0 equals the strong one plus each term's own difference, computed alone
    from the same branch predictions; outside a term's window the step is the method
    without it."""
    method = "cfg+mid_pag+late_slg+erg_a"
    guider = G.make_guider(method, scale=4.0, terms=TERMS)
    assert [term.rescale for term in guider.terms] == [None, None, np.float32(0.7), None]
    preds = _preds(5)
    t = jnp.float32(t)
    out, _ = guider.combine(preds, t, guider.init_state(preds[0]))
    parts = [G.make_guider("cfg", scale=4.0)] + [_alone(k) for k in TERMS]
    total = preds[0]
    for part, weak in zip(parts, preds[1:], strict=True):
        alone, _ = part.combine([preds[0], weak], t, part.init_state(preds[0]))
        total = total + (alone - preds[0])
    np.testing.assert_allclose(out, total, rtol=1e-5, atol=1e-5)
    # the terms whose windows exclude t change nothing: the method without them
    inside = [
        k
        for k, v in TERMS.items()
        if v.get("interval", (0, 1))[0] <= t <= v.get("interval", (0, 1))[1]
    ]
    keep = [0] + [1 + list(TERMS).index(k) for k in inside]
    without = G.make_guider("+".join(["cfg", *inside]), scale=4.0, terms=TERMS)
    sub, _ = without.combine(
        [preds[0]] + [preds[1 + i] for i in keep], t, without.init_state(preds[0])
    )
    np.testing.assert_allclose(out, sub, rtol=1e-6, atol=1e-6)


def test_the_same_method_twice_with_its_own_layers():
    terms = {
        "slg_early": {"method": "slg", "layers": "0", "scale": 2.0, "interval": (0.5, 1.0)},
        "slg_late": {"method": "slg", "layers": "2", "scale": 3.0, "interval": (0.0, 0.5)},
    }
    guider = G.make_guider("slg_early+slg_late", terms=terms)
    controls = guider.controls(jnp.float32(0.7), 3)
    np.testing.assert_array_equal(controls[1].skip, [1, 0, 0])
    np.testing.assert_array_equal(controls[2].skip, [0, 0, 1])
    assert [float(t.weight.scale) for t in guider.terms] == [2.0, 3.0]


def _sample(guider, steps=4):
    den, _ = make_toy_transformer(num_layers=3)
    keys = S.sample_keys(0, jnp.arange(2))
    noise = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
    cond = jax.random.normal(jax.random.key(2), (2, 16))
    conds = {"cond": cond, "null": jnp.zeros_like(cond)}
    return np.asarray(
        S.sample(den, noise, conds, guider, S.make_sampler("euler", steps), keys=keys, num_layers=3)
    )


@pytest.mark.parametrize("method", ["cfg", "erg", "pag"])
def test_a_single_term_label_samples_the_named_method_bitwise(method):
    settings_ = {"erg": {"tau": 0.4}, "pag": {"layers": "1"}}.get(method, {})
    named = G.make_guider(method, scale=3.0, **({method: settings_} if settings_ else {}))
    labelled = G.make_guider("only", scale=3.0, terms={"only": {"method": method, **settings_}})
    np.testing.assert_array_equal(_sample(named), _sample(labelled))


def test_a_terms_own_rescale_on_one_term_is_cfg_rescale():
    ref = G.make_guider("cfg", scale=5.0, cfg={"rescale": 0.7})
    own = G.make_guider("c", scale=5.0, terms={"c": {"method": "cfg", "rescale": 0.7}})
    preds = _preds(2)
    a, _ = ref.combine(preds, jnp.float32(0.5), ref.init_state(preds[0]))
    b, _ = own.combine(preds, jnp.float32(0.5), own.init_state(preds[0]))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_terms_from_a_config_and_their_errors():
    config = settings.sections("mmdit")
    settings.apply(
        config,
        {"guidance.terms": {"late_slg": TERMS["late_slg"]}, "guidance.methods": "cfg,cfg+late_slg"},
        "test",
    )
    methods = make_methods(config, text=True)
    assert len(methods["cfg+late_slg"].terms) == 2
    with pytest.raises(ValueError, match="is a method's name"):
        G.make_guider("cfg+pag", terms={"pag": {"method": "pag"}})
    with pytest.raises(ValueError, match=r"terms.x.method must name a method"):
        G.make_guider("x", terms={"x": {"method": "nope"}})
    with pytest.raises(ValueError, match=r"x.kappa is not a setting of the x method"):
        G.make_guider("x", terms={"x": {"method": "pag", "kappa": 0.2}})
    with pytest.raises(ValueError, match=r"terms.x.rescale"):
        G.make_guider("x", terms={"x": {"method": "cfg", "rescale": 2.0}})
    with pytest.raises(ValueError, match="terms: \\['x'\\]"):
        G.make_guider("cfg+y", terms={"x": {"method": "cfg"}})
