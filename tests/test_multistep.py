"""UniPC and DPM-Solver++(2M): diffusers' schedulers step by step, their grids, the carry.

The parity runs drive one fixed random linear model (numpy weights, written once for
torch, once for JAX; its output moves with the timestep it is handed, so a model time
off by one is seen) through diffusers' ``scheduler.step`` loop and through our scan step
on the Sampler built from the same config, and compare the sample after every step.
CFG is taken on the model output there and on x0 estimates here: equal, as x0 is affine
in the output at a fixed x and t.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erg_jax import grids
from erg_jax import guidance as G
from erg_jax import multistep as M
from erg_jax import samplers as S
from erg_jax import solvers as SV

UNIPC = {"_class_name": "UniPCMultistepScheduler"}
DPM = {"_class_name": "DPMSolverMultistepScheduler"}
# The scheduler/scheduler_config.json of the Wan 2.1 T2V diffusers folders.
WAN = {
    **UNIPC,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
FLOW_DPM = {**DPM, "use_flow_sigmas": True, "prediction_type": "flow_prediction"}
D, DC, B = 8, 3, 3  # features (as (1, 1, D) images), condition width, batch

_rng = np.random.default_rng(0)
W_X = (0.4 * _rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
W_T = (2.0 * _rng.standard_normal(D)).astype(np.float32)
W_C = (0.5 * _rng.standard_normal((DC, D))).astype(np.float32)


def _diffusers():
    pytest.importorskip("torch", reason="parity tests need torch (the `parity` extra)")
    return pytest.importorskip("diffusers", reason="parity tests need diffusers")


def _scheduler(cfg: dict):
    # from_config, as a pipeline swaps schedulers: fields the class does not read are dropped
    return getattr(_diffusers(), cfg["_class_name"]).from_config(cfg)


def _jax_model(x, tn, cond, attention=None):
    """out = x W_x + (t / 1000) w_t + c W_c on (b, 1, 1, D)."""
    b = x.shape[0]
    tau = jnp.broadcast_to(jnp.asarray(tn).astype(jnp.float32), (b,)) / 1000.0
    return (x.reshape(b, D) @ W_X + tau[:, None] * W_T + cond @ W_C).reshape(b, 1, 1, D)


def _inputs():
    keys = S.sample_keys(0, jnp.arange(B))
    cond = jax.random.normal(jax.random.key(7), (B, DC))
    return keys, S.initial_noise(keys, (1, 1, D)), {"cond": cond, "null": jnp.zeros((B, DC))}


def _their_steps(cfg, steps, noise, conds, scale):
    """diffusers' loop; every step's sample, (steps, B, D)."""
    import torch

    wx, wt, wc = (torch.from_numpy(w) for w in (W_X, W_T, W_C))
    model = lambda x, t, c: x @ wx + (t.to(torch.float32) / 1000.0) * wt + c @ wc  # noqa: E731
    sched = _scheduler(cfg)
    sched.set_timesteps(steps)
    x = torch.from_numpy(np.array(noise).reshape(B, D))
    cond, null = (torch.from_numpy(np.array(conds[k])) for k in ("cond", "null"))
    out = []
    for t in sched.timesteps:
        pred = model(x, t, cond)
        if scale is not None:
            pred = model(x, t, null) + scale * (pred - model(x, t, null))
        x = sched.step(pred, t, x).prev_sample
        out.append(x.numpy())
    return np.stack(out), sched


def _our_steps(smp, noise, conds, guider, keys):
    """Our scan step in a loop; every step's sample, (steps, B, D)."""
    step = jax.jit(S.make_step(_jax_model, conds, guider, smp, keys, 1))
    carry, out = S.initial_carry(guider, noise, None, smp), []
    for i in range(smp.steps):
        carry, _ = step(carry, jnp.int32(i))
        out.append(np.asarray(carry[0]).reshape(B, D))
    return np.stack(out)


def _sampler(cfg, steps, solver=None):
    kw = {"time": "sd3"} if grids.is_flow_config(cfg) else {}  # the model reads T sigma
    return grids.sampler_from_scheduler(cfg, steps, **kw, **({"solver": solver} if solver else {}))


