"""Reference-scheduler grids: against diffusers' own set_timesteps, and whole sampling runs.

The runs drive a fixed random linear model (written once for torch, once for JAX) through
diffusers' ``scheduler.step`` loop and through ``samplers.sample`` on our grid; they must
agree to float32 rounding, unguided and with CFG (guided on the model output there, on
x0 estimates here: equal, as x0 is affine in the output at a fixed x and t).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import grids
from erg_jax import guidance as G
from erg_jax import predictions as P
from erg_jax import samplers as S

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
DDIM = {"_class_name": "DDIMScheduler", "clip_sample": False}
DDPM = {"_class_name": "DDPMScheduler", "clip_sample": False}
# Stable Diffusion 1.x / 2.x's scheduler fields.
LATENT = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "set_alpha_to_one": False,
}
D, DC, B = 8, 3, 3  # features (as (1, 1, D) images), condition width, batch


def _diffusers():
    pytest.importorskip("torch", reason="parity tests need torch (the `parity` extra)")
    return pytest.importorskip("diffusers", reason="parity tests need diffusers")


def _scheduler(cfg: dict):
    cls = getattr(_diffusers(), cfg["_class_name"])
    return cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def _tables(smp: S.Sampler) -> dict:
    return smp.diffusion_tables()


def test_published_examples():
    flow = grids.scheduler_grid({**FLOW, "shift": 3.0}, 3)
    np.testing.assert_allclose(flow, [1.0, 0.7511211, 0.00892857, 0.0], atol=1e-7)
    assert grids.scheduler_grid(DDIM, 3).tolist() == [[666, 333, 0], [333, 0, -1]]
    trailing = {"timestep_spacing": "trailing"}
    # DDIM steps T // N back, off the grid; DDPM to the next grid entry.
    assert grids.scheduler_grid({**DDIM, **trailing}, 3).tolist() == [
        [999, 666, 332],
        [666, 333, -1],
    ]
    assert grids.scheduler_grid({**DDPM, **trailing}, 3).tolist() == [
        [999, 666, 332],
        [666, 332, -1],
    ]


def test_dynamic_shift_mu_interpolates_between_the_shifts():
    assert grids.dynamic_shift_mu(256) == pytest.approx(0.5)
    assert grids.dynamic_shift_mu(4096) == pytest.approx(1.15)
    assert grids.dynamic_shift_mu(2176) == pytest.approx(0.825)
    assert grids.dynamic_shift_mu(1024, 1024, 2048, 1.0, 3.0) == pytest.approx(1.0)


def test_scaled_linear_betas_have_linear_roots():
    betas = P.beta_schedule("scaled_linear", 1000, 0.00085, 0.012)
    assert betas[0] == pytest.approx(0.00085) and betas[-1] == pytest.approx(0.012)
    np.testing.assert_allclose(np.diff(np.sqrt(betas), 2), 0.0, atol=1e-12)
    assert P.beta_schedule("linear", 1000, 0.001, 0.01)[-1] == pytest.approx(0.01)


def _toy_den(prediction_scale=1.0):
    """A denoiser whose output is a fixed function of x, the native time and the condition."""

    def den(x, tn, cond, attention=None):
        b = x.shape[0]
        tau = jnp.broadcast_to(jnp.asarray(tn, jnp.float32), (b,)) / 1000.0
        flat = x.reshape(b, -1)
        out = prediction_scale * (jnp.tanh(flat) + tau[:, None]) + cond[:, :1]
        return out.reshape(x.shape)

    return den


@pytest.mark.parametrize(
    "solver, kw",
    [
        ("euler", dict(shift=3.0)),
        ("heun", dict()),
        ("ddim", dict(eta=0.5)),
        ("ddpm", dict()),
    ],
)
def test_the_default_grid_given_explicitly_changes_nothing(solver, kw):
    steps = 5
    plain = S.make_sampler(solver, steps, **kw)
    if plain.is_flow:
        grid = np.asarray(P.flow_grid(steps, kw.get("shift", 1.0)))
    else:
        ks = P.diffusion_grid(steps)
        grid = np.stack([ks, np.append(ks[1:], -1)])
    gridded = S.make_sampler(solver, steps, grid=grid, **kw)
    keys = S.sample_keys(1, jnp.arange(B))
    noise = S.initial_noise(keys, (1, 1, D))
    conds = {"cond": jnp.ones((B, DC)), "null": jnp.zeros((B, DC))}
    run = lambda smp: S.sample(
        _toy_den(0.3), noise, conds, G.cfg(2.0), smp, keys=keys, num_layers=1
    )  # noqa: E731
    np.testing.assert_allclose(run(gridded), run(plain), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "solver, grid, match",
    [
        ("euler", [1.0, 0.5, 0.0], r"shape \(steps \+ 1,\)"),
        ("euler", [1.0, 0.5, 0.6, 0.0], "strictly decrease"),
        ("euler", [1.5, 0.5, 0.2, 0.0], r"\[0, 1\]"),
        ("ddim", [[999, 500, 0]], r"shape \(2, steps\)"),
        ("ddim", [[999.0, 500.0, 0.0], [500.0, 0.0, -1.0]], "integer"),
        ("ddim", [[999, 1000, 0], [500, 0, -1]], r"row 0 .* \[0, 999\]"),
        ("ddim", [[999, 500, 0], [999, 0, -1]], "row 1"),
        ("ddim", [[999, 500, 0], [500, 0, -2]], "row 1"),
    ],
)
def test_bad_grids_name_the_field(solver, grid, match):
    with pytest.raises(ValueError, match="grid") as err:
        S.make_sampler(solver, 3, grid=np.asarray(grid))
    assert err.match(match)


@pytest.mark.parametrize(
    "cfg, kw, match",
    [
        ({"_class_name": "EulerDiscreteScheduler"}, {}, "DDIMScheduler"),
        ({}, {}, "_class_name"),
        (FLOW, dict(overrides={"shfit": 2.0}), r"shfit.*known.*shift"),
        (DDIM, dict(overrides={"variance_type": "fixed_small"}), "variance_type"),
        ({**FLOW, "use_karras_sigmas": True}, {}, "use_karras_sigmas"),
        ({**FLOW, "use_exponential_sigmas": True}, {}, "use_exponential_sigmas"),
        ({**FLOW, "use_beta_sigmas": True}, {}, "use_beta_sigmas"),
        ({**FLOW, "invert_sigmas": True}, {}, "invert_sigmas"),
        ({**FLOW, "stochastic_sampling": True}, {}, "stochastic_sampling"),
        ({**FLOW, "use_dynamic_shifting": True}, {}, "image_seq_len"),
        (
            {**FLOW, "use_dynamic_shifting": True, "time_shift_type": "cubic"},
            dict(image_seq_len=64),
            "time_shift_type",
        ),
        ({**FLOW, "num_train_timesteps": 500}, dict(time="sd3"), "num_train_timesteps"),
        (FLOW, dict(solver="ddim"), "solver"),
        (FLOW, dict(shift=3.0), "overrides"),
        ({**DDIM, "thresholding": True}, {}, "thresholding"),
        ({**DDIM, "rescale_betas_zero_snr": True}, {}, "rescale_betas_zero_snr"),
        ({**DDIM, "trained_betas": [0.1] * 1000}, {}, "trained_betas"),
        ({**DDIM, "beta_schedule": "sigmoid"}, {}, "beta_schedule"),
        ({**DDIM, "num_train_timesteps": 500}, {}, "num_train_timesteps"),
        ({**DDIM, "timestep_spacing": "even"}, {}, "timestep_spacing"),
        ({**DDIM, "prediction_type": "flow"}, {}, "prediction_type"),
        ({**DDIM, "prediction_type": "v_prediction"}, dict(prediction="eps"), "prediction"),
        ({**DDIM, "timestep_spacing": "trailing"}, dict(steps=61), "steps"),
        (DDIM, dict(steps=1001), "steps"),
        (DDIM, dict(solver="euler"), "solver"),
        ({**DDPM, "variance_type": "fixed_large"}, {}, "variance_type"),
        ({**DDPM, "variance_type": "learned_range"}, {}, "learned_sigma"),
    ],
)
def test_unreproducible_configs_name_the_field(cfg, kw, match):
    kw = dict(kw)
    steps = kw.pop("steps", 4)
    with pytest.raises(ValueError, match=match):
        grids.sampler_from_scheduler(cfg, steps, **kw)


def test_sampler_fields_follow_the_config():
    smp = grids.sampler_from_scheduler(
        {**DDIM, **LATENT, "prediction_type": "v_prediction"}, 10, learned_sigma=True
    )
    assert (smp.solver, smp.prediction, smp.beta_schedule) == ("ddim", "v", "scaled_linear")
    assert (smp.beta_start, smp.beta_end, smp.alpha_to_one) == (0.00085, 0.012, False)
    # A DDIM config run by the ddpm solver takes DDPMScheduler's rules (as from_config).
    ddpm = grids.sampler_from_scheduler(DDIM, 3, solver="ddpm", learned_sigma=True)
    assert ddpm.fixed_variance and ddpm.alpha_to_one
    assert np.asarray(ddpm.grid).tolist() == [[666, 333, 0], [333, 0, -1]]
    learned = grids.sampler_from_scheduler(
        {**DDPM, "variance_type": "learned_range"}, 3, learned_sigma=True
    )
    assert not learned.fixed_variance
    shifted = grids.sampler_from_scheduler(FLOW, 3, overrides={"shift": 3.0}, solver="heun")
    np.testing.assert_array_equal(shifted.grid, grids.scheduler_grid({**FLOW, "shift": 3.0}, 3))
    assert shifted.solver == "heun"


# --- parity with diffusers ------------------------------------------------------------

FLOW_CASES = [
    (dict(), None),
    (dict(shift=3.0), None),
    (dict(shift=3.1, num_train_timesteps=500), None),
    (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), 4096),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), 1024),
    (dict(use_dynamic_shifting=True, shift_terminal=0.1), 256),
    (dict(shift=3.0, shift_terminal=0.02), None),
]


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 3, 28])
@pytest.mark.parametrize("fields, seq_len", FLOW_CASES)
def test_flow_grid_is_the_schedulers(fields, seq_len, steps):
    cfg = {**FLOW, **fields}
    if fields.get("shift_terminal") and steps == 1:
        with pytest.raises(ValueError, match="shift_terminal"):  # diffusers: NaN sigmas
            grids.scheduler_grid(cfg, steps, image_seq_len=seq_len)
        return
    sched = _scheduler(cfg)
    # mu's own formula is checked above; here the sigma arithmetic, bit for bit.
    mu = grids.dynamic_shift_mu(seq_len) if seq_len else None
    sched.set_timesteps(steps, mu=mu)
    grid = grids.scheduler_grid(cfg, steps, image_seq_len=seq_len)
    np.testing.assert_array_equal(grid, sched.sigmas.numpy())
    np.testing.assert_array_equal(
        grid[:-1] * np.float32(cfg.get("num_train_timesteps", 1000)), sched.timesteps.numpy()
    )


DIFFUSION_CASES = [
    dict(),
    dict(timestep_spacing="trailing"),
    dict(timestep_spacing="linspace"),
    dict(steps_offset=1, set_alpha_to_one=False),
    dict(LATENT),
    dict(LATENT, timestep_spacing="trailing"),
    dict(LATENT, timestep_spacing="linspace", set_alpha_to_one=True),
    dict(beta_schedule="squaredcos_cap_v2", steps_offset=1),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", set_alpha_to_one=False),
]


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 3, 28, 50])
@pytest.mark.parametrize("fields", DIFFUSION_CASES)
def test_ddim_grid_and_alphas_are_the_schedulers(fields, steps):
    torch = pytest.importorskip("torch")
    cfg = {**DDIM, **fields}
    sched = _scheduler(cfg)
    sched.set_timesteps(steps)
    smp = grids.sampler_from_scheduler(cfg, steps)
    np.testing.assert_array_equal(np.asarray(smp.grid)[0], sched.timesteps.numpy())
    tables = _tables(smp)
    ref = sched.alphas_cumprod.numpy()[sched.timesteps.numpy()]
    np.testing.assert_allclose(tables["abar"], ref, rtol=1e-6)
    # The abar a DDIM step lands on, read off the scheduler: predicting x0 = 1 from
    # x = sqrt(abar_t) leaves no noise, so the step returns sqrt(abar_prev).
    probe = _scheduler({**cfg, "prediction_type": "sample"})
    probe.set_timesteps(steps)
    for i, t in enumerate(probe.timesteps):
        x = torch.ones(1) * probe.alphas_cumprod[t] ** 0.5
        out = probe.step(torch.ones(1), t, x).prev_sample
        assert float(tables["abar_prev"][i]) == pytest.approx(float(out[0]) ** 2, rel=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 3, 28])
@pytest.mark.parametrize("fields", DIFFUSION_CASES)
def test_ddpm_grid_and_alphas_are_the_schedulers(fields, steps):
    cfg = {**DDPM, **{k: v for k, v in fields.items() if k != "set_alpha_to_one"}}
    sched = _scheduler(cfg)
    sched.set_timesteps(steps)
    grid = grids.scheduler_grid(cfg, steps)
    np.testing.assert_array_equal(grid[0], sched.timesteps.numpy())
    prev = [int(sched.previous_timestep(t)) for t in sched.timesteps]
    np.testing.assert_array_equal(grid[1], prev)
    tables = _tables(grids.sampler_from_scheduler(cfg, steps))
    abar = sched.alphas_cumprod.numpy()
    np.testing.assert_allclose(tables["abar"], abar[grid[0]], rtol=1e-6)
    np.testing.assert_allclose(
        tables["abar_prev"], np.where(grid[1] >= 0, abar[grid[1]], 1.0), rtol=1e-6
    )


@pytest.mark.parity
def test_cosine_betas_are_diffusers_squaredcos_cap_v2():
    _diffusers()
    from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar

    ref = betas_for_alpha_bar(1000).numpy()
    np.testing.assert_array_equal(P.beta_schedule("cosine").astype(np.float32), ref)
    # float32_betas is diffusers' arithmetic: ~1e-5 apart from float64 near beta = 0.999.
    sched = _scheduler({**DDIM, "beta_schedule": "squaredcos_cap_v2"})
    abar = P.alphas_cumprod("cosine", float32_betas=True).astype(np.float32)
    np.testing.assert_array_equal(abar, sched.alphas_cumprod.numpy())


# --- whole runs ----------------------------------------------------------------------

_rng = np.random.default_rng(0)
W_X = (0.4 * _rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
W_T = _rng.standard_normal(D).astype(np.float32)
W_C = (0.5 * _rng.standard_normal((DC, D))).astype(np.float32)
W_V = (_rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)


def _jax_model(learned: bool):
    """out = x W_x + (t / 1000) w_t + c W_c on (b, 1, 1, D); a tanh variance half if learned."""

    def den(x, tn, cond, attention=None):
        b = x.shape[0]
        flat = x.reshape(b, D)
        tau = jnp.broadcast_to(jnp.asarray(tn).astype(jnp.float32), (b,)) / 1000.0
        out = flat @ W_X + tau[:, None] * W_T + cond @ W_C
        if learned:
            out = jnp.concatenate([out, jnp.tanh(flat @ W_V)], axis=-1)
        return out.reshape(b, 1, 1, -1)

    return den


def _torch_run(cfg, steps, noise, cond, null, scale, learned, step_noise, mu, monkeypatch):
    """diffusers' denoising loop on (b, D, 1, 1) tensors; CFG on the model output; DDPM's
    noise replaced by ``step_noise(i)``."""
    import torch
    from diffusers.schedulers import scheduling_ddpm

    wx, wt, wc, wv = (torch.from_numpy(w) for w in (W_X, W_T, W_C, W_V))

    def model(x, t, c):
        flat = x.reshape(x.shape[0], D)
        tau = torch.as_tensor(t).to(torch.float32) / 1000.0
        out = flat @ wx + tau * wt + c @ wc
        if learned:
            out = torch.cat([out, torch.tanh(flat @ wv)], dim=1)
        return out.reshape(x.shape[0], -1, 1, 1)

    sched = _scheduler(cfg)
    sched.set_timesteps(steps, **({"mu": mu} if mu is not None else {}))
    x = torch.from_numpy(np.array(noise).reshape(B, D, 1, 1))
    cond, null = torch.from_numpy(np.array(cond)), torch.from_numpy(np.array(null))
    index = [0]
    monkeypatch.setattr(
        scheduling_ddpm,
        "randn_tensor",
        lambda shape, **kw: torch.from_numpy(np.array(step_noise(index[0])).reshape(shape)),
    )
    # As DiT's pipeline: CFG on the first C channels, the variance from the conditional
    # branch, dropped unless the scheduler reads it.
    keep_variance = cfg.get("variance_type") == "learned_range"
    for i, t in enumerate(sched.timesteps):
        index[0] = i
        out = model(x, t, cond)
        if scale is not None:
            out_null = model(x, t, null)
            guided = out_null[:, :D] + scale * (out[:, :D] - out_null[:, :D])
            out = torch.cat([guided, out[:, D:]], dim=1)
        x = sched.step(out if keep_variance else out[:, :D], t, x).prev_sample
    return x.numpy().reshape(B, 1, 1, D)


# (config, sampler fields, image tokens, CFG scale or None); every family runs both ways.
RUN_CASES = [
    ({**FLOW, "shift": 3.0}, {}, None, None),
    ({**FLOW, "shift": 3.0}, {}, None, 3.0),
    ({**FLOW, "use_dynamic_shifting": True, "shift_terminal": 0.05}, {}, 1024, 3.0),
    ({**DDIM, **LATENT}, {}, None, None),
    ({**DDIM, **LATENT}, {}, None, 3.0),
    ({**DDIM, "clip_sample": True, "clip_sample_range": 0.5}, {}, None, 3.0),
    ({**DDPM, "clip_sample": True, "clip_sample_range": 0.5}, {}, None, 3.0),
    ({**DDIM, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {}, None, 3.0),
    ({**DDIM, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}, {}, None, 3.0),
    ({**DDPM, "steps_offset": 1}, {}, None, None),
    ({**DDPM, "steps_offset": 1, "beta_schedule": "scaled_linear"}, {}, None, 3.0),
    (
        {**DDPM, "variance_type": "learned_range", "timestep_spacing": "trailing"},
        dict(learned_sigma=True),
        None,
        None,
    ),
    (
        {**DDPM, "variance_type": "learned_range", "timestep_spacing": "trailing"},
        dict(learned_sigma=True),
        None,
        3.0,
    ),
    ({**DDPM, "variance_type": "fixed_small_log"}, dict(learned_sigma=True), None, 3.0),
]


@pytest.mark.parity
@pytest.mark.parametrize("cfg, kw, seq_len, scale", RUN_CASES)
def test_sampling_runs_match_the_scheduler_loop(cfg, kw, seq_len, scale, monkeypatch):
    _diffusers()
    steps = 7
    if cfg["_class_name"] == FLOW["_class_name"]:
        kw = dict(kw, time="sd3")  # the model reads sigma * 1000, as diffusers passes it
    smp = grids.sampler_from_scheduler(cfg, steps, image_seq_len=seq_len, **kw)
    learned = smp.learned_sigma
    keys = S.sample_keys(0, jnp.arange(B))
    noise = S.initial_noise(keys, (1, 1, D))
    cond = jax.random.normal(jax.random.key(7), (B, DC))
    null = jnp.zeros((B, DC))
    guider = G.none() if scale is None else G.cfg(scale)
    ours = S.sample(
        _jax_model(learned),
        noise,
        {"cond": cond, "null": null},
        guider,
        smp,
        keys=keys,
        num_layers=1,
    )

    def step_noise(i):  # the sampler's DDPM noise: per sample, fold_in(key, step)
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), (1, 1, D)))(keys)

    mu = grids.dynamic_shift_mu(seq_len) if seq_len else None
    ref = _torch_run(cfg, steps, noise, cond, null, scale, learned, step_noise, mu, monkeypatch)
    err = np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref))
    assert err < 1e-5, err
