"""Combination rules (CFG-Zero*, TCFG, FDG, MAMBO-G, APG-Mix) against diffusers' guider
classes on the same predictions over several steps, their spaces, and their guiders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import make_toy_transformer

from erg_jax import Energy
from erg_jax import guidance as G
from erg_jax import rules as R
from erg_jax import samplers as S

torch = pytest.importorskip("torch", reason="parity with diffusers' guiders needs torch")
guiders = pytest.importorskip("diffusers.guiders", reason="parity needs diffusers")

SHAPE = (2, 8, 8, 3)  # (b, H, W, c)
STEPS = 5


def _preds(seed):
    """Strong and weak predictions for STEPS steps, correlated like a model's."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((STEPS,) + SHAPE).astype(np.float32)
    strong = base + 0.3 * rng.standard_normal(base.shape).astype(np.float32)
    weak = 0.9 * base + 0.3 * rng.standard_normal(base.shape).astype(np.float32)
    return strong, weak


def _theirs(guider, strong, weak, momentum=None, tokens=False):
    """diffusers' guided prediction per step (NCHW tensors, or (b, H * W, c) token
    arrays with ``tokens``), its state carried."""
    out = []
    for i in range(STEPS):
        guider.set_state(i, STEPS, torch.tensor(1000 - 100 * i))
        if momentum is not None and i == 0:  # what its prepare_inputs does at step 0
            guider.momentum_buffer = momentum
        if tokens:
            c, u = (torch.from_numpy(a[i].reshape(SHAPE[0], -1, SHAPE[-1])) for a in (strong, weak))
            out.append(guider.forward(c, u).pred.numpy().reshape(SHAPE))
            continue
        c, u = (torch.from_numpy(a[i].transpose(0, 3, 1, 2).copy()) for a in (strong, weak))
        out.append(guider.forward(c, u).pred.numpy().transpose(0, 2, 3, 1))
    return np.stack(out)


def _ours(rule, w, strong, weak):
    """Our guided prediction per step; w is the term's weight, one or one per step."""
    state, out = rule.init(jnp.asarray(strong[0])), []
    ws = np.broadcast_to(np.float32(w), (STEPS,))
    for i in range(STEPS):
        s, u = jnp.asarray(strong[i]), jnp.asarray(weak[i])
        delta, state = rule.delta(s, u, jnp.float32(ws[i]), state, jnp.int32(i))
        out.append(np.asarray(s + delta))
    return np.stack(out)


def _close(ours, theirs, tol=1e-5):
    err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    assert err < tol, err


@pytest.mark.parametrize("zero_steps", [0, 1, 2])
def test_cfg_zero_star_equals_diffusers(zero_steps):
    strong, weak = _preds(0)
    theirs = _theirs(
        guiders.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=zero_steps),
        strong,
        weak,
    )
    ours = _ours(R.ZeroStar(zero_steps), 4.0, strong, weak)
    _close(ours, theirs)
    assert np.all(ours[:zero_steps] == 0) and np.all(ours[zero_steps:] != 0)


def test_tcfg_equals_diffusers():
    strong, weak = _preds(1)
    theirs = _theirs(guiders.TangentialClassifierFreeGuidance(guidance_scale=5.0), strong, weak)
    _close(_ours(R.Tangential(), 5.0, strong, weak), theirs)


def test_tangential_weak_is_the_rank_one_projection():
    strong, weak = (jnp.asarray(a[0]) for a in _preds(2))
    m = np.stack([np.asarray(strong).reshape(2, -1), np.asarray(weak).reshape(2, -1)], 1)
    ref = []
    for mi in m.astype(np.float64):
        _, _, vh = np.linalg.svd(mi, full_matrices=False)
        ref.append((mi[1] @ vh[0]) * vh[0])
    _close(np.asarray(R.tangential_weak(strong, weak)).reshape(2, -1), np.stack(ref))


@pytest.mark.parametrize("alpha", [0.5, 8.0])
def test_mambo_equals_diffusers(alpha):
    strong, weak = _preds(3)
    # diffusers' norm over dims 1.. takes 3-D predictions (packed tokens) only.
    ref = guiders.MagnitudeAwareGuidance(guidance_scale=6.0, alpha=alpha)
    theirs = _theirs(ref, strong, weak, tokens=True)
    _close(_ours(R.Magnitude(alpha), 6.0, strong, weak), theirs)


def test_fdg_without_projection_equals_diffusers():
    pytest.importorskip("kornia", reason="diffusers' FDG builds its pyramid with kornia")
    strong, weak = _preds(4)
    ref = guiders.FrequencyDecoupledGuidance(guidance_scales=[7.0, 3.0, 2.0])
    # The term's schedule gates FDG at scale 2: w - 1 = 1 inside the interval.
    _close(
        _ours(R.Frequency((7.0, 3.0, 2.0), (1.0, 1.0, 1.0)), 2.0, strong, weak),
        _theirs(ref, strong, weak),
    )


