"""Solvers against closed-form answers for Gaussian data, and scan-vs-loop equality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import guidance as G
from erg_jax import predictions as P
from erg_jax import samplers as S

MU, SIGMA0 = 0.7, 0.5
N, SHAPE = 2048, (4, 4, 2)


def _posterior_x0(x, a, s):
    """E[x0 | x_t = a x0 + s eps] for x0 ~ N(MU, SIGMA0^2), per coordinate."""
    var = a * a * SIGMA0**2 + s * s
    return MU + a * SIGMA0**2 / var * (x - a * MU)


def _bcast(t, x):
    return jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


def flow_denoiser(time="unit"):
    def den(x, tn, cond, attention=None):
        tn = _bcast(tn, x)
        t = {"unit": tn, "sd3": tn / 1000.0, "sit": 1.0 - tn}[time]
        u = (x - _posterior_x0(x, 1.0 - t, t)) / t
        return -u if time == "sit" else u

    return den


def diffusion_denoiser(prediction="eps", schedule="linear", learned=None):
    abar = jnp.asarray(np.cumprod(1.0 - P.beta_schedule(schedule)), jnp.float32)

    def den(x, k, cond, attention=None):
        ab = _bcast(abar[k.astype(jnp.int32)], x)
        a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
        x0 = _posterior_x0(x, a, s)
        eps = (x - a * x0) / s
        out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
        if learned is not None:
            out = jnp.concatenate([out, jnp.full_like(out, learned)], axis=-1)
        return out

    return den


def _run(den, smp, n=N, seed=0):
    keys = S.sample_keys(seed, jnp.arange(n))
    noise = S.initial_noise(keys, SHAPE)
    conds = {"cond": jnp.zeros((n,))}
    out = jax.jit(lambda: S.sample(den, noise, conds, G.none(), smp, keys=keys, num_layers=1))()
    return out, noise


@pytest.mark.parametrize(
    "den, smp",
    [
        (flow_denoiser(), S.make_sampler("euler", 200)),
        (flow_denoiser(), S.make_sampler("heun", 10)),
        (flow_denoiser("sd3"), S.make_sampler("euler", 200, time="sd3", shift=3.0)),
        (flow_denoiser("sit"), S.make_sampler("heun", 10, time="sit")),
        (diffusion_denoiser("eps"), S.make_sampler("ddim", 250)),
        (
            diffusion_denoiser("v", "cosine"),
            S.make_sampler("ddim", 250, prediction="v", beta_schedule="cosine"),
        ),
        (diffusion_denoiser("x0"), S.make_sampler("ddpm", 1000, prediction="x0")),
        (diffusion_denoiser("eps", learned=0.0), S.make_sampler("ddpm", 250, learned_sigma=True)),
        (diffusion_denoiser("eps"), S.make_sampler("ddim", 1000, eta=1.0)),
    ],
)
def test_solvers_reproduce_gaussian_data(den, smp):
    # Ancestral samplers with the fixed small variance ignore the posterior spread of x0
    # (Bao et al. 2022) and run ~1% narrow even at 1000 steps; the learned variance helps.
    out, _ = _run(den, smp)
    assert abs(float(jnp.mean(out)) - MU) < 0.02 * MU
    assert abs(float(jnp.std(out)) - SIGMA0) < 0.02 * SIGMA0


def _flow_exact(noise):
    # the probability-flow map of Gaussian data is affine: x0 = MU + SIGMA0 * x_1
    return MU + SIGMA0 * noise


def test_heun_error_falls_faster_than_euler():
    errs = {}
    for solver in ("euler", "heun"):
        for steps in (4, 8, 16):
            out, noise = _run(flow_denoiser(), S.make_sampler(solver, steps), n=64)
            errs[solver, steps] = float(jnp.max(jnp.abs(out - _flow_exact(noise))))
    euler_rate = errs["euler", 8] / errs["euler", 16]
    heun_rate = errs["heun", 8] / errs["heun", 16]
    assert 1.6 < euler_rate < 2.5  # first order
    assert heun_rate > 3.0  # second order
    assert errs["heun", 8] < errs["euler", 16]


def test_ddim_eta_one_is_ddpm_and_learned_sigma_bounds():
    a, _ = _run(diffusion_denoiser(), S.make_sampler("ddim", 20, eta=1.0), n=16)
    b, _ = _run(diffusion_denoiser(), S.make_sampler("ddpm", 20), n=16)
    np.testing.assert_allclose(a, b, atol=1e-4)
    # learned sigma at -1 is the small (posterior) variance: the same as fixed small
    c, _ = _run(
        diffusion_denoiser(learned=-1.0), S.make_sampler("ddpm", 20, learned_sigma=True), n=16
    )
    np.testing.assert_allclose(c, b, atol=1e-4)
    d, _ = _run(
        diffusion_denoiser(learned=1.0), S.make_sampler("ddpm", 20, learned_sigma=True), n=16
    )
    assert float(jnp.max(jnp.abs(d - b))) > 1e-3


def test_sample_does_not_depend_on_the_batch():
    smp = S.make_sampler("ddpm", 10)
    full, _ = _run(diffusion_denoiser(), smp, n=8)
    keys = S.sample_keys(0, jnp.arange(5, 8))
    noise = S.initial_noise(keys, SHAPE)
    part = S.sample(
        diffusion_denoiser(),
        noise,
        {"cond": jnp.zeros((3,))},
        G.none(),
        smp,
        keys=keys,
        num_layers=1,
    )
    np.testing.assert_allclose(part, full[5:], atol=1e-6)


@pytest.mark.parametrize("solver", ["euler", "heun", "ddim", "ddpm"])
def test_scan_equals_a_python_loop(solver):
    flow = solver in ("euler", "heun")
    den = flow_denoiser() if flow else diffusion_denoiser()
    smp = S.make_sampler(solver, 6, eta=0.5 if solver == "ddim" else 0.0)
    keys = S.sample_keys(3, jnp.arange(4))
    noise = S.initial_noise(keys, SHAPE)
    conds = {"cond": jnp.zeros((4,)), "null": jnp.zeros((4,))}
    g = G.apg(2.0, momentum=-0.5)
    scanned = S.sample(den, noise, conds, g, smp, keys=keys, num_layers=1)
    step = jax.jit(S.make_step(den, conds, g, smp, keys, 1))
    carry = S.initial_carry(g, noise)
    for i in range(smp.steps):
        carry, _ = step(carry, jnp.int32(i))
    np.testing.assert_allclose(scanned, carry[0], atol=1e-5)


def test_conversions_are_consistent():
    x0 = jax.random.normal(jax.random.key(0), (4, 3))
    eps = jax.random.normal(jax.random.key(1), (4, 3))
    a, s = 0.6, 0.8
    x = a * x0 + s * eps
    for pred, value in (("eps", eps), ("v", a * eps - s * x0), ("x0", x0)):
        np.testing.assert_allclose(P.to_x0(value, x, a, s, pred), x0, atol=1e-5)
    t = 0.3
    xf = (1 - t) * x0 + t * eps
    np.testing.assert_allclose(P.to_x0(eps - x0, xf, 1 - t, t, "velocity"), x0, atol=1e-5)
    np.testing.assert_allclose(P.velocity_from_x0(x0, xf, t), eps - x0, atol=1e-5)
    np.testing.assert_allclose(P.eps_from_x0(x0, x, a, s), eps, atol=1e-5)
    np.testing.assert_allclose(P.shift_time(jnp.array([0.0, 0.5, 1.0]), 3.0), [0, 0.75, 1])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(solver="rk4"), "solver"),
        (dict(solver="euler", steps=0), "steps"),
        (dict(solver="ddim", steps=2000), "steps"),
        (dict(solver="euler", prediction="eps"), "prediction"),
        (dict(solver="ddim", beta_schedule="quadratic"), "beta_schedule"),
        (dict(solver="ddim", eta=2.0), "eta"),
        (dict(solver="euler", shift=0.0), "shift"),
        (dict(solver="euler", time="days"), "time"),
    ],
)
def test_bad_sampler_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        S.make_sampler(**kwargs)


def test_autoguidance_needs_two_models():
    keys = S.sample_keys(0, jnp.arange(2))
    with pytest.raises(ValueError, match="denoisers"):
        S.sample(
            flow_denoiser(),
            jnp.zeros((2,) + SHAPE),
            {"cond": jnp.zeros((2,))},
            G.autoguidance(2.0),
            S.make_sampler("euler", 2),
            keys=keys,
            num_layers=1,
        )


def _ddpm_abar():
    """abar_k of Ho et al. 2020: linear betas 1e-4 .. 0.02 over T = 1000, cumprod(1 - beta)."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


