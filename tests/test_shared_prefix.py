"""The DiT's shared-prefix branch evaluation against the plain vmap over branches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import Energy
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.models import dit
from erg_jax.models.shared_prefix import first_perturbed_layer

L = 4


def _model(**overrides):
    cfg = dit.dit_config("tiny/2", num_layers=L, **overrides)
    params = dit.init_params(cfg, jax.random.key(0))
    if overrides.get("scan_blocks"):
        params = dit.stack_blocks(params, L) if "blocks" not in params else params
    return dit.make_denoiser(cfg, params), cfg


def _plain(den):
    """The same denoiser without ``branched``: the sampler vmaps every branch."""
    return lambda x, t, c, a=None: den(x, t, c, a)


def _inputs(b=3):
    x = jax.random.normal(jax.random.key(1), (b, 8, 8, 4))
    t = jnp.full((b,), 500.0)
    labels = jnp.arange(b) % 10
    return x, t, labels


GUIDERS = {
    "erg_late": (G.erg(3.0, energy=Energy(0.3), layers=[2, 3], condition="cond"), 2),
    "erg_all": (G.erg(3.0, energy=Energy(0.3), condition="cond"), 0),
    "erg_k3": (G.erg(3.0, energy=Energy(0.3, 0.9, 0.7), layers=[1], steps=3), 1),
    "pag": (G.pag(3.0, layers=[1]), 1),
    "seg": (G.seg(3.0, sigma=2.0, layers=[3]), 3),
    "slg": (G.slg(3.0, layers=[2]), 2),
    "pag+seg": (G.compose(G.pag(2.0, layers=[3]), G.seg(2.0, layers=[2])), 2),
}


@pytest.mark.parametrize("name", sorted(GUIDERS))
def test_first_perturbed_layer_is_found_from_the_controls(name):
    guider, first = GUIDERS[name]
    ctl = guider.controls(jnp.float32(0.5), L)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ctl)
    assert int(first_perturbed_layer(stacked, L)) == first


def test_before_the_kickoff_no_layer_is_perturbed():
    guider = G.erg(3.0, energy=Energy(0.3), layers=[1], kappa=0.4)
    for t, first in ((0.9, L), (0.5, 1)):
        ctl = guider.controls(jnp.float32(t), L)
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ctl)
        assert int(first_perturbed_layer(stacked, L)) == first


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", sorted(GUIDERS))
def test_branched_equals_the_vmapped_branches(name, scan):
    den, cfg = _model(scan_blocks=scan)
    guider, _ = GUIDERS[name]
    x, t, labels = _inputs()
    ctl = guider.controls(jnp.float32(0.5), L)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ctl)
    fast = jax.jit(den.branched)(x, t, labels, stacked)
    slow = jax.jit(jax.vmap(lambda c: den(x, t, labels, c)))(stacked)
    assert fast.shape == slow.shape == (guider.num_branches, 3, 8, 8, 8)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), atol=2e-6, rtol=1e-5)
    # The weak branch really is perturbed (the comparison is not vacuous).
    assert float(jnp.max(jnp.abs(slow[0] - slow[1]))) > 1e-4
    # No controls at all: one branch, the plain forward.
    one = jax.jit(lambda x: den.branched(x, t, labels, None))(x)
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(den(x, t, labels)), atol=2e-6)


@pytest.mark.parametrize("method", ["erg", "pag", "seg", "cfg"])
def test_sampling_with_and_without_the_shared_prefix_agrees(method):
    den, cfg = _model()
    guiders = {
        "erg": G.erg(3.0, energy=Energy(0.3), layers=[2], kappa=0.3, condition="cond"),
        "pag": G.pag(3.0, layers=[1]),
        "seg": G.seg(3.0, sigma=1.0, layers=[2]),
        "cfg": G.cfg(3.0),  # different conditions: the plain path either way
    }
    x, _, labels = _inputs()
    keys = S.sample_keys(0, jnp.arange(3))
    conds = {"cond": labels, "null": jnp.full((3,), 10)}
    smp = S.make_sampler("ddim", 4, learned_sigma=True)

    def run(d):
        return jax.jit(
            lambda n: S.sample(d, n, conds, guiders[method], smp, keys=keys, num_layers=L)
        )(x)

    fast, slow = np.asarray(run(den)), np.asarray(run(_plain(den)))
    # Samples of a random DiT grow large; compare relative to their scale.
    assert np.max(np.abs(fast - slow)) <= 1e-5 * np.max(np.abs(slow))


def test_a_sweep_over_layers_and_kickoff_compiles_once():
    den, cfg = _model()
    x, t, labels = _inputs()
    keys = S.sample_keys(0, jnp.arange(3))
    conds = {"cond": labels}
    smp = S.make_sampler("ddim", 2, learned_sigma=True)
    run = jax.jit(lambda g: S.sample(den, x, conds, g, smp, keys=keys, num_layers=L))
    outs = []
    for layers, kappa in (([0, -1], 0.0), ([3, -1], 0.0), ([1, 2], 0.5), ([2, 3], 1.0)):
        g = G.erg(3.0, energy=Energy(0.3), layers=layers, kappa=kappa, condition="cond")
        outs.append(run(g))
        ref = jax.jit(lambda g: S.sample(_plain(den), x, conds, g, smp, keys=keys, num_layers=L))(g)
        err = np.max(np.abs(np.asarray(outs[-1]) - np.asarray(ref)))
        assert err <= 1e-5 * np.max(np.abs(np.asarray(ref)))
    assert run._cache_size() == 1