def test_fdg_with_parallel_weights_equals_diffusers_original_formulation():
    """With a projection ours is D_s + (w - 1) P(D_s - D_w) per band, as APG's paper
    writes it: diffusers' original formulation at guidance scale w - 1."""
    pytest.importorskip("kornia", reason="diffusers' FDG builds its pyramid with kornia")
    strong, weak = _preds(5)
    ref = guiders.FrequencyDecoupledGuidance(
        guidance_scales=[6.0, 2.5], parallel_weights=[0.3, 0.8], use_original_formulation=True
    )
    rule = R.Frequency((7.0, 3.5), (0.3, 0.8))
    _close(_ours(rule, 2.0, strong, weak), _theirs(ref, strong, weak))


def test_laplacian_pyramid_matches_kornia_and_inverts():
    kornia = pytest.importorskip("kornia", reason="the reference pyramid is kornia's")
    x = np.random.default_rng(6).standard_normal((2, 16, 8, 3)).astype(np.float32)
    ours = R.laplacian_pyramid(jnp.asarray(x), 3)
    theirs = kornia.geometry.transform.build_laplacian_pyramid(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 3
    )
    for o, t in zip(ours, theirs, strict=True):
        _close(np.asarray(o), t.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(R.reconstruct(ours)), x, atol=1e-5)


def test_apg_mix_equals_diffusers():
    from diffusers.guiders.adaptive_projected_guidance_mix import MomentumBuffer

    strong, weak = _preds(7)
    ref = guiders.AdaptiveProjectedMixGuidance(
        guidance_scale=2.5,
        adaptive_projected_guidance_scale=6.0,
        adaptive_projected_guidance_momentum=-0.5,
        adaptive_projected_guidance_rescale=3.0,
        eta=0.3,
        adaptive_projected_guidance_start_step=1,
        use_original_formulation=True,
    )
    theirs = _theirs(ref, strong, weak, momentum=MomentumBuffer(-0.5))
    # Original formulation: D_s + g (...) is our weight g + 1; steps 0 and 1 are CFG.
    rule = R.Mix(R.APG(-0.5, 3.0, 0.3), scale=7.0, cfg_steps=2)
    _close(_ours(rule, 3.5, strong, weak), theirs)


def test_a_scale_from_the_unconditional_formulation_ports_as_docs_method_says():
    """diffusers' default (HunyuanImage's) D_u + s P(d) is ours at s with eta' =
    (s eta - 1) / (s - 1), without momentum or norm cap (docs/METHOD.md)."""
    strong, weak = _preds(13)
    s, eta = 10.0, 0.0
    ref = guiders.AdaptiveProjectedMixGuidance(
        guidance_scale=3.5,
        adaptive_projected_guidance_scale=s,
        adaptive_projected_guidance_momentum=None,
        adaptive_projected_guidance_rescale=0.0,
        eta=eta,
        adaptive_projected_guidance_start_step=1,
    )
    rule = R.Mix(R.APG(0.0, np.inf, (s * eta - 1.0) / (s - 1.0)), scale=s, cfg_steps=2)
    _close(_ours(rule, 3.5, strong, weak), _theirs(ref, strong, weak))


def test_apg_mix_is_on_only_where_its_weight_is_as_in_diffusers():
    """diffusers runs APG only while CFG is on (steps 1..3 of 5 here), and its momentum
    only accumulates then; our weight is 1 outside the window."""
    from diffusers.guiders.adaptive_projected_guidance_mix import MomentumBuffer

    strong, weak = _preds(10)
    ref = guiders.AdaptiveProjectedMixGuidance(
        guidance_scale=2.5,
        adaptive_projected_guidance_scale=6.0,
        adaptive_projected_guidance_momentum=-0.5,
        adaptive_projected_guidance_rescale=3.0,
        use_original_formulation=True,
        start=0.2,
        stop=0.8,
        adaptive_projected_guidance_start_step=1,
    )
    theirs = _theirs(ref, strong, weak, momentum=MomentumBuffer(-0.5))
    rule = R.Mix(R.APG(-0.5, 3.0, 0.0), scale=7.0, cfg_steps=2)
    ours = _ours(rule, [1.0, 3.5, 3.5, 3.5, 1.0], strong, weak)
    _close(ours, theirs)
    np.testing.assert_array_equal(ours[[0, 4]], strong[[0, 4]])