@pytest.mark.parametrize("steps, steps_checked", [(10, (7, 8)), (1000, (980,))])
def test_learned_sigma_interpolates_between_posterior_variance_and_beta(steps, steps_checked):
    # One DDPM step from x with a known x0 estimate: x_new = posterior mean (Ho et al. eq. 7)
    # + std * the sample's noise, log std^2 = frac log beta + (1 - frac) log posterior
    # variance with frac = (v + 1) / 2 (Nichol & Dhariwal eq. 15, on the respaced betas).
    v = np.array([-1.0, 0.0, 1.0])  # one sample each: the small variance, between, beta
    x0, n = 0.3, len(v)

    def den(x, k, cond, attention=None):
        var = jnp.broadcast_to(jnp.asarray(v, x.dtype)[:, None, None, None], x.shape)
        return jnp.concatenate([jnp.full_like(x, x0), var], axis=-1)

    keys = S.sample_keys(0, jnp.arange(n))
    x = S.initial_noise(keys, SHAPE)
    smp = S.make_sampler("ddpm", steps, prediction="x0", learned_sigma=True)
    step = jax.jit(S.make_step(den, {"cond": jnp.zeros((n,))}, G.none(), smp, keys, 1))
    abar = _ddpm_abar()
    ks = np.round(np.linspace(999, 0, steps)).astype(int)
    for i in steps_checked:
        ab, ab_prev = abar[ks[i]], abar[ks[i + 1]]
        beta = 1.0 - ab / ab_prev
        post_var = beta * (1.0 - ab_prev) / (1.0 - ab)
        assert beta / post_var > 1.02  # the bounds are told apart
        if steps == 1000:
            assert beta == pytest.approx(np.linspace(1e-4, 0.02, 1000)[ks[i]])
        frac = (v + 1.0) / 2.0
        std = np.sqrt(beta**frac * post_var ** (1.0 - frac)).reshape(n, 1, 1, 1)
        (x_new, _), _ = step(S.initial_carry(G.none(), x), jnp.int32(i))
        noise = jax.vmap(lambda k, i=i: jax.random.normal(jax.random.fold_in(k, i), SHAPE))(keys)
        mean = (np.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (
            np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        ) * np.asarray(x)
        np.testing.assert_allclose(x_new, mean + std * np.asarray(noise), rtol=1e-4, atol=1e-5)


def test_beta_schedules_follow_the_papers():
    # Ho et al. 2020: linear from 1e-4 to 0.02 over T = 1000.
    np.testing.assert_allclose(P.beta_schedule("linear", 1000), np.linspace(1e-4, 0.02, 1000))
    # Nichol & Dhariwal 2021 eq. 17: abar_t = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s)
    # pi / 2), s = 0.008, beta_t = 1 - abar_t / abar_{t-1} clipped at 0.999.
    t = np.arange(1001) / 1000
    f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    abar = f / f[0]
    betas = np.minimum(1 - abar[1:] / abar[:-1], 0.999)
    np.testing.assert_allclose(P.beta_schedule("cosine", 1000), betas, rtol=1e-9)
    assert betas[-1] == 0.999 and betas[0] < 1e-4


def test_flow_sampler_evaluates_on_the_sd3_shifted_grid():
    seen = []

    def den(x, t, cond, attention=None):
        jax.debug.callback(lambda tt: seen.append(float(tt[0])), t, ordered=True)
        return jnp.zeros_like(x)

    keys = S.sample_keys(0, jnp.arange(2))
    smp = S.make_sampler("euler", 3, shift=3.0)
    assert smp.grid is None
    S.sample(
        den,
        jnp.zeros((2,) + SHAPE),
        {"cond": jnp.zeros((2,))},
        G.none(),
        smp,
        keys=keys,
        num_layers=1,
    )
    jax.effects_barrier()
    t = np.array([1.0, 2 / 3, 1 / 3])
    np.testing.assert_allclose(seen, 3 * t / (1 + 2 * t), rtol=1e-6)  # SD3 eq. 23, s = 3


def test_one_step_grid_starts_at_the_last_training_step():
    np.testing.assert_array_equal(P.diffusion_grid(1, 1000), [999])
    np.testing.assert_array_equal(P.diffusion_grid(3, 1000), [999, 500, 0])


def test_the_last_ddpm_step_adds_no_noise():
    # A learned-sigma denoiser whose x0 estimate is 0 and whose variance channel is +1 (the
    # variance is beta, not 0, even at the last step): the last step must still return
    # that x0 exactly, whatever noise it draws.
    smp = S.make_sampler("ddpm", 4, learned_sigma=True)
    keys = S.sample_keys(0, jnp.arange(2))
    noise = S.initial_noise(keys, (2, 2, 1))
    abar = jnp.asarray(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)), jnp.float32)

    def den(x, t, cond, attention=None):
        eps = x / jnp.sqrt(1.0 - abar[t][:, None, None, None])  # x0 = 0
        return jnp.concatenate([eps, jnp.ones_like(x)], axis=-1)

    out = S.sample(den, noise, {"cond": jnp.zeros((2,))}, G.none(), smp, keys=keys, num_layers=1)
    np.testing.assert_allclose(np.asarray(out), 0.0, atol=1e-5)