# (config, steps, CFG scale or None, our solver: None = the class's own)
RUN_CASES = [
    (WAN, 5, None, None),
    (WAN, 10, 3.0, None),
    (WAN, 50, None, None),
    ({**WAN, "flow_shift": 5.0}, 5, None, None),
    ({**WAN, "flow_shift": 5.0}, 10, None, None),
    ({**WAN, "flow_shift": 5.0}, 50, 3.0, None),
    ({**WAN, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 10, None, None),
    ({**WAN, "solver_type": "bh1", "disable_corrector": [0, 3]} | SIGMA_MIN, 10, None, None),
    ({**WAN, "solver_order": 1, "shift_terminal": 0.1}, 6, None, None),
    (UNIPC, 10, None, None),
    ({**UNIPC, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 10, 3.0, None),
    (
        {**UNIPC, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
        | {"timestep_spacing": "leading", "steps_offset": 1},
        20,
        None,
        None,
    ),
    (
        {**UNIPC, "beta_schedule": "squaredcos_cap_v2", "final_sigmas_type": "sigma_min"},
        7,
        3.0,
        None,
    ),
    ({**FLOW_DPM, "flow_shift": 3.0}, 10, None, None),
    ({**FLOW_DPM, "flow_shift": 5.0, "final_sigmas_type": "sigma_min"}, 20, 3.0, None),
    # DPM-Solver++ ends first-order onto sigma 0, or below 15 steps (lower_order_final)
    ({**DPM, **SIGMA_MIN}, 14, 3.0, None),
    ({**DPM, "prediction_type": "v_prediction", **SIGMA_MIN}, 15, None, None),
    ({**DPM, "prediction_type": "v_prediction"}, 20, None, None),
    ({**DPM, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 20, None, None),
    ({**DPM, "solver_order": 1, "timestep_spacing": "trailing"}, 5, None, None),
    ({**DPM, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 8, None, None),
    # a pipeline swapping Wan's UniPC for DPMSolverMultistepScheduler.from_config
    (WAN, 10, None, "dpmpp_2m"),
]


@pytest.mark.parity
@pytest.mark.parametrize("cfg, steps, scale, solver", RUN_CASES)
def test_every_step_matches_the_scheduler(cfg, steps, scale, solver):
    _diffusers()
    smp = _sampler(cfg, steps, solver)
    keys, noise, conds = _inputs()
    guider = G.none() if scale is None else G.cfg(scale)
    ours = _our_steps(smp, noise, conds, guider, keys)
    ref_cfg = cfg if solver is None else {**cfg, "_class_name": DPM["_class_name"]}
    ref, sched = _their_steps(ref_cfg, steps, noise, conds, scale)
    np.testing.assert_array_equal(
        grids.scheduler_timesteps(cfg, steps, solver=solver), sched.timesteps
    )
    err = np.max(np.abs(ours - ref), axis=(1, 2)) / np.max(np.abs(ref), axis=(1, 2))
    assert np.all(err < 1e-5), err


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 5, 50])
@pytest.mark.parametrize("base", [WAN, FLOW_DPM])
@pytest.mark.parametrize("shift, final", [(3.0, "zero"), (5.0, "sigma_min")])
def test_flow_sigmas_and_model_times_are_the_schedulers(base, shift, final, steps):
    cfg = {**base, "flow_shift": shift, "final_sigmas_type": final}
    sched = _scheduler(cfg)
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(grids.scheduler_grid(cfg, steps), sched.sigmas.numpy())
    ts = sched.timesteps.numpy()
    assert ts.dtype == np.int64  # Wan's transformer is handed integers: int(1000 sigma)
    np.testing.assert_array_equal(grids.scheduler_timesteps(cfg, steps), ts)
    np.testing.assert_array_equal(_sampler(cfg, steps).model_times, ts.astype(np.float32))
    unit = grids.sampler_from_scheduler(cfg, steps)  # a model that reads t in [0, 1]
    np.testing.assert_allclose(unit.model_times, ts / 1000.0, rtol=1e-7)


@pytest.mark.parity
@pytest.mark.parametrize("steps", [1, 7, 50])
@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(timestep_spacing="leading", steps_offset=1),
        dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"),
        dict(beta_schedule="squaredcos_cap_v2", final_sigmas_type="sigma_min"),
    ],
)
@pytest.mark.parametrize("base", [UNIPC, DPM])
def test_diffusion_timesteps_and_noise_levels_are_the_schedulers(base, fields, steps):
    cfg = {**base, **fields}
    sched = _scheduler(cfg)
    sched.set_timesteps(steps)
    smp = _sampler(cfg, steps)
    np.testing.assert_array_equal(np.asarray(smp.grid)[0], sched.timesteps.numpy())
    alpha, sigma, _ = SV.multistep_points(smp)[0]
    ref_alpha, ref_sigma = sched._sigma_to_alpha_sigma_t(sched.sigmas)
    np.testing.assert_allclose(alpha, ref_alpha.numpy(), rtol=5e-7)
    np.testing.assert_allclose(sigma, ref_sigma.numpy(), rtol=5e-7)


@pytest.mark.parity
@pytest.mark.parametrize("cfg", [WAN, {**DPM, "prediction_type": "v_prediction"}])
def test_a_stateful_guider_and_the_history_share_the_carry(cfg):
    """APG's momentum and the multistep history both ride in the scan carry: ``sample``
    equals diffusers' scheduler stepping on our guided prediction, APG's state threaded
    by hand from step to step."""
    import torch

    steps, guider = 8, G.apg(3.0, momentum=-0.5)
    smp = _sampler(cfg, steps)
    keys, noise, conds = _inputs()
    ours = S.sample(_jax_model, noise, conds, guider, smp, keys=keys, num_layers=1)
    sched = _scheduler(cfg)
    sched.set_timesteps(steps)
    _, point_at = SV.multistep_points(smp)

    @jax.jit
    def guided(x, state, i):
        p = point_at(i)
        x0s, _ = S.evaluate((_jax_model,), x, p, guider, conds, smp, keys, i, 1)
        x0, state = guider.combine(x0s, p.t, state, x=x, a=p.a, s=p.s, index=i)
        # back to the model output the scheduler converts: velocity, or v = a eps - s x0
        eps = (x - p.a * x0) / p.s
        return ((x - x0) / p.s if smp.is_flow else p.a * eps - p.s * x0), state

    as_torch = lambda v: torch.from_numpy(np.array(v).reshape(B, D))  # noqa: E731
    x, state = noise, guider.init_state(noise)
    for i, t in enumerate(sched.timesteps):
        out, state = guided(x, state, i)
        x = sched.step(as_torch(out), t, as_torch(x)).prev_sample.numpy().reshape(noise.shape)
    np.testing.assert_allclose(ours, x, rtol=1e-5, atol=1e-5 * np.max(np.abs(x)))


# --- without a reference ---------------------------------------------------------------

MU, SIGMA0 = 0.7, 0.5


def _gaussian_velocity(x, tn, cond, attention=None):
    """The exact flow velocity for data N(MU, SIGMA0^2) per coordinate."""
    t = jnp.asarray(tn, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    a, s = 1.0 - t, t
    x0 = MU + a * SIGMA0**2 / (a * a * SIGMA0**2 + s * s) * (x - a * MU)
    return (x - x0) / t


def test_multistep_solvers_beat_euler_with_a_quarter_of_the_steps():
    """Closed form: the flow of Gaussian data maps x_1 to MU + SIGMA0 x_1."""
    keys = S.sample_keys(0, jnp.arange(64))
    noise = S.initial_noise(keys, (4, 4, 2))
    conds = {"cond": jnp.zeros((64,))}

    def err(solver, steps):
        smp = S.make_sampler(solver, steps)
        out = S.sample(_gaussian_velocity, noise, conds, G.none(), smp, keys=keys, num_layers=1)
        return float(jnp.max(jnp.abs(out - (MU + SIGMA0 * noise))))

    euler = err("euler", 64)
    for solver in M.SOLVERS:
        assert err(solver, 16) < 0.6 * euler, solver


def test_one_model_evaluation_per_step():
    calls = []

    def den(x, tn, cond, attention=None):
        calls.append(1)  # once per trace of the scan body: the evaluations a step makes
        return _jax_model(x, tn, cond)

    keys, noise, conds = _inputs()
    for smp in (S.make_sampler("unipc", 4), S.make_sampler("dpmpp_2m", 4, prediction="eps")):
        calls.clear()
        run = lambda smp=smp: S.sample(den, noise, conds, G.none(), smp, keys=keys, num_layers=1)  # noqa: E731
        jax.eval_shape(run)
        assert len(calls) == smp.nfe_per_step == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="rk4"), r"solver must be one of .*'unipc', 'dpmpp_2m'"),
        (dict(solver="unipc", order=3), "order"),
        (dict(solver="unipc", solver_type="midpoint"), r"solver_type .*'bh2', 'bh1'"),
        (dict(solver="dpmpp_2m", solver_type="bh2"), r"solver_type .*'midpoint', 'heun'"),
        (dict(solver="dpmpp_2m", disable_corrector=(1,)), "disable_corrector"),
        (dict(solver="unipc", prediction="eps", clip_x0=1.0), "clip_x0"),
        (dict(solver="unipc", time="sd3", prediction="eps"), "prediction"),
        (dict(solver="unipc", time="ddpm", prediction="velocity"), "prediction"),
        (dict(solver="unipc", lower_order_final=False), "lower_order_final"),
        (dict(solver="unipc", solver_type="bh1"), "bh1"),
        (dict(solver="unipc", solver_type="bh1", grid=[0.9, 0.6, 0.4, 0.2, 0.1]), None),
        (dict(solver="heun", model_times=np.ones(4)), "model_times"),
        (dict(solver="unipc", model_times=np.ones(3)), "model_times"),
    ],
)
def test_bad_multistep_settings_name_the_field(kwargs, match):
    if match is None:  # inside (0, 1) bh1 meets no infinite lambda
        assert S.make_sampler(steps=4, **kwargs).solver_type == "bh1"
        return
    with pytest.raises(ValueError, match=match):
        S.make_sampler(steps=4, **kwargs)