def test_apg_mix_at_weight_one_adds_nothing_after_its_cfg_steps():
    strong, weak = _preds(11)
    ours = _ours(R.Mix(R.APG(-0.5, 10.0, 0.0), scale=10.0, cfg_steps=2), 1.0, strong, weak)
    np.testing.assert_array_equal(ours, strong)


ZERO_STAR = {
    "cfg_zero_star": lambda: G.cfg_zero_star(4.0, zero_steps=2),
    "cfg_zero_star rescaled": lambda: G.cfg_zero_star(4.0, zero_steps=2, rescale=0.7),
    "cfg+pag+zero_star": lambda: G.make_guider("cfg+pag+zero_star", zero_star={"zero_steps": 2}),
    "cfg+pag+seg+zero_star": lambda: G.make_guider(
        "cfg+pag+seg+zero_star", zero_star={"zero_steps": 2}
    ),
    "cfg_zero_star+pag": lambda: G.compose(G.cfg_zero_star(4.0, zero_steps=2), G.pag(3.0)),
}


@pytest.mark.parametrize("name", sorted(ZERO_STAR))
@pytest.mark.parametrize("index", [0, 1])
def test_a_zero_star_step_has_zero_velocity_whatever_the_terms(name, index):
    """u = (x - a x0) / s - x0 = 0 at x0 = x / (a + s), one term or several."""
    guider = ZERO_STAR[name]()
    rng = np.random.default_rng(12)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    preds = [jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in guider.models]
    a, s = 0.6, 0.8
    out, _ = guider.combine(
        preds, 0.5, guider.init_state(preds[0]), x=jnp.asarray(x), a=a, s=s, index=index
    )
    np.testing.assert_allclose(np.asarray(out), x / (a + s), rtol=1e-5, atol=1e-5)


def test_spaces_convert_the_change_exactly():
    """A rule in eps or velocity space, done by hand in that space, then back to x0."""
    rng = np.random.default_rng(8)
    x, x0s, x0w = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    a, s, w = 0.6, 0.7, 3.0
    rule = R.Magnitude(2.0)
    for space in ("eps", "velocity"):
        eps = [(x - a * p) / s for p in (x0s, x0w)]
        ps = eps if space == "eps" else [e - p for e, p in zip(eps, (x0s, x0w), strict=True)]
        diff = ps[0] - ps[1]
        r = np.sqrt(
            (diff**2).sum((1, 2, 3), keepdims=True) / (ps[1] ** 2).sum((1, 2, 3), keepdims=True)
        )
        guided = ps[0] + (w - 1) * np.exp(-2.0 * r) * diff
        # back to x0: eps -> (x - s eps) / a;  u = eps - x0 -> (x - s u) / (a + s)
        ref = (x - s * guided) / a if space == "eps" else (x - s * guided) / (a + s)
        delta, _ = R.rule_delta(
            rule.replace(space=space),
            *(jnp.asarray(v) for v in (x0s, x0w)),
            w,
            None,
            0,
            jnp.asarray(x),
            a,
            s,
        )
        _close(np.asarray(x0s + delta), ref)


def test_an_eps_rule_adds_nothing_at_pure_noise():
    rng = np.random.default_rng(9)
    x, x0s, x0w = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(3))
    delta, _ = R.rule_delta(R.Tangential(), x0s, x0w, 4.0, None, 0, x, 0.0, 1.0)
    assert np.all(np.isfinite(delta)) and float(jnp.max(jnp.abs(delta))) == 0.0


B, SIZE, C, W, L = 2, 4, 2, 16, 3

NEUTRAL = {
    "cfg_zero_star": lambda: G.cfg_zero_star(1.0, zero_steps=0),
    "tcfg": lambda: G.tcfg(1.0),
    "mambo": lambda: G.mambo(1.0, alpha=3.0),
    "fdg": lambda: G.fdg((1.0, 1.0), parallel=0.5),
    "apg_mix": lambda: G.apg_mix(1.0, cfg_steps=2),
    "apg_mix outside its interval": lambda: G.apg_mix(4.0, cfg_steps=2, interval=(0.0, 0.1)),
    "erg+tcfg": lambda: G.make_guider("erg+tcfg", erg={"scale": 1.0}),
    "erg+fdg": lambda: G.make_guider("erg+fdg", fdg={"scales": (1.0, 1.0)}),
    "erg+apg_mix": lambda: G.make_guider(
        "erg+apg_mix", erg={"scale": 1.0}, apg_mix={"cfg_steps": 2}
    ),
}