@pytest.mark.parametrize(
    "time, native", [("unit", lambda t: t), ("sd3", lambda t: 1000 * t), ("sit", lambda t: 1 - t)]
)
def test_the_model_sees_its_own_clock(time, native):
    # Heun on the even grid 1, 2/3, 1/3, 0: both evaluations of a step, the last step Euler.
    seen = []

    def den(x, t, cond, attention=None):
        jax.debug.callback(lambda tt: seen.append(float(tt[0])), t, ordered=True)
        return jnp.zeros_like(x)

    keys = S.sample_keys(0, jnp.arange(2))
    smp = S.make_sampler("heun", 3, time=time)
    conds = {"cond": jnp.zeros((2,))}
    S.sample(den, jnp.zeros((2,) + SHAPE), conds, G.none(), smp, keys=keys, num_layers=1)
    jax.effects_barrier()
    t = np.array([1.0, 2 / 3, 2 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(seen, native(t), rtol=1e-6, atol=1e-6)


def test_only_shift_eta_and_grid_are_traced():
    # The docstring's split: the rest shapes the program and must stay out of a jit's args.
    smp = S.make_sampler("ddim", 4, eta=0.5, beta_schedule="cosine", clip_x0=1.0)
    assert jax.tree_util.tree_leaves(smp) == [1.0, 0.5]
    traces = []

    @jax.jit
    def eta_twice(s):
        traces.append(s.solver)
        return 2 * s.eta

    assert [float(eta_twice(smp.replace(eta=e))) for e in (0.5, 0.25)] == [1.0, 0.5]
    assert traces == ["ddim"]


def test_grid_errors_state_what_was_expected():
    with pytest.raises(ValueError, match=r"\(steps \+ 1,\) = \(4,\), got \(3,\)"):
        S.make_sampler("euler", 3, grid=np.array([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="row 0 .* strictly decrease"):  # a repeated step
        S.make_sampler("ddim", 3, grid=np.array([[999, 500, 500], [500, 400, -1]]))


def test_every_heun_evaluation_anneals_with_its_own_step_index():
    # CADS noise is folded in with the evaluation's index: 2i and 2i + 1 for Heun's two
    # evaluations of step i. The window (0, 0.1) makes every condition pure annealed noise.
    seen = []

    def den(x, t, cond, attention=None):
        jax.debug.callback(lambda c: seen.append(np.asarray(c)), cond, ordered=True)
        return jnp.zeros_like(x)

    keys = S.sample_keys(0, jnp.arange(2))
    conds = {"cond": jax.random.normal(jax.random.key(2), (2, 6))}
    g = G.with_cads(G.none(), tau1=0.0, tau2=0.1)
    smp = S.make_sampler("heun", 3)
    S.sample(den, jnp.zeros((2,) + SHAPE), conds, g, smp, keys=keys, num_layers=1)
    jax.effects_barrier()
    ts = [1.0, 2 / 3, 2 / 3, 1 / 3, 1 / 3]
    assert len(seen) == len(ts)
    for j, t in enumerate(ts):
        want = g.conditions(conds, jnp.float32(t), keys, step=j)[0]
        np.testing.assert_allclose(seen[j], want, atol=1e-5, err_msg=f"evaluation {j}")
