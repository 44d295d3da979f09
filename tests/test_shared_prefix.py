"""The shared-prefix branch evaluation of the DiT and the MMDiT against the plain map
over the branches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import Energy
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.models import dit, mmdit
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


def _dit_every_kind(erg, pag, seg, slg, kappa):
    """One weak branch per perturbation kind, each in its layers (masks: traced data)."""
    mask = lambda ids: jnp.zeros(L, bool).at[jnp.asarray(ids)].set(True)  # noqa: E731
    return G.compose(
        G.erg(3.0, energy=Energy(0.3), layers=mask(erg), kappa=kappa, condition="cond"),
        G.pag(3.0, layers=mask(pag)),
        G.seg(3.0, sigma=2.0, layers=mask(seg)),
        G.slg(3.0, layers=mask(slg)),
    )


# (erg, pag, seg, slg layers, kappa) at t = 0.5, and the first perturbed layer.
DIT_CASES = {
    "erg_late": (([2, 3], [3], [3], [3], 0.0), 2),
    "erg_all": (([0, 1, 2, 3], [3], [3], [3], 0.0), 0),
    "erg_before_kickoff": (([0], [3], [2], [3], 0.8), 2),
    "pag_first": (([3], [1], [2], [3], 0.0), 1),
    "seg_first": (([3], [2], [0], [3], 0.0), 0),
    "slg_first": (([3], [3], [2], [1], 0.0), 1),
}


@functools.cache
def _dit_runs(scan: bool):
    """Jitted (shared prefix, plain per-branch map, first perturbed layer) of a guider;
    one program each for every case of ``DIT_CASES`` (their layers are data)."""
    den, _ = _model(scan_blocks=scan)
    x, t, labels = _inputs()

    def stacked(guider):
        ctl = guider.controls(jnp.float32(0.5), L)
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ctl)

    fast = jax.jit(lambda g: den.branched(x, t, labels, stacked(g)))
    slow = jax.jit(lambda g: jax.vmap(lambda c: den(x, t, labels, c))(stacked(g)))
    first = jax.jit(lambda g: first_perturbed_layer(stacked(g), L))
    return den, fast, slow, first


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("case", sorted(DIT_CASES))
def test_branched_equals_the_vmapped_branches(case, scan):
    (erg, *rest), first = DIT_CASES[case]
    guider = _dit_every_kind(erg, *rest)
    _, fast, slow, first_of = _dit_runs(scan)
    assert int(first_of(guider)) == first
    got, want = np.asarray(fast(guider)), np.asarray(slow(guider))
    assert got.shape == want.shape == (5, 3, 8, 8, 8)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    # Every weak branch is perturbed (ERG only after its kickoff): not a vacuous match.
    gaps = np.max(np.abs(want[1:] - want[:1]), axis=(1, 2, 3, 4))
    np.testing.assert_array_equal(gaps > 1e-4, [rest[-1] < 0.5, True, True, True])


@pytest.mark.parametrize("scan", [False, True])
def test_branched_with_a_multi_step_energy_and_without_controls(scan):
    """ERG's energy with three Hopfield steps (another program), and no controls at all:
    one branch, the plain forward."""
    den, *_ = _dit_runs(scan)
    guider = G.erg(3.0, energy=Energy(0.3, 0.9, 0.7), layers=[1], steps=3)
    x, t, labels = _inputs()
    ctl = guider.controls(jnp.float32(0.5), L)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ctl)
    fast = jax.jit(den.branched)(x, t, labels, stacked)
    slow = jax.jit(jax.vmap(lambda c: den(x, t, labels, c)))(stacked)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), atol=2e-6, rtol=1e-5)
    assert float(jnp.max(jnp.abs(slow[0] - slow[1]))) > 1e-4
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


# The tiny SD3.5-style MMDiT (QK RMSNorm): block 0 dual-attention, blocks 1-2 plain (one
# scanned run with scan_blocks, starting at layer 1), block 3 context-pre-only.
ML = 4


@functools.cache
def _mmdit(scan: bool):
    cfg = mmdit.mmdit_config("tiny", num_layers=ML, dual_attention_layers=(0,))
    params = mmdit.init_params(cfg, jax.random.key(0))
    if scan:  # the same weights in the scanned layout
        cfg = dict(cfg, scan_blocks=True)
        params = mmdit.stack_blocks(params, cfg)
    return mmdit.make_denoiser(cfg, params)


def _text(b=2, seed=2):
    k = jax.random.split(jax.random.key(seed), 2)
    return dict(
        context=jax.random.normal(k[0], (b, 5, 32)), pooled=jax.random.normal(k[1], (b, 32))
    )


def _latents(b=2):
    return jax.random.normal(jax.random.key(1), (b, 8, 12, 4))  # a 4x6 token grid


def _every_kind(erg, pag, seg, slg, kappa):
    """One weak branch per perturbation kind, each in one layer (traced, as data)."""
    at = lambda i: jnp.asarray([i], jnp.int32)  # noqa: E731
    return G.compose(
        G.erg(3.0, energy=Energy(0.3, 0.9, 0.7), layers=at(erg), kappa=kappa, steps=2),
        G.pag(3.0, layers=at(pag)),
        G.seg(3.0, sigma=1.5, layers=at(seg)),
        G.slg(3.0, layers=at(slg)),
    )


@functools.cache
def _mmdit_runs(scan: bool):
    """Jitted (shared prefix, plain per-branch map, first perturbed layer) of a guider."""
    den = _mmdit(scan)
    t = jnp.array([900.0, 300.0])

    def stacked(guider):
        ctl = guider.controls(jnp.float32(0.5), ML)
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ctl)

    fast = jax.jit(lambda g, x, c: den.branched(x, t, c, stacked(g)))
    slow = jax.jit(lambda g, x, c: jax.vmap(lambda a: den(x, t, c, a))(stacked(g)))
    first = jax.jit(lambda g: first_perturbed_layer(stacked(g), ML))
    return fast, slow, first


# (erg, pag, seg, slg layers, kappa) at t = 0.5, and the first perturbed layer.
MMDIT_CASES = {
    "erg_first": ((1, 2, 3, 3, 0.0), 1),
    "erg_before_kickoff": ((0, 3, 2, 3, 0.8), 2),  # SEG first, inside the scanned run
    "pag_first_dual_block": ((3, 0, 2, 3, 0.0), 0),
    "seg_first_dual_block": ((2, 3, 0, 1, 0.0), 0),
    "slg_first": ((3, 3, 3, 1, 0.0), 1),
    "all_in_the_last_block": ((3, 3, 3, 3, 0.0), 3),
}


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("case", sorted(MMDIT_CASES))
def test_mmdit_branched_equals_the_separate_branches(case, scan):
    (erg, *rest), first = MMDIT_CASES[case]
    guider = _every_kind(erg, *rest)
    fast, slow, first_of = _mmdit_runs(scan)
    x, text = _latents(), _text()
    assert int(first_of(guider)) == first
    got, want = np.asarray(fast(guider, x, text)), np.asarray(slow(guider, x, text))
    assert got.dtype == np.float32 and got.shape == want.shape == (5, 2, 8, 12, 4)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # Every weak branch is perturbed (ERG only after its kickoff): not a vacuous match.
    gaps = np.max(np.abs(want[1:] - want[:1]), axis=(1, 2, 3, 4))
    np.testing.assert_array_equal(gaps > 1e-4, [rest[-1] < 0.5, True, True, True])


@pytest.mark.parametrize("scan", [False, True])
def test_mmdit_branched_without_controls_is_the_plain_forward(scan):
    den, x, text = _mmdit(scan), _latents(), _text()
    t = jnp.array([900.0, 300.0])
    got = jax.jit(lambda x, c: den.branched(x, t, c, None))(x, text)
    assert got.shape == (1, 2, 8, 12, 4) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(den(x, t, text)), atol=1e-5)


def test_mmdit_layers_before_the_first_perturbed_one_run_once(monkeypatch):
    calls, block = [], mmdit.JointBlock

    class Counted:
        """JointBlock whose every run (per branch, per layer) is logged at run time."""

        def __init__(self, *args, **kw):
            self.block = block(*args, **kw)

        def apply(self, variables, carry, y, control):
            jax.debug.callback(lambda v: calls.append(v), carry[0][0, 0, 0])
            return self.block.apply(variables, carry, y, control)

    plain = _mmdit(False)  # built (init) before the patch
    monkeypatch.setattr(mmdit, "JointBlock", Counted)
    den = mmdit.make_denoiser(plain.config, plain.params)
    x, text, t = _latents(), _text(), jnp.array([900.0, 300.0])
    run = jax.jit(
        lambda g, s: den.branched(
            x, t, text, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *g.controls(s, ML))
        )
    )
    late = G.erg(3.0, energy=Energy(0.3), layers=jnp.asarray([2]), kappa=0.4, condition="cond")
    # Before the kickoff the branches are one network; after it, 2 shared + 2 x 2 split.
    for s, runs in ((0.9, ML), (0.5, 2 + 2 * 2)):
        calls.clear()
        jax.block_until_ready(run(late, jnp.float32(s)))
        assert len(calls) == runs
    calls.clear()
    every = _every_kind(3, 3, 3, 1, 0.0)  # five branches split from layer 1
    jax.block_until_ready(run(every, jnp.float32(0.5)))
    assert len(calls) == 1 + 5 * 3
    assert run._cache_size() == 2  # one per guider structure, not per layer or kickoff


def test_mmdit_sampling_with_and_without_the_shared_prefix_agrees():
    den, used = _mmdit(False), []

    def spy(x, t, c, a=None):
        return den(x, t, c, a)

    def branched(*args):
        used.append(1)  # at trace time: the sampler takes the shared-prefix path
        return den.branched(*args)

    spy.branched = branched
    x, text = _latents(), _text()
    keys = S.sample_keys(0, jnp.arange(2))
    # With shift 3 the 4 Euler steps evaluate t = 1, 0.9, 0.75, 0.5: ERG kicks off at 0.8.
    guider = G.erg(3.0, energy=Energy(0.3), layers=[2, 3], kappa=0.2, condition="cond")
    smp = S.make_sampler("euler", 4, time="sd3", shift=3.0)

    def run(d):
        return jax.jit(
            lambda n: S.sample(d, n, {"cond": text}, guider, smp, keys=keys, num_layers=ML)
        )(x)

    fast, slow = np.asarray(run(spy)), np.asarray(run(_plain(den)))
    assert used
    assert np.max(np.abs(fast - slow)) <= 1e-5 * np.max(np.abs(slow))