def test_a_carry_without_the_history_is_refused():
    keys, noise, conds = _inputs()
    smp = S.make_sampler("unipc", 3)
    step = S.make_step(_jax_model, conds, G.none(), smp, keys, 1)
    with pytest.raises(ValueError, match=r"initial_carry\(guider, x, denoiser, sampler\)"):
        step(S.initial_carry(G.none(), noise), jnp.int32(0))


def test_euler_hands_the_model_its_model_times():
    """A velocity of -native: Euler's sample moves by sum (t_i - t_{i+1}) native_i."""
    grid = np.array([1.0, 0.7, 0.3, 0.0], np.float32)
    times = np.array([999.0, 700.0, 3.0], np.float32)  # not 1000 t
    smp = S.make_sampler("euler", 3, time="sd3", grid=grid, model_times=times)
    den = lambda x, tn, cond, attention=None: -jnp.ones_like(x) * tn[:, None, None, None]  # noqa: E731
    keys, noise, conds = _inputs()
    out = S.sample(den, noise, conds, G.none(), smp, keys=keys, num_layers=1)
    np.testing.assert_allclose(out - noise, np.sum(-np.diff(grid) * times), rtol=1e-6)


@pytest.mark.parametrize(
    "cfg, kw, match",
    [
        ({**UNIPC, "predict_x0": False}, {}, "predict_x0"),
        ({**DPM, "algorithm_type": "sde-dpmsolver++"}, {}, "algorithm_type"),
        ({**DPM, "lambda_min_clipped": -5.1}, {}, "lambda_min_clipped"),
        ({**WAN, "use_dynamic_shifting": True}, {}, "use_dynamic_shifting"),
        ({**UNIPC, "shift_terminal": 0.1}, {}, "shift_terminal"),
        ({**DPM, "solver_order": 3}, {}, "solver_order"),
        ({**DPM, "euler_at_final": True}, {}, "euler_at_final"),
        ({**DPM, "use_lu_lambdas": True}, {}, "use_lu_lambdas"),
        ({**UNIPC, "use_karras_sigmas": True}, {}, "use_karras_sigmas"),
        ({**UNIPC, "solver_p": "DDIMScheduler"}, {}, "solver_p"),
        ({**UNIPC, "prediction_type": "flow_prediction"}, {}, "prediction_type"),
        ({**WAN, "prediction_type": "epsilon"}, {}, "prediction_type"),
        ({**WAN, "final_sigmas_type": "denoise_to_zero"}, {}, "final_sigmas_type"),
        ({**WAN, "lower_order_final": False}, {}, "lower_order_final"),
        ({**UNIPC, "solver_type": "bh1"}, {}, "bh1"),
        ({**WAN, "num_train_timesteps": 500}, dict(time="sd3"), "num_train_timesteps"),
        (WAN, dict(prediction="x0"), "prediction"),
        (WAN, dict(order=1), "overrides"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, dict(solver="unipc"), "solver"),
        (WAN, dict(solver="euler"), r"solver: .* \('unipc', 'dpmpp_2m'\)"),
        (WAN, dict(solver="ddim"), "solver"),
    ],
)
def test_unreproducible_multistep_configs_name_the_field(cfg, kw, match):
    with pytest.raises(ValueError, match=match):
        grids.sampler_from_scheduler(cfg, 6, **kw)


def test_a_ddim_config_runs_under_the_multistep_rules():
    """from_config's swap: a DDIM folder's betas with UniPC's spacing (steps + 1 points,
    0 dropped) and final sigma 0, whatever the DDIM-only fields say."""
    cfg = {"_class_name": "DDIMScheduler", "clip_sample": True, "set_alpha_to_one": False}
    smp = grids.sampler_from_scheduler(cfg, 3, solver="unipc")
    assert (smp.solver, smp.prediction, smp.clip_x0, smp.alpha_to_one) == (
        "unipc",
        "eps",
        None,
        True,
    )
    assert np.asarray(smp.grid).tolist() == [[999, 666, 333], [666, 333, -1]]
