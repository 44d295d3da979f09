"""EMAG-Q: the carried EMA, the per-sample layer choice and the weak prediction against a
numpy reference of the authors' equations on the toy transformer; its identities (outside
the apply window, strength 0, beta 1); the DiT and MMDiT ``with_emag`` scanned and
unscanned; a sample's image independent of its batch; the refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import make_toy_transformer

from erg_jax import guidance as G
from erg_jax import samplers as S
from erg_jax.control import AttentionControl
from erg_jax.emag import control as emag_control

SIZE, C, W, L, HEADS = 4, 2, 16, 3, 2
CANDIDATES = (0, 2)  # layer 1 is not a candidate


def _toy_setup(b=3, seed=0):
    den, inputs = make_toy_transformer(L, SIZE, C, W, heads=HEADS, seed=seed)
    keys = S.sample_keys(seed, jnp.arange(b))
    noise = S.initial_noise(keys, (SIZE, SIZE, C))
    cond = jax.random.normal(jax.random.key(seed + 1), (b, W))
    return den, inputs, keys, noise, {"cond": cond, "null": jnp.zeros_like(cond)}


class Reference:
    """numpy float64 EMAG-Q on the toy (the authors' emag_forward / use_q_ema order):
    delta before the update, E := q at the first accumulating step, l* = argmax of the
    previous step's delta over the candidates per sample, q := s E + (1 - s) q in l*."""

    def __init__(self, den, b, beta, strength, acc, app):
        self.layers = [[np.asarray(w, np.float64) for w in ws] for ws in den.layers]
        self.w_in, self.w_out = (np.asarray(w, np.float64) for w in den.io)
        self.beta, self.strength, self.acc, self.app = beta, strength, acc, app
        self.ema = np.zeros((L, b, SIZE * SIZE, HEADS, W // HEADS))
        self.delta = np.zeros((L, b))
        self.started = np.zeros(L, bool)
        self.chosen = []

    def forward(self, x, t, cond, emag):
        b = x.shape[0]
        h = x.reshape(b, -1, C) @ self.w_in + cond[:, None] + np.sin(t)
        accumulating = emag and self.acc[0] <= t <= self.acc[1]
        applying = emag and self.app[0] <= t <= self.app[1]
        cand = np.array([i in CANDIDATES for i in range(L)])
        chosen = np.argmax(np.where(cand[:, None], self.delta, -np.inf), axis=0)
        if applying:
            self.chosen.append(chosen)
        for i, (wq, wk, wv, wo) in enumerate(self.layers):
            q, k, v = ((h @ w).reshape(b, -1, HEADS, W // HEADS) for w in (wq, wk, wv))
            if accumulating and cand[i]:
                if self.started[i]:
                    self.delta[i] = np.abs(self.ema[i] - q).mean(axis=(1, 2, 3))
                    self.ema[i] = self.beta * self.ema[i] + (1 - self.beta) * q
                else:
                    self.delta[i], self.ema[i], self.started[i] = 0.0, q, True
            if applying:
                for s in np.flatnonzero(chosen == i):
                    q[s] = self.strength * self.ema[i, s] + (1 - self.strength) * q[s]
            logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(W // HEADS)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            a = np.einsum("bhnm,bmhd->bnhd", p / p.sum(-1, keepdims=True), v)
            h = h + np.tanh(a.reshape(b, -1, W) @ wo)
        return (h @ self.w_out).reshape(x.shape), applying


def test_carried_state_and_weak_prediction_follow_the_reference_step_by_step():
    beta, strength, acc, app, w = 0.7, 0.8, (0.3, 1.0), (0.3, 0.8), 2.5
    den, _, keys, noise, conds = _toy_setup(seed=5)  # the samples choose different layers
    guider = G.make_guider(
        "emag",
        scale=w,
        emag=dict(layers="0,2", beta=beta, strength=strength, accumulate=acc, apply=app),
    )
    smp = S.make_sampler("euler", 6)  # t = 1, 5/6, ..., 1/6: 5 accumulating, 3 applying
    step = jax.jit(S.make_step(den, conds, guider, smp, keys, L))
    carry = S.initial_carry(guider, noise, den)
    args = (guider, conds, smp, keys, 0, L, None)
    evaluate = jax.jit(lambda x, point, state: S.evaluate((den,), x, point, *args, state))
    ref = Reference(den, noise.shape[0], beta, strength, acc, app)
    cond = np.asarray(conds["cond"], np.float64)
    x_ref = np.asarray(noise, np.float64)
    grid = np.linspace(1.0, 0.0, 7)
    for i in range(6):
        t = float(grid[i])
        state = carry[1][0]
        x0s, _, _ = evaluate(carry[0], S._flow_point(smp, jnp.float32(t)), state)
        strong, _ = ref.forward(x_ref, t, cond, emag=False)
        weak, applied = ref.forward(x_ref, t, cond, emag=True)
        weak = weak if applied else strong  # outside the apply window: the strong branch
        np.testing.assert_allclose(x0s[1], x_ref - t * weak, rtol=1e-4, atol=1e-4)
        x0 = (x_ref - t * strong) + (w - 1) * t * (weak - strong)
        x_ref = x_ref + (grid[i + 1] - t) * (x_ref - x0) / t
        carry, _ = step(carry, jnp.int32(i))
        held = carry[1][0][0]
        np.testing.assert_allclose(carry[0], x_ref, rtol=1e-4, atol=1e-4, err_msg=f"step {i}")
        np.testing.assert_allclose(held.ema, ref.ema, rtol=1e-4, atol=1e-5, err_msg=f"step {i}")
        np.testing.assert_allclose(held.delta, ref.delta, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(held.started, ref.started)
    assert len(ref.chosen) == 3 and ref.started.tolist() == [True, False, True]
    assert np.all(ref.ema[1] == 0)  # the non-candidate layer never holds queries
    # the samples chose different layers at some step (the choice is per sample)
    assert any(len(set(c.tolist())) > 1 for c in ref.chosen), ref.chosen
    # and the guidance acted
    plain = S.sample(den, noise, conds, G.none(), smp, keys=keys, num_layers=L)
    assert float(jnp.max(jnp.abs(carry[0] - plain))) > 1e-2


def _state_after(den, guider, noise, conds, steps):
    """The guider's EMAG state after ``steps`` euler steps of 6."""
    keys = S.sample_keys(0, jnp.arange(noise.shape[0]))
    smp = S.make_sampler("euler", 6)
    step = jax.jit(S.make_step(den, conds, guider, smp, keys, L))
    carry = S.initial_carry(guider, noise, den)
    for i in range(steps):
        carry, _ = step(carry, jnp.int32(i))
    return carry


def test_outside_the_apply_window_and_at_strength_0_the_weak_branch_is_the_plain_model():
    den, _, keys, noise, conds = _toy_setup()
    guider = G.make_guider("emag", emag=dict(layers="0,2", beta=0.5, strength=0.9))
    carry = _state_after(den, guider, noise, conds, 3)  # E and delta hold three steps
    state = carry[1][0][0]
    x, cond = carry[0], conds["cond"]
    term = guider.terms[0]

    def weak(t, term=term):
        ctl = AttentionControl(emag=emag_control(term, state, jnp.float32(t), L))
        return den.with_emag(x, jnp.full((3,), t), cond, ctl)[0], ctl

    out, ctl = weak(0.9)  # accumulating, not applying
    assert bool(jnp.any(ctl.emag.accumulate)) and not bool(jnp.any(ctl.emag.apply))
    np.testing.assert_array_equal(out, den(x, jnp.full((3,), 0.9), cond))
    out, ctl = weak(0.5)  # applying
    assert bool(jnp.all(jnp.sum(ctl.emag.apply, axis=0) == 1))  # one layer per sample
    assert float(jnp.max(jnp.abs(out - den(x, jnp.full((3,), 0.5), cond)))) > 1e-3
    zero = term.replace(emag=term.emag.replace(strength=jnp.float32(0.0)))
    out, ctl = weak(0.5, zero)
    assert bool(jnp.any(ctl.emag.apply))
    np.testing.assert_array_equal(out, den(x, jnp.full((3,), 0.5), cond))
    # in the sampler: outside the window the term's difference is 0, exactly
    smp = S.make_sampler("euler", 6)

    @jax.jit
    def x0s(t):
        point = S._flow_point(smp, t)
        return S.evaluate((den,), x, point, guider, conds, smp, keys, 0, L, None, (state,))[0]

    for t, same in ((0.1, True), (0.9, True), (0.5, False)):
        strong, weak = x0s(jnp.float32(t))
        assert bool(jnp.array_equal(strong, weak)) == same, t


def test_beta_1_keeps_the_first_queries():
    den, inputs, _, noise, conds = _toy_setup()
    guider = G.make_guider("emag", emag=dict(layers="0,2", beta=1.0))
    held = _state_after(den, guider, noise, conds, 4)[1][0][0]
    h = inputs(noise, jnp.ones((3,)), conds["cond"])  # the first step: nothing applied yet
    for i in CANDIDATES:
        q = (h[i] @ den.layers[i][0]).reshape(3, -1, HEADS, W // HEADS)
        np.testing.assert_array_equal(held.ema[i], q)
    assert bool(jnp.all(held.delta[jnp.array(CANDIDATES)] > 0))


# -- DiT and MMDiT ---------------------------------------------------------------------


def _random(abstract, seed=0):
    """Random params of a model's shapes, scaled by fan-in (no init to compile; adaLN-Zero
    gates that would start at zero act too)."""
    leaves, tree = jax.tree_util.tree_flatten(abstract)
    rng = np.random.default_rng(seed)
    scale = lambda a: np.sqrt(a.shape[0] if len(a.shape) > 1 else 10.0)  # noqa: E731
    out = [jnp.asarray(rng.standard_normal(a.shape, np.float32) / scale(a)) for a in leaves]
    return jax.tree_util.tree_unflatten(tree, out)


@functools.cache
def _dit(scan):
    from erg_jax.models import dit

    config = dit.dit_config("tiny/2", num_layers=4, scan_blocks=scan, remat=scan)
    params = _random(dit.abstract_params(dict(config, scan_blocks=False)))
    params = dit.stack_blocks(params, 4) if scan else params
    den = dit.make_denoiser(config, params)
    x = jax.random.normal(jax.random.key(7), (3, 8, 8, 4))
    return den, x, jnp.array([1, 5, 7]), "blocks.1-2", 4


@functools.cache
def _mmdit(scan):
    from erg_jax.models import mmdit

    config = mmdit.mmdit_config("tiny", num_layers=5, dual_attention_layers=(0, 1, 2))
    params = _random(mmdit.abstract_params(config))
    if scan:
        config = dict(config, scan_blocks=True)
        params = mmdit.stack_blocks(params, config)  # blocks_0_to_2, blocks_3, blocks_4
    den = mmdit.make_denoiser(config, params)
    k = jax.random.split(jax.random.key(3), 3)  # samples that choose different layers
    cond = dict(
        context=jax.random.normal(k[1], (3, 5, config["joint_attention_dim"])),
        pooled=jax.random.normal(k[2], (3, config["pooled_projection_dim"])),
    )
    x = jax.random.normal(k[0], (3, 8, 8, config["in_channels"]))
    return den, x, cond, "joint_blocks.1-3", 5


@pytest.mark.parametrize("make", [_dit, _mmdit], ids=["dit", "mmdit"])
def test_with_emag_scanned_and_unscanned_agree_and_touch_only_candidates(make):
    den, x, cond, spec, n = make(False)
    scanned = make(True)[0]
    guider = G.resolve_targets(G.make_guider("emag", emag={"layers": spec}), den.layout)
    term = guider.terms[0]
    cand = np.isin(np.arange(n), np.asarray(term.emag_layers))
    state = guider.init_state(x, (n,) + den.query_shape(x))[0]
    ks = jax.random.split(jax.random.key(4), 2)
    state = state.replace(
        ema=jax.random.normal(ks[0], state.ema.shape),
        delta=jax.random.uniform(ks[1], state.delta.shape),
        started=jnp.ones((n,), bool),
    )
    ctl = AttentionControl(emag=emag_control(term, state, jnp.float32(0.5), n))
    t = jnp.full((3,), 500.0)
    run = lambda d: jax.jit(d.with_emag)(x, t, cond, ctl)  # noqa: E731
    out, (ema, delta) = run(den)
    out_s, (ema_s, delta_s) = run(scanned)
    np.testing.assert_allclose(out_s, out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ema_s, ema, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(delta_s, delta, rtol=1e-5, atol=1e-6)
    assert ema.shape == state.ema.shape and delta.shape == (n, 3)
    np.testing.assert_array_equal(ema[~cand], state.ema[~cand])  # others: E unchanged
    np.testing.assert_array_equal(delta[~cand], 0.0)
    assert np.all(np.asarray(delta[cand]) > 0)
    moved = np.abs(np.asarray(ema[cand]) - np.asarray(state.ema[cand])).max(axis=(2, 3, 4))
    assert np.all(moved > 1e-3)
    assert float(jnp.max(jnp.abs(out - jax.jit(den)(x, t, cond)))) > 1e-4


@pytest.mark.parametrize("make, method", [(_dit, "emag"), (_mmdit, "cfg+emag")])
def test_a_samples_image_does_not_depend_on_its_batch(make, method):
    den, x, cond, _, n = make(False)
    smp = S.make_sampler("ddim", 5) if make is _dit else S.make_sampler("euler", 5)
    null = jax.tree_util.tree_map(jnp.zeros_like, cond)
    settings = dict(beta=0.8, apply=(0.1, 0.9))  # every layer a candidate

    @functools.partial(jax.jit, static_argnums=1)
    def run(guider, samples):
        idx = jnp.array(samples)
        take = lambda a: a[idx]  # noqa: E731
        conds = {"cond": jax.tree_util.tree_map(take, cond)}
        conds["null"] = jax.tree_util.tree_map(take, null)
        keys = S.sample_keys(0, idx)  # each sample's own key, whatever its batch
        return S.sample(den, x[idx], conds, guider, smp, keys=keys, num_layers=n)

    guider = G.make_guider(method, scale=3.0, emag=settings)
    # a batch-wide choice of layer differs between these batches (the samples differ)
    three, two = run(guider, (0, 1, 2)), run(guider, (2, 0))
    np.testing.assert_allclose(three[jnp.array([2, 0])], two, rtol=1e-5, atol=1e-5)
    # and EMAG acted: the same program with its weight at 1
    off = G.make_guider(method, scale=3.0, emag=dict(settings, scale=1.0))
    assert float(jnp.max(jnp.abs(two - run(off, (2, 0))))) > 1e-3


# -- settings and refusals --------------------------------------------------------------


def test_settings_and_refusals():
    assert G.defaults()["emag"] == dict(
        layers="", beta=0.988, strength=1.0, accumulate=(0.2, 1.0), apply=(0.2, 0.8)
    )
    term = G.make_guider("emag").terms[0]
    assert term.condition == "cond" and float(term.weight.scale) == 1.5
    for bad, match in [
        (dict(beta=1.5), "emag beta"),
        (dict(strength=-0.1), "emag strength"),
        (dict(accumulate=(0.5, 0.2)), "emag accumulate"),
        (dict(apply=(0.2, 1.2)), r"emag apply\[1\]"),
        (dict(apply=(0.2,)), "emag apply must be a window"),
        (dict(accumulate=0.5), "emag accumulate must be a window"),
    ]:
        with pytest.raises(ValueError, match=match):
            G.make_guider("emag", emag=bad)
    with pytest.raises(ValueError, match="emag cannot use the weak-branch cache"):
        G.make_guider("emag+cache")
    with pytest.raises(ValueError, match="emag and sag"):
        G.make_guider("sag+emag")
    den, _, keys, noise, conds = _toy_setup()
    smp = S.make_sampler("euler", 2)
    cached = G.make_guider("emag").replace(cache=G.Cache())
    with pytest.raises(ValueError, match="emag cannot use the weak-branch cache"):
        S.make_step(den, conds, cached, smp, keys, L)
    with pytest.raises(ValueError, match="initial_carry"):
        S.initial_carry(G.make_guider("emag"), noise)
    with pytest.raises(ValueError, match="needs the guider's state"):
        point = S._flow_point(smp, 0.5)
        S.evaluate((den,), noise, point, G.make_guider("emag"), conds, smp, keys, 0, L)

    from erg_jax.models import flux

    config = flux.flux_config("tiny")
    no_emag = flux.make_denoiser(config, flux.abstract_params(config))
    with pytest.raises(ValueError, match="with_emag.*FLUX.1 does not.*flux"):
        S.make_step(no_emag, conds, G.make_guider("emag"), smp, keys, no_emag.num_layers)
    from erg_jax.models import dit

    config = dit.dit_config("tiny/2", num_layers=2)
    dit_den = dit.make_denoiser(config, dit.abstract_params(config))
    heads = G.make_guider("emag", emag={"layers": "blocks.1@0"})
    with pytest.raises(ValueError, match="no heads"):
        S.make_step(dit_den, conds, heads, smp, keys, 2)