def _toy(seed=0):
    den, _ = make_toy_transformer(L, SIZE, C, W, seed=seed)
    keys = S.sample_keys(seed, jnp.arange(B))
    noise = S.initial_noise(keys, (SIZE, SIZE, C))
    cond = jax.random.normal(jax.random.key(seed + 1), (B, W))
    return den, keys, noise, {"cond": cond, "null": jnp.zeros_like(cond)}


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_neutral_settings_give_the_strong_prediction(name):
    den, keys, noise, conds = _toy()
    smp = S.make_sampler("euler", 4)
    guided = S.sample(den, noise, conds, NEUTRAL[name](), smp, keys=keys, num_layers=L)
    plain = S.sample(den, noise, conds, G.none(), smp, keys=keys, num_layers=L)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_zero_star_steps_leave_the_sample_where_it_is():
    """Two terms and two zero steps of two: the Euler steps move x by zero velocity."""
    den, keys, noise, conds = _toy()
    guider = G.make_guider("cfg+pag+zero_star", zero_star={"zero_steps": 2})
    out = S.sample(den, noise, conds, guider, S.make_sampler("euler", 2), keys=keys, num_layers=L)
    np.testing.assert_allclose(np.asarray(out), np.asarray(noise), rtol=1e-5, atol=1e-5)


def test_erg_with_a_rule_uses_the_erg_weak_branch():
    """erg+tcfg contrasts the strong branch with ERG's weak branch, not the null one."""
    den, keys, noise, conds = _toy()
    smp = S.make_sampler("euler", 3)
    erg = G.make_guider("erg+tcfg", erg={"scale": 3.0, "energy": Energy(0.2)})
    cfg = G.tcfg(3.0)
    a = S.sample(den, noise, conds, erg, smp, keys=keys, num_layers=L)
    b = S.sample(den, noise, conds, cfg, smp, keys=keys, num_layers=L)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    assert erg.terms[0].energy is not None and erg.terms[0].condition == "auto"


def test_a_sweep_of_rule_numbers_compiles_once():
    den, keys, noise, conds = _toy()
    smp = S.make_sampler("euler", 3)
    traces = []

    @jax.jit
    def run(guider):
        traces.append(1)
        return S.sample(den, noise, conds, guider, smp, keys=keys, num_layers=L)

    f = np.float32
    for scale, alpha in [(2.0, 1.0), (3.0, 4.0), (5.0, 0.5)]:
        run(G.mambo(f(scale), alpha=f(alpha)))
    for steps, apg in [(1, 2.0), (3, 5.0)]:
        run(
            G.apg_mix(
                f(3.0),
                apg_scale=f(apg),
                cfg_steps=np.int32(steps),
                momentum=f(-0.5),
                norm_threshold=f(10.0),
                eta=f(0.0),
            )
        )
    assert len(traces) == 2


def test_rules_refuse_bad_settings_by_name():
    with pytest.raises(ValueError, match="fdg parallel"):
        G.fdg((3.0, 2.0), parallel=(0.5,))
    with pytest.raises(ValueError, match="tcfg space"):
        G.tcfg(3.0, space="score")
    with pytest.raises(ValueError, match="apg momentum"):
        G.apg_mix(3.0, momentum=1.0)
    with pytest.raises(ValueError, match="already has one"):
        G.with_apg(G.tcfg(3.0))
    with pytest.raises(ValueError, match="has none"):
        G.with_tcfg(G.none())
    with pytest.raises(ValueError, match="divisible by 4"):
        R.Frequency((2.0, 2.0, 2.0), (1.0,) * 3).delta(*(jnp.ones((1, 6, 8, 1)),) * 2, 2.0, None, 0)


def test_job_methods_build_the_rules_from_the_config():
    from configs.common import base_config
    from erg_jax.jobs.job_setup import make_methods

    config = base_config()
    g = config.guidance
    g.methods, g.scale, g.fdg.scales, g.mambo.alpha = (
        "tcfg,erg+fdg,mambo,cfg_zero_star",
        3.0,
        (6.0, 2.0),
        2.0,
    )
    g.zero_star.zero_steps, g.apg_mix.cfg_steps = 2, 4
    out = make_methods(config, text=False)
    assert (
        isinstance(out["tcfg"].terms[0].rule, R.Tangential)
        and out["tcfg"].terms[0].condition == "null"
    )
    fdg = out["erg+fdg"].terms[0]
    assert fdg.energy is not None and tuple(map(float, fdg.rule.scales)) == (6.0, 2.0)
    assert float(fdg.weight.scale) == 2.0  # the schedule gates the bands
    assert float(out["mambo"].terms[0].rule.alpha) == 2.0
    assert int(out["cfg_zero_star"].terms[0].rule.zero_steps) == 2
    g.methods, g.fdg.scales = "fdg", ()
    with pytest.raises(ValueError, match="fdg scales"):
        make_methods(config, text=False)
    g.methods = "erg+tcfg+apg"
    with pytest.raises(ValueError, match="already has one"):
        make_methods(config, text=False)
