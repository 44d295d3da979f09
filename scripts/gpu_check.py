"""Accelerator checks that the CPU suite cannot make: attention paths and a DiT-XL/2 step.

    python scripts/gpu_check.py --out=gpu.json [--small]

1. Attention (bfloat16 and float32, batch 2, 16 heads, head_dim 64): energy_attention
   through each implementation against the einsum reference, jax.nn's XLA path and
   jax.nn's cuDNN kernel, time per call (20 calls dispatched back to back, medians of
   interleaved rounds) and the largest error against a float32 reference at "highest".
2. DiT-XL/2 at 256 px (32x32x4 latents, batch 16, random weights, bfloat16
   activations): one donated sampling step with no guidance, CFG, ERG (second half of
   the layers), and ERG through the plain per-branch path, with jax.nn's cuDNN kernel
   and its XLA path on GPU (the fused and einsum paths elsewhere).
3. Compile time of a DiT-XL/2 CFG and ERG step, blocks unrolled or scanned (any backend).

Every section is written to the JSON as soon as it is done; a failing section records
its error and the next one runs. `--small` runs tiny sizes (to try the script on CPU).
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from erg_jax import Energy, energy_attention
from erg_jax.jobs.speed import setups
from erg_jax.jobs.speed.timing import interleaved_medians
from erg_jax.models import dit

flags.DEFINE_string("out", "gpu_check.json", "JSON file to write")
flags.DEFINE_bool("small", False, "tiny sizes, to try the script on CPU")
flags.DEFINE_list("sections", ["attention", "dit_steps", "compile_times"], "sections to run")
FLAGS = flags.FLAGS
CALLS = 20


def _burst(fn, *args):
    """A no-argument callable that dispatches CALLS calls and waits for the last."""

    def run():
        out = None
        for _ in range(CALLS):
            out = fn(*args)
        return out

    return run


def attention(small: bool) -> list[dict]:
    rows = []
    lengths = (64, 256) if small else (1024, 4096, 16384)
    gpu = jax.default_backend() == "gpu"
    for dtype in ("bfloat16", "float32"):
        for n in lengths:
            ks = jax.random.split(jax.random.key(n), 3)
            shape = (2, n, 16, 64)
            q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in ks)
            tau = jnp.float32(0.5)
            with jax.default_matmul_precision("highest"):
                ref = energy_attention(q, k, v, Energy(tau=tau), implementation="chunked")
                ref = np.asarray(ref)
            qd, kd, vd = (x.astype(dtype) for x in (q, k, v))
            cudnn = gpu and dtype != "float32"
            # Above 4096 tokens only the paths that never hold the whole attention matrix.
            impls = ("einsum", "fused") if n <= 4096 else ("chunked",)
            fns = {
                f"ours_{impl}": jax.jit(
                    lambda q, k, v, t, impl=impl: energy_attention(
                        q, k, v, Energy(tau=t), implementation=impl
                    )
                )
                for impl in impls + (("cudnn",) if cudnn else ())
            }
            fns["ours_default"] = jax.jit(
                lambda q, k, v, t: energy_attention(q, k, v, Energy(tau=t))
            )
            if n <= 4096:
                fns["ref_xla"] = jax.jit(
                    lambda q, k, v, t: jax.nn.dot_product_attention(q * t.astype(q.dtype), k, v)
                )
            if cudnn:
                fns["ref_cudnn"] = jax.jit(
                    lambda q, k, v, t: jax.nn.dot_product_attention(
                        q * t.astype(q.dtype), k, v, implementation="cudnn"
                    )
                )
            row = {"dtype": dtype, "tokens": n, "error": {}, "ms": {}, "failed": {}}
            ok = {}
            for name, fn in fns.items():
                try:
                    out = np.asarray(fn(qd, kd, vd, tau).astype(jnp.float32))
                    row["error"][name] = float(np.abs(out - ref).max() / np.abs(ref).max())
                    ok[name] = _burst(fn, qd, kd, vd, tau)
                except Exception as e:  # a path the backend lacks is recorded, not fatal
                    row["failed"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            secs = interleaved_medians(ok, 5)
            row["ms"] = {name: 1e3 * s / CALLS for name, s in secs.items()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def dit_steps(small: bool) -> list[dict]:
    rows = []
    impls = ["cudnn", "fused"] if jax.default_backend() == "gpu" else ["fused", "einsum"]
    name, batch, extra = ("tiny/2", 4, dict(num_layers=4)) if small else ("XL/2", 16, {})
    cfg = dit.dit_config(name, dtype="bfloat16", **extra)
    params = dit.init_params(cfg, jax.random.key(0))
    for impl in impls:
        setup = setups.dit_from_params(
            dict(cfg, attention_implementation=impl), params, small=small, batch=batch
        )
        gs = setups.guiders(setup.num_layers)
        row = {"model": name, "batch": batch, "attention": impl, "ms": {}}
        try:
            start = time.perf_counter()
            steppers = {
                n: setups.Stepper(
                    *setups.jitted_step(setup, gs[n], dtype=jnp.bfloat16), setup.sampler.steps
                )
                for n in ("none", "cfg", "erg")
            }
            fn, carry = setups.jitted_step(
                setup, gs["erg"], setups.plain(setup.den), dtype=jnp.bfloat16
            )
            steppers["erg_plain_vmap"] = setups.Stepper(fn, carry, setup.sampler.steps)
            secs = interleaved_medians(steppers, 7)
            row["compile_and_warmup_s"] = time.perf_counter() - start
            row["ms"] = {n: 1e3 * s for n, s in secs.items()}
            row["ratio_to_cfg"] = {n: s / secs["cfg"] for n, s in secs.items()}
        except Exception as e:
            row["failed"] = f"{type(e).__name__}: {str(e)[:500]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def compile_times(small: bool) -> list[dict]:
    """Lower + compile seconds of a DiT-XL/2 CFG and ERG step (batch 16, bfloat16),
    blocks unrolled against stacked under one scan (zero weights: only shapes matter)."""
    name, layers = ("tiny/2", 4) if small else ("XL/2", 28)
    cfg = dit.dit_config(name, dtype="bfloat16", **(dict(num_layers=4) if small else {}))
    shapes = jax.eval_shape(lambda: dit.init_params(cfg, jax.random.key(0)))
    params = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    rows = []
    for scan in (True, False):
        p = dit.stack_blocks(params, layers) if scan else params
        setup = setups.dit_from_params(dict(cfg, scan_blocks=scan), p, small=small, batch=16)
        gs = setups.guiders(setup.num_layers)
        for guider in ("cfg", "erg"):
            fn, carry = setups.jitted_step(setup, gs[guider], dtype=jnp.bfloat16)
            start = time.perf_counter()
            fn.lower(carry, jnp.int32(0)).compile()
            row = {"model": name, "scan_blocks": scan, "guider": guider}
            row["compile_s"] = time.perf_counter() - start
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv):
    del argv
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__}
    for section in (attention, dit_steps, compile_times):
        if section.__name__ not in FLAGS.sections:
            continue
        try:
            result[section.__name__] = section(FLAGS.small)
        except Exception:
            result[section.__name__] = {"failed": traceback.format_exc()[-2000:]}
            print(result[section.__name__]["failed"], file=sys.stderr, flush=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
