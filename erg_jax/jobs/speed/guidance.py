"""Cost of guidance per sampling step, the step's FLOP floor, and bfloat16.

- ``guidance_costs``: seconds per donated, jitted sampling step of every guider of
  ``setups.guiders`` (interleaved, medians), as ratios to CFG and to no guidance; for a
  denoiser with a shared prefix (DiT, MMDiT) also the same guiders through the plain vmap,
  which is what the prefix saves.
- ``floor``: the step's FLOPs from XLA's cost analysis over this machine's measured
  float32 matmul rate, and the share of that rate the step achieves.
- ``bf16``: the step in bfloat16 activations against float32, and the relative error of
  whole samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from erg_jax import samplers as S
from erg_jax.jobs.speed import setups
from erg_jax.jobs.speed.timing import interleaved_medians

SHARED = ("erg", "pag", "seg")


def _steppers(setup: setups.Setup, names, plain_names=()) -> dict:
    gs = setups.guiders(setup.num_layers)
    out = {}
    for name in names:
        g = gs[name]
        every = int(g.cache.every) if g.cache is not None else 1
        out[name] = setups.Stepper(*setups.jitted_step(setup, g), setup.sampler.steps, every)
    for name in plain_names:
        den = setups.plain(setup.den)
        fn, carry = setups.jitted_step(setup, gs[name], den)
        out[f"{name}_plain_vmap"] = setups.Stepper(fn, carry, setup.sampler.steps)
    return out


def guidance_costs(setup: setups.Setup, repeats: int = 5) -> dict:
    """Milliseconds per step of every guider, ratios to CFG / none, the prefix's saving."""
    gs = setups.guiders(setup.num_layers)
    names = list(gs)
    plain_names = SHARED if hasattr(setup.den, "branched") else ()
    steppers = _steppers(setup, names, plain_names)
    secs = interleaved_medians(steppers, repeats)
    secs = {k: v / steppers[k].per_call for k, v in secs.items()}  # seconds per step
    out = {
        "model": setup.name,
        "batch": setup.batch,
        "layers": setup.num_layers,
        "step_ms": {k: 1e3 * v for k, v in secs.items()},
        "ratio_to_cfg": {k: secs[k] / secs["cfg"] for k in names},
        "ratio_to_none": {k: secs[k] / secs["none"] for k in names},
    }
    out["shared_prefix_saving"] = {k: 1.0 - secs[k] / secs[f"{k}_plain_vmap"] for k in plain_names}
    return out


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 FLOP/s of one (n, n) x (n, n) matrix product on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    fn = jax.jit(jnp.matmul)
    sec = interleaved_medians({"matmul": lambda: fn(a, b)}, repeats)["matmul"]
    return 2.0 * n**3 / sec


def forward_flops(setup: setups.Setup) -> float:
    """FLOPs of one denoiser forward at the setup's batch (XLA's cost analysis).

    A guided step runs this once per branch; its own program is not counted directly
    because on CPU the branches are a loop (``branches.map_branches``), whose body the
    cost analysis counts once.
    """
    keys, x = setup.noise()
    t = jnp.full((setup.batch,), 500.0)
    fn = jax.jit(lambda x, t, c: setup.den(x, t, c))
    cost = fn.lower(x, t, setup.conds["cond"]).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


def floor(setup: setups.Setup, repeats: int = 5, matmul_n: int = 2048) -> dict:
    """Per guider (none, CFG): FLOPs (forward FLOPs times branches), the floor FLOPs /
    matmul rate, and the share of that rate the measured step achieves."""
    gs = setups.guiders(setup.num_layers)
    names = ("none", "cfg")
    den = setups.plain(setup.den)
    steppers = {}
    for name in names:
        fn, carry = setups.jitted_step(setup, gs[name], den)
        steppers[name] = setups.Stepper(fn, carry, setup.sampler.steps)
    secs = interleaved_medians(steppers, repeats)
    rate = matmul_rate(matmul_n, repeats)
    out = {"model": setup.name, "matmul_gflops": rate / 1e9, "matmul_n": matmul_n}
    forward = forward_flops(setup)
    for name in names:
        flops = forward * gs[name].num_branches
        out[name] = {
            "gflop": flops / 1e9,
            "floor_ms": 1e3 * flops / rate,
            "step_ms": 1e3 * secs[name],
            "share_of_matmul_rate": flops / rate / secs[name],
        }
    return out


def bf16(small: bool = False, batch: int = 8, steps: int = 6, repeats: int = 5) -> dict:
    """CFG step time in bfloat16 activations against float32 (same float32 params), and
    the relative L2 error of samples drawn with `steps` DDIM steps."""
    f32 = setups.dit_setup(small, batch)
    b16 = setups.dit_from_params(
        dict(f32.config, dtype="bfloat16"), f32.den.params, small=small, batch=batch
    )
    guider = setups.guiders(f32.num_layers)["cfg"]
    steppers = {
        "float32": setups.Stepper(*setups.jitted_step(f32, guider), f32.sampler.steps),
        "bfloat16": setups.Stepper(
            *setups.jitted_step(b16, guider, dtype=jnp.bfloat16), b16.sampler.steps
        ),
    }
    secs = interleaved_medians(steppers, repeats)
    sampler = S.make_sampler("ddim", steps, learned_sigma=True)
    samples = {}
    for name, st, dtype in (("float32", f32, jnp.float32), ("bfloat16", b16, jnp.bfloat16)):
        keys, x = st.noise()
        run = jax.jit(
            lambda n, st=st, keys=keys: S.sample(
                st.den, n, st.conds, guider, sampler, keys=keys, num_layers=st.num_layers
            )
        )
        samples[name] = np.asarray(run(x.astype(dtype)).astype(jnp.float32))
    ref = samples["float32"]
    rel = float(np.linalg.norm(samples["bfloat16"] - ref) / np.linalg.norm(ref))
    return {
        "model": f32.name,
        "batch": batch,
        "step_ms": {k: 1e3 * v for k, v in secs.items()},
        "bf16_over_f32_time": secs["bfloat16"] / secs["float32"],
        "sample_steps": steps,
        "relative_error": rel,
    }
