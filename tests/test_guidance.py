"""Guiders: neutral settings, identities between methods, controls, trace counts, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import make_toy_transformer

from erg_jax import Energy
from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.control import attend

B, SIZE, C, W, L = 3, 4, 2, 16, 3


def _setup(seed=0):
    den, inputs = make_toy_transformer(L, SIZE, C, W, seed=seed)
    keys = S.sample_keys(seed, jnp.arange(B))
    noise = S.initial_noise(keys, (SIZE, SIZE, C))
    cond = jax.random.normal(jax.random.key(seed + 1), (B, W))
    conds = {"cond": cond, "null": jnp.zeros_like(cond), "tempered": 0.5 * cond}
    return den, inputs, keys, noise, conds


ALL = {
    "cfg": lambda s: G.cfg(s),
    "apg": lambda s: G.apg(s, momentum=-0.5, norm_threshold=2.0),
    "erg": lambda s: G.erg(s, energy=Energy(0.3), layers=[1, 2], kappa=0.2),
    "erg3": lambda s: G.erg(s, energy=Energy(0.3, 1.2, 0.7), steps=3),
    "pag": lambda s: G.pag(s, layers=[0]),
    "seg": lambda s: G.seg(s, sigma=2.0),
    "slg": lambda s: G.slg(s, layers=[1]),
    "auto": lambda s: G.autoguidance(s),
    "erg+apg": lambda s: G.with_apg(G.erg(s), momentum=-0.3, eta=0.5),
    "erg+cads": lambda s: G.with_cads(G.erg(s), tau1=0.5, tau2=0.9),
    "cfg+pag": lambda s: G.compose(G.cfg(s), G.pag(s, layers=[2])),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_neutral_weight_returns_the_strong_prediction(name):
    den, _, keys, noise, conds = _setup()
    weak_den, _ = make_toy_transformer(L, SIZE, C, W, seed=9)
    smp = S.make_sampler("euler", 4)
    dens = (den, weak_den)
    guided = S.sample(dens, noise, conds, ALL[name](1.0), smp, keys=keys, num_layers=L)
    plain = S.sample(dens, noise, conds, G.none(), smp, keys=keys, num_layers=L)
    if name == "erg+cads":
        # CADS anneals the strong branch's condition too (it acts on this grid: t = 1 lies
        # past tau2), so w = 1 is the unguided sampler with the same CADS.
        annealed = G.with_cads(G.none(), tau1=0.5, tau2=0.9)
        cads = S.sample(dens, noise, conds, annealed, smp, keys=keys, num_layers=L)
        assert float(jnp.max(jnp.abs(cads - plain))) > 1e-3
        plain = cads
    # equal up to the rounding of a batched (vmapped) against a single forward
    np.testing.assert_allclose(guided, plain, atol=1e-5, rtol=1e-5)
    # and the combine rule alone, on random predictions
    preds = [jax.random.normal(jax.random.key(i), (B, SIZE, SIZE, C)) for i in range(3)]
    g = ALL[name](1.0)
    out, _ = g.combine(preds[: g.num_branches], 0.5, g.init_state(preds[0]))
    np.testing.assert_array_equal(out, preds[0])


def test_guided_methods_differ_from_none():
    den, _, keys, noise, conds = _setup()
    weak_den, _ = make_toy_transformer(L, SIZE, C, W, seed=9)
    smp = S.make_sampler("euler", 4)
    plain = S.sample((den, weak_den), noise, conds, G.none(), smp, keys=keys, num_layers=L)
    for name, make in ALL.items():
        out = S.sample((den, weak_den), noise, conds, make(3.0), smp, keys=keys, num_layers=L)
        assert float(jnp.max(jnp.abs(out - plain))) > 1e-3, name


def test_cfg_formula_and_rescale():
    preds = [jax.random.normal(jax.random.key(i), (B, 4, 4, 2)) for i in range(2)]
    out, _ = G.cfg(4.0).combine(preds, 0.5, (None,))
    np.testing.assert_allclose(out, preds[1] + 4.0 * (preds[0] - preds[1]), atol=1e-5)
    out, _ = G.cfg(4.0, rescale=1.0).combine(preds, 0.5, (None,))
    np.testing.assert_allclose(
        jnp.std(out, axis=(1, 2, 3)), jnp.std(preds[0], axis=(1, 2, 3)), rtol=1e-5
    )


@pytest.mark.parametrize("phi", [0.5, 0.8])
def test_cfg_rescale_mixes_the_std_matched_prediction_by_phi(phi):
    # Lin et al. 2024 in numpy: the CFG prediction scaled to the strong one's std (per
    # sample, over every non-batch axis), mixed with the plain CFG prediction by phi.
    rng = np.random.default_rng(4)
    strong, weak = (
        rng.standard_normal((B, 4, 4, 2)) * [[[[1.0]]], [[[2.0]]], [[[0.5]]]] for _ in "sw"
    )
    guided = weak + 4.0 * (strong - weak)
    ratio = strong.std(axis=(1, 2, 3), keepdims=True) / guided.std(axis=(1, 2, 3), keepdims=True)
    ref = phi * guided * ratio + (1.0 - phi) * guided
    preds = [jnp.asarray(strong, jnp.float32), jnp.asarray(weak, jnp.float32)]
    out, _ = G.cfg(4.0, rescale=phi).combine(preds, 0.5, (None,))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_apg_with_eta_one_no_cap_no_momentum_is_cfg():
    preds = [jax.random.normal(jax.random.key(i), (B, 4, 4, 2)) for i in range(2)]
    g = G.apg(5.0, momentum=0.0, norm_threshold=math.inf, eta=1.0)
    out, _ = g.combine(preds, 0.3, g.init_state(preds[0]))
    ref, _ = G.cfg(5.0).combine(preds, 0.3, (None,))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # eta = 0 drops exactly the component parallel to the strong prediction
    g0 = G.apg(5.0, eta=0.0)
    out0, _ = g0.combine(preds, 0.3, g0.init_state(preds[0]))
    update = (out0 - preds[0]) / 4.0
    dots = jnp.sum(update * preds[0], axis=(1, 2, 3))
    np.testing.assert_allclose(dots, 0.0, atol=1e-4)


def test_apg_norm_threshold_and_momentum():
    strong = jax.random.normal(jax.random.key(0), (B, 4, 4, 2))
    weak = strong - 10.0 * jax.random.normal(jax.random.key(1), (B, 4, 4, 2))
    g = G.apg(2.0, norm_threshold=1.0, eta=1.0)
    out, state = g.combine([strong, weak], 0.5, g.init_state(strong))
    norms = jnp.sqrt(jnp.sum(jnp.square(out - strong), axis=(1, 2, 3)))
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    gm = G.apg(2.0, momentum=-0.5, eta=1.0)
    _, st = gm.combine([strong, weak], 0.5, gm.init_state(strong))
    out2, _ = gm.combine([strong, weak], 0.5, st)
    np.testing.assert_allclose(out2 - strong, 0.5 * (strong - weak), atol=1e-4)
    assert state[0] is not None


def test_cads_with_tau1_at_one_leaves_the_condition_unchanged():
    _, _, keys, _, conds = _setup()
    g = G.with_cads(G.cfg(3.0), tau1=1.0, tau2=1.0)
    for t in (0.0, 0.5, 1.0):
        out = g.conditions(conds, t, keys, step=3)
        np.testing.assert_array_equal(out[0], conds["cond"])
        np.testing.assert_array_equal(out[1], conds["null"])
    g2 = G.with_cads(G.cfg(3.0), tau1=0.2, tau2=0.6, psi=1.0)
    noisy = g2.conditions(conds, 0.9, keys, step=3)[0]
    assert float(jnp.max(jnp.abs(noisy - conds["cond"]))) > 0.1
    # psi = 1 restores each sample's mean and std
    np.testing.assert_allclose(jnp.std(noisy, axis=1), jnp.std(conds["cond"], axis=1), rtol=1e-4)
    # per-sample noise: sample i's condition does not depend on the others in the batch
    sub = g2.conditions({k: v[1:] for k, v in conds.items()}, 0.9, keys[1:], step=3)[0]
    np.testing.assert_allclose(sub, noisy[1:], atol=1e-6)


def test_erg_without_energy_on_the_null_condition_is_cfg():
    den, _, keys, noise, conds = _setup()
    smp = S.make_sampler("heun", 3)
    a = S.sample(
        den,
        noise,
        conds,
        G.erg(4.0, image_energy=False, condition="null"),
        smp,
        keys=keys,
        num_layers=L,
    )
    b = S.sample(den, noise, conds, G.cfg(4.0), smp, keys=keys, num_layers=L)
    np.testing.assert_array_equal(a, b)


def test_ierg_controls_follow_layers_and_kickoff():
    g = G.erg(2.0, energy=Energy(0.4, 1.1, 0.9), layers=[1, 3], kappa=0.3)
    on = g.controls(0.5, 5)[1]
    np.testing.assert_allclose(on.energy.tau, [1, 0.4, 1, 0.4, 1])
    np.testing.assert_allclose(on.energy.alpha, [1, 1.1, 1, 1.1, 1])
    off = g.controls(0.8, 5)[1]
    np.testing.assert_array_equal(off.energy.tau, np.ones(5))
    strong = g.controls(0.5, 5)[0]
    np.testing.assert_array_equal(strong.energy.tau, np.ones(5))
    mask = jnp.array([True, False, False, False, True])
    g2 = G.erg(2.0, energy=Energy(0.4), layers=mask)
    np.testing.assert_allclose(g2.controls(0.1, 5)[1].energy.tau, [0.4, 1, 1, 1, 0.4])


def test_perturbations_reach_only_their_layers():
    den, inputs, _, noise, conds = _setup()
    t = jnp.full((B,), 0.5)
    for g in (
        G.erg(2.0, energy=Energy(0.2), layers=[2]),
        G.pag(2.0, layers=[2]),
        G.seg(2.0, layers=[2]),
        G.slg(2.0, layers=[2]),
    ):
        strong_ctl, weak_ctl = g.controls(0.5, L)
        plain = inputs(noise, t, conds["cond"], None)
        weak = inputs(noise, t, conds["cond"], weak_ctl)
        for i in range(3):
            np.testing.assert_array_equal(weak[i], plain[i])
        np.testing.assert_array_equal(
            den(noise, t, conds["cond"], strong_ctl), den(noise, t, conds["cond"], None)
        )
        assert (
            float(
                jnp.max(
                    jnp.abs(
                        den(noise, t, conds["cond"], weak_ctl) - den(noise, t, conds["cond"], None)
                    )
                )
            )
            > 1e-4
        )


@pytest.mark.parametrize("hk", [4, 2])
def test_pag_layers_attend_each_query_to_itself_only(hk):
    # Identity attention: query i's output is its own value v_i (query head j reads kv
    # head j // (h / hk)); the layers PAG leaves alone keep softmax attention (numpy).
    b, n, h, d = 2, 6, 4, 4
    rng = np.random.default_rng(5)
    q = rng.standard_normal((b, n, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, n, hk, d)).astype(np.float32) for _ in "kv")
    kv = [np.repeat(x, h // hk, axis=2).astype(np.float64) for x in (k, v)]
    s = np.einsum("bnhd,bmhd->bhnm", q, kv[0]) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    softmax_attention = np.einsum("bhnm,bmhd->bnhd", p / p.sum(-1, keepdims=True), kv[1])
    weak = G.pag(2.0, layers=[1]).controls(0.5, L)[1]
    for i in range(L):
        out = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), weak.layer(i)))
        ref = kv[1] if i == 1 else softmax_attention
        np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f"layer {i}")


def test_vmapped_branches_equal_separate_calls():
    den, _, keys, noise, conds = _setup()
    g = G.compose(G.cfg(3.0), G.erg(2.0, energy=Energy(0.5), condition="tempered"))
    smp = S.make_sampler("euler", 2)
    point = S._flow_point(smp, jnp.float32(0.7))
    x0s, _ = S.evaluate((den,), noise, point, g, conds, smp, keys, 0, L)
    ctls = g.controls(0.7, L)
    for x0, c, ctl in zip(x0s, ["cond", "null", "tempered"], ctls, strict=True):
        u = den(noise, jnp.full((B,), 0.7), conds[c], ctl)
        np.testing.assert_allclose(x0, noise - 0.7 * u, atol=1e-5)


def test_a_sweep_of_settings_traces_once():
    den, _, keys, noise, conds = _setup()
    smp = S.make_sampler("euler", 3)
    traces = []

    @jax.jit
    def run(guider):
        traces.append(1)
        return S.sample(den, noise, conds, guider, smp, keys=keys, num_layers=L)

    outs = [
        run(G.erg(w, energy=Energy(tau), kappa=kappa))
        for w, tau, kappa in [
            (1.5, 0.5, 0.0),
            (2.0, 0.3, 0.1),
            (3.0, 0.8, 0.5),
            (4.0, 2.0, 0.2),
            (2.5, 0.1, 0.9),
        ]
    ]
    assert len(traces) == 1
    assert len({float(jnp.sum(o)) for o in outs}) == 5


def test_a_temperature_alone_skips_the_update_and_samples_the_same():
    # alpha = gamma = 1 known when the controls are built: compiled out (static flag);
    # the same guider passed through jit as data keeps the update and draws the same.
    den, _, keys, noise, conds = _setup()
    smp = S.make_sampler("euler", 3)
    g = G.erg(3.0, energy=Energy(0.3), layers=[1, 2])
    assert not g.controls(0.5, L)[1].energy_update
    assert G.erg(3.0, energy=Energy(0.3, 1.0, 0.7)).controls(0.5, L)[1].energy_update
    flags = []

    def run(guider):
        flags.append(guider.controls(0.5, L)[1].energy_update)
        return S.sample(den, noise, conds, guider, smp, keys=keys, num_layers=L)

    closed = jax.jit(lambda n: S.sample(den, n, conds, g, smp, keys=keys, num_layers=L))(noise)
    traced = jax.jit(run)(g)
    assert flags == [True]
    np.testing.assert_allclose(np.asarray(closed), np.asarray(traced), rtol=1e-5, atol=1e-5)
    # The temperature is applied: without it the weak branch is the strong one (= none).
    plain = S.sample(den, noise, conds, G.none(), smp, keys=keys, num_layers=L)
    assert float(jnp.max(jnp.abs(closed - plain))) > 1e-4


def test_weight_schedules_and_interval():
    s = G.schedule(3.0, "linear", interval=(0.2, 0.8))
    np.testing.assert_allclose([s(0.1), s(0.5), s(0.9)], [1.0, 3.0, 1.0])
    c = G.schedule(3.0, "cosine")
    np.testing.assert_allclose([c(0.0), c(0.5), c(1.0)], [5.0, 3.0, 1.0], atol=1e-6)
    ts = jnp.linspace(0, 1, 10001)
    for shape in ("linear", "cosine"):
        np.testing.assert_allclose(jnp.mean(G.schedule(3.0, shape)(ts)), 3.0, atol=1e-3)
    u = G.schedule(3.0, lambda t: t * t)
    np.testing.assert_allclose(u(0.5), 1.5)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: G.erg(2.0, kappa=1.5), "kappa"),
        (lambda: G.erg(2.0, kappa=-0.1), "kappa"),
        (lambda: G.erg(2.0, energy=Energy(tau=0.0)), "tau"),
        (lambda: G.erg(2.0, energy=Energy(gamma=-1.0)), "gamma"),
        (lambda: G.erg(2.0, steps=0), "steps"),
        (lambda: G.make_guider("cfgg"), "unknown or misplaced method"),
        (lambda: G.make_guider("erg+foo"), "foo"),
        (lambda: G.cfg(2.0, shape="square"), "shape"),
        (lambda: G.cfg(2.0, rescale=2.0), "rescale"),
        (lambda: G.seg(2.0, sigma=-1.0), "sigma"),
        (lambda: G.with_cads(G.cfg(), tau1=0.9, tau2=0.5), "tau2"),
        (lambda: G.pag(2.0, layers=[]), "layers"),
    ],
)
def test_bad_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_make_guider_names():
    assert G.make_guider("erg+apg", erg={"scale": 2.0}).terms[0].apg is not None
    assert G.make_guider("erg+cads").cads is not None
    assert G.make_guider("cfg+pag").num_branches == 3
    assert G.make_guider("none").num_branches == 1


@pytest.mark.parametrize("t", [0.1, 0.25, 0.6, 0.9])
def test_weight_schedule_shapes_between_the_checked_points(t):
    # Written out from the definitions: linear 2 (1 - t), cosine 1 + cos(pi t), on (w - 1).
    w = 3.0
    assert float(G.schedule(w, "linear")(t)) == pytest.approx(1 + (w - 1) * 2 * (1 - t), 1e-6)
    cosine = 1 + (w - 1) * (1 + np.cos(np.pi * t))
    assert float(G.schedule(w, "cosine")(t)) == pytest.approx(cosine, 1e-6)


def test_guidance_interval_is_closed_and_its_ends_are_checked_by_name():
    sched = G.schedule(3.0, interval=(0.2, 0.8))
    assert [float(sched(t)) for t in (0.19, 0.2, 0.8, 0.81)] == [1.0, 3.0, 3.0, 1.0]
    with pytest.raises(ValueError, match=r"interval\[0\] must be in \[0.0, 1.0\]"):
        G.schedule(3.0, interval=(-0.1, 0.5))
    with pytest.raises(ValueError, match=r"interval\[1\] must be in \[0.0, 1.0\]"):
        G.schedule(3.0, interval=(0.2, 1.5))


def test_apg_momentum_range_is_open():
    for m in (-1.0, 1.0):
        with pytest.raises(ValueError, match="momentum"):
            G.apg(2.0, momentum=m)
    G.apg(2.0, momentum=-0.99)  # inside the open range


@pytest.mark.parametrize("make", [G.cfg, G.apg, G.erg, G.pag, G.seg, G.slg, G.autoguidance])
def test_every_method_guides_over_the_whole_interval_by_default(make):
    weight = make(2.5).terms[0].weight
    assert [float(weight(t)) for t in (0.0, 0.3, 1.0)] == [2.5, 2.5, 2.5]


def test_with_apg_defaults_are_apgs():
    # the paper's projection: no momentum, no cap, the parallel component dropped (eta 0)
    assert (
        G.with_apg(G.cfg(3.0)).terms[0].apg == G.apg(3.0).terms[0].apg == G.APG(0.0, math.inf, 0.0)
    )


def test_equal_ends_are_allowed_for_cads_and_the_cache_window():
    # CADS with tau1 = tau2: a step from the condition itself to the annealed one
    g = G.with_cads(G.cfg(3.0), tau1=0.7, tau2=0.7)
    keys = S.sample_keys(0, jnp.arange(2))
    cond = jax.random.normal(jax.random.key(1), (2, 8))
    conds = {"cond": cond, "null": jnp.zeros_like(cond)}
    np.testing.assert_array_equal(g.conditions(conds, 0.7, keys)[0], cond)
    assert float(jnp.max(jnp.abs(g.conditions(conds, 0.71, keys)[0] - cond))) > 0.1
    # a cache window of one noise level
    assert (G.cache(G.cfg(3.0), window=(0.5, 0.5)).cache.t_min, 0.5) == (0.5, 0.5)
